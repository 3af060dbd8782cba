"""Per-slice predictions of every arm, pooled over folds, with bootstrap intervals over patients.

Each task returns its models' test logits and validation summaries (``arms.ModelScores``).
For one seed, the folds' test slices are concatenated (with ``--folds K`` every slice of the
pool is tested exactly once; with the official split there is one "fold", the test split), and
:mod:`fedscan.experiment.stats` gives every arm's metrics with a 95% interval from resampling
patients, and the paired differences FedAvg minus each comparator.

Arms: ``fedavg`` (the global version chosen on the hospitals' validation), ``fedavg_last``,
``centralized``, ``hospital-k`` (local-only), ``best_hospital`` (in each fold, the local-only
model with the best accuracy on every hospital's validation patients: picked without the test
set). Each arm twice: at P(covid) >= 0.5 (argmax), and ``@cal`` = temperature-scaled with the
threshold fitted on that model's validation data (``fl_protocol.calibration``: FedAvg and
centralized on the validation patients of all hospitals, i.e. the nodes' summed reports; a
local-only model on its own hospital's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedscan.experiment import stats
from fl_protocol.calibration import CalibrationStats, OperatingPoint, fit_operating_point

KEYS = ("accuracy", "auc", "sensitivity", "specificity")


def _op(val_stats: Mapping[str, Any] | None) -> OperatingPoint | None:
    return None if not val_stats else fit_operating_point(CalibrationStats.from_dict(val_stats))


def arm_probabilities(
    folds: Sequence[Mapping[str, Any]], arm: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any] | None]]:
    """One arm over the folds, concatenated: P(covid) at T = 1, P(covid) after each fold's
    fitted temperature, that fold's threshold per slice, and the operating points."""
    z_parts, zt_parts, th_parts = [], [], []
    ops: list[dict[str, Any] | None] = []
    for f in folds:
        logits = np.asarray(f["models"][arm]["test_logits"], dtype=np.float64)
        z = logits[:, 1] - logits[:, 0]
        op = _op(f["models"][arm].get("val_stats"))
        ops.append(None if op is None else op.to_dict())
        t, th = (1.0, 0.5) if op is None else (op.temperature, op.threshold)
        z_parts.append(z)
        zt_parts.append(z / t)
        th_parts.append(np.full(len(z), th))
    return (
        stats.sigmoid(np.concatenate(z_parts)),
        stats.sigmoid(np.concatenate(zt_parts)),
        np.concatenate(th_parts),
        ops,
    )


