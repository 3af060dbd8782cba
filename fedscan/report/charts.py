"""PNG charts of a report (matplotlib, Agg backend: no display, no GUI toolkit).

- ``accuracy_per_round``: held-out test accuracy of each global version, and the nodes' own
  evaluations of the global model they received (local validation scans, over MQTT);
- ``confusion_matrix``: one model's ``[[tn, fp], [fn, tp]]`` with counts and row percentages;
- ``roc_curves``: every model's ROC curve on the test set, with its AUC.
- ``reliability_curves``: every model's reliability diagram (calibration) with its ECE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from fedscan.report.results import ModelEval, RoundPoint

CLASS_NAMES = ("non_covid", "covid")
DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": "fedscan"})
    plt.close(fig)
    return path


def accuracy_per_round(rounds: Sequence[RoundPoint], path: Path) -> Path:
    """Test accuracy of the global model after each round (+ node-reported accuracies)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [r.round for r in rounds if r.test_accuracy is not None]
    ys = [100.0 * float(r.test_accuracy) for r in rounds if r.test_accuracy is not None]
    if xs:
        ax.plot(xs, ys, marker="o", linewidth=2.2, color="#1f5fa8", label="global, test set")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)  # fmt: skip
    nodes = sorted({n for r in rounds for n in r.reported})
    for node in nodes:
        pts = [(r.round, 100.0 * r.reported[node]) for r in rounds if node in r.reported]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", linestyle="--", linewidth=1,
                    alpha=0.8, label=f"{node}: received global, local validation")  # fmt: skip
    ax.set_xlabel("round (0 = initial global model)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 105)
    ax.set_xticks(sorted({r.round for r in rounds}) or [0])
    ax.grid(alpha=0.3)
    if xs or nodes:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no rounds", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Accuracy per round")
    return _save(fig, path)


def confusion_matrix(model: ModelEval, path: Path) -> Path:
    """Counts with the share of each true class; rows = truth, columns = prediction."""
    (tn, fp), (fn, tp) = model.metrics.confusion
    cells = [[tn, fp], [fn, tp]]
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    share = [[c / max(1, sum(row)) for c in row] for row in cells]
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            colour = "white" if share[i][j] > 0.6 else "black"
            ax.text(j, i, f"{cells[i][j]}\n{100 * share[i][j]:.0f}%", ha="center", va="center",
                    color=colour, fontsize=11)  # fmt: skip
    ax.set_xticks([0, 1], labels=[f"pred {c}" for c in CLASS_NAMES], fontsize=8)
    ax.set_yticks([0, 1], labels=[f"true {c}" for c in CLASS_NAMES], fontsize=8)
    ax.set_title(model.name, fontsize=10)
    return _save(fig, path)


def roc_curves(models: Sequence[ModelEval], path: Path) -> Path:
    """All models' ROC curves on one plot (models without a curve are left out)."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    drawn = 0
    for m in models:
        if m.roc is None:
            continue
        auc = m.metrics.auc
        label = f"{m.name} (AUC {auc:.3f})" if auc is not None else m.name
        style: dict[str, Any] = {"linewidth": 2.4} if m.kind == "global" else {"linewidth": 1.3}
        ax.step(m.roc.fpr, m.roc.tpr, where="post", label=label, **style)
        drawn += 1
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC on the held-out test set")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def reliability_curves(models: Sequence[ModelEval], path: Path) -> Path:
    """Reliability diagram: per bin of P(covid), the covid fraction against the mean P(covid),
    solid after the temperature fitted on validation, dotted as the softmax gives it."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    drawn = 0
    for m in models:
        c = m.calibration or {}
        curves = (("reliability", "ece", True), ("reliability_calibrated", "ece_calibrated", False))
        for key, ece_key, dotted in curves:
            bins = c.get(key)
            if not bins:
                continue
            xs = [b["mean_p"] for b in bins]
            ys = [b["frac_covid"] for b in bins]
            ece = c.get(ece_key)
            tag = "softmax" if dotted else "after T"
            label = f"{m.name}, {tag}" + (f" (ECE {100 * ece:.1f}%)" if ece is not None else "")
            style: dict[str, Any] = {"linewidth": 2.2 if m.kind == "global" else 1.2,
                                     "linestyle": ":" if dotted else "-", "marker": "o",
                                     "markersize": 3}  # fmt: skip
            ax.plot(xs, ys, label=label, **style)
            drawn += 1
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("mean predicted P(covid) in the bin")
    ax.set_ylabel("fraction of covid slices in the bin")
    ax.set_title("Reliability on the held-out test set")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6, loc="upper left")
    return _save(fig, path)