def fold_models(results: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Per fold of ``seed``: test ids/labels/patients and the scores of every model."""
    folds: dict[int, dict[str, Any]] = {}
    for r in results:
        if r["seed"] != seed or "scores" not in r:
            continue
        f = folds.setdefault(int(r.get("fold", 0)), {"models": {}})
        f["ids"], f["labels"], f["patients"] = r["test_ids"], r["test_labels"], r["test_patients"]
        if r["arm"] == "local_only":
            hospitals = dict(r["scores"])
            f["models"].update(hospitals)
            ranked = [(h, s["val_accuracy"]) for h, s in hospitals.items()
                      if s.get("val_accuracy") is not None]  # fmt: skip
            if ranked:
                best = max(ranked, key=lambda hv: hv[1])[0]  # ties: the first hospital
                f["models"]["best_hospital"] = hospitals[best]
                f["best_hospital"] = best
        else:
            f["models"].update(r["scores"])
    complete = {k: v for k, v in folds.items() if {"fedavg", "centralized"} <= set(v["models"])}
    return [complete[k] for k in sorted(complete)]


def summarize_seed(
    results: Sequence[Mapping[str, Any]], seed: int, *, n_boot: int = stats.N_BOOT
) -> dict[str, Any] | None:
    """Bootstrap summary of one seed over its complete folds (None when there is none)."""
    folds = fold_models(results, seed)
    if not folds:
        return None
    names = [n for n in folds[0]["models"] if all(n in f["models"] for f in folds)]
    y = np.concatenate([np.asarray(f["labels"], dtype=np.int64) for f in folds])
    patients = [p for f in folds for p in f["patients"]]
    probs: dict[str, np.ndarray] = {}
    thresholds: dict[str, Any] = {}
    ops: dict[str, list[dict[str, Any] | None]] = {}
    for name in names:
        probs[name], probs[f"{name}@cal"], thresholds[f"{name}@cal"], ops[name] = arm_probabilities(
            folds, name
        )
        thresholds[name] = 0.5
    comparators = [n for n in names if n not in ("fedavg", "fedavg_last")]
    pairs = [("fedavg", c) for c in comparators] + [("fedavg@cal", f"{c}@cal") for c in comparators]
    _, groups = stats.patient_index(patients)
    stat = stats.arm_statistic(y, probs, thresholds, pairs, KEYS)
    ci = stats.bootstrap(groups, stat, n_boot=n_boot, seed=seed)
    arms_out = {
        arm: {k.split(".", 1)[1]: v for k, v in ci.items() if k.split(".", 1)[0] == arm}
        for arm in probs
    }
    diffs = {
        f"{a}-{b}": {
            k.split(".", 1)[1]: v for k, v in ci.items() if k.split(".", 1)[0] == f"{a}-{b}"
        }
        for a, b in pairs
    }
    return {
        "seed": seed,
        "folds": len(folds),
        "slices": len(y),
        "patients": len(groups),
        "covid": int(y.sum()),
        "n_boot": n_boot,
        "best_hospital_by_fold": [f.get("best_hospital") for f in folds],
        "arms": arms_out,
        "differences": diffs,
        "operating_points": ops,
        "reliability": {a: stats.reliability(y, p) for a, p in probs.items()},
    }


def summarize(
    results: Sequence[Mapping[str, Any]], seeds: Sequence[int], *, n_boot: int = stats.N_BOOT
) -> dict[str, Any]:
    out = {}
    for s in seeds:
        summary = summarize_seed(results, s, n_boot=n_boot)
        if summary is not None:
            out[str(s)] = summary
    return {
        "method": "per-slice predictions pooled over folds; 95% percentile intervals from "
        f"{n_boot} bootstrap resamples of patients; patient level = mean P(covid) of a "
        "patient's slices against the same threshold; @cal = temperature and threshold fitted "
        "on validation (fl_protocol.calibration)",
        "per_seed": out,
    }


def _row(name: str, d: Mapping[str, Any]) -> str:
    cells = [stats.fmt_ci(d.get(k)) for k in KEYS]
    cells += [stats.fmt_ci(d.get(f"patient_{k}")) for k in ("accuracy", "auc")]
    cells.append(stats.fmt_ci(d.get("ece")))
    return "| " + " | ".join([name, *cells]) + " |"


def markdown(cv: Mapping[str, Any]) -> str:
    """The interval tables (percent, estimate [95% CI])."""
    lines: list[str] = []
    for seed, s in cv.get("per_seed", {}).items():
        lines += [
            "",
            f"Seed {seed}: {s['slices']} test slices of {s['patients']} patients over "
            f"{s['folds']} fold(s); estimate [95% CI over {s['n_boot']} patient resamples].",
            "",
            "| Arm | Accuracy | AUC | Sensitivity | Specificity | Patient acc. | Patient AUC "
            "| ECE |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [_row(a, d) for a, d in s["arms"].items()]
        lines += [
            "",
            "| Paired difference | Accuracy | AUC | Patient acc. |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, d in s["differences"].items():
            lines.append(
                f"| {name} | {stats.fmt_ci(d.get('accuracy'))} | {stats.fmt_ci(d.get('auc'))} "
                f"| {stats.fmt_ci(d.get('patient_accuracy'))} |"
            )
    return "\n".join(lines)


def compare(
    runs: Sequence[Sequence[Mapping[str, Any]]],
    names: Sequence[str],
    seeds: Sequence[int],
    *,
    n_boot: int = stats.N_BOOT,
) -> dict[str, Any]:
    """Two runs on the same test slices (same folds and seeds, e.g. two recipes): every arm both
    have, and the paired differences first minus second with intervals over patients (at the
    argmax and ``@cal``). ``runs``: each run's task results (``predictions``)."""
    if len(runs) != 2 or len(names) != 2 or names[0] == names[1]:
        raise ValueError("compare needs two runs with two different names")
    out: dict[str, Any] = {}
    for seed in seeds:
        a, b = (fold_models(r, seed) for r in runs)
        if not a or len(a) != len(b):
            continue
        for fa, fb in zip(a, b, strict=True):
            if fa["ids"] != fb["ids"]:
                raise ValueError(f"seed {seed}: the two runs did not test the same slices")
        arms = [n for n in a[0]["models"] if all(n in f["models"] for f in (*a, *b))]
        y = np.concatenate([np.asarray(f["labels"], dtype=np.int64) for f in a])
        patients = [p for f in a for p in f["patients"]]
        probs: dict[str, np.ndarray] = {}
        thresholds: dict[str, Any] = {}
        for run_name, folds in zip(names, (a, b), strict=True):
            for arm in arms:
                key = f"{run_name}:{arm}"
                probs[key], probs[f"{key}@cal"], thresholds[f"{key}@cal"], _ = arm_probabilities(
                    folds, arm
                )
                thresholds[key] = 0.5
        keys = [f"{arm}{suffix}" for arm in arms for suffix in ("", "@cal")]
        pairs = [(f"{names[0]}:{k}", f"{names[1]}:{k}") for k in keys]
        _, groups = stats.patient_index(patients)
        ci = stats.bootstrap(
            groups,
            stats.arm_statistic(y, probs, thresholds, pairs, KEYS),
            n_boot=n_boot,
            seed=seed,
        )

        def part(prefix: str, ci: dict[str, Any] = ci) -> dict[str, Any]:
            return {k.split(".", 1)[1]: v for k, v in ci.items() if k.split(".", 1)[0] == prefix}

        out[str(seed)] = {
            "slices": len(y),
            "patients": len(groups),
            "arms": {k: {n: part(f"{n}:{k}") for n in names} for k in keys},
            "differences": {k: part(f"{p}-{q}") for k, (p, q) in zip(keys, pairs, strict=True)},
        }
    return {"runs": list(names), "n_boot": n_boot, "per_seed": out}


def compare_markdown(cmp: Mapping[str, Any]) -> str:
    """The paired table of :func:`compare` (percent, estimate [95% CI])."""
    a, b = cmp["runs"]
    lines: list[str] = []
    for seed, s in cmp["per_seed"].items():
        lines += [
            "",
            f"Seed {seed}: {a} minus {b} on the same {s['slices']} test slices of "
            f"{s['patients']} patients; points, estimate [95% CI over {cmp['n_boot']} "
            "patient resamples].",
            "",
            f"| Arm | {a} accuracy | {b} accuracy | Accuracy diff. | AUC diff. "
            "| Patient acc. diff. |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for arm, d in s["differences"].items():
            acc = [stats.fmt_ci(s["arms"][arm][n].get("accuracy")) for n in (a, b)]
            lines.append(
                f"| {arm} | {acc[0]} | {acc[1]} | {stats.fmt_ci(d.get('accuracy'))} "
                f"| {stats.fmt_ci(d.get('auc'))} | {stats.fmt_ci(d.get('patient_accuracy'))} |"
            )
    return "\n".join(lines)
