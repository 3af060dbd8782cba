"""`fedscan bench series-rule --json OUT`: which series verdict rule, judged per patient.

A CT series holds many slices of one patient; the node turns their P(covid) into one verdict
(edge_node.series.verdict). The UCSD COVID-CT set has several slices per patient, so its
patients stand in for series: a cnn2d is trained on the official ``train`` split (early stop
on ``val``, the node's own training step, 1 torch thread by default), P(covid) is computed for
every ``val`` and ``test`` slice, and each rule of ``edge_node.series.verdict.RULES`` decides
per patient at the model's threshold (0.5: this model is not calibrated) and uncertain band.

Per rule and split: patients, accuracy / sensitivity / specificity over the decided patients
(covid = positive), the uncertain rate, and the accuracy when uncertain counts as wrong. The
rule is chosen on ``val``; ``test`` is reported as the estimate. ``--probs`` reuses the slice
probabilities of an earlier run (written by every run next to the JSON as ``*.probs.npz``) to
evaluate rules without training again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.bench.train import DEFAULT_DATASET, build_sets, discover, load_prepared
from fedscan.errors import BenchError

TOP_K = (3, 5)
BOOTSTRAP = 1000  # resamples of the patients for the 95% intervals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", required=True, help="write the figures here")
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="UCSD COVID-CT folder")
    p.add_argument("--prepared", type=Path, help="npz of prepared slices (fedscan bench train)")
    p.add_argument("--probs", type=Path, help="slice probabilities of an earlier run (npz)")
    p.add_argument("--epochs", type=int, default=8, help="max cnn2d epochs (early stop on val)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threshold", type=float, default=0.5, help="slice threshold (uncalibrated)")
    p.add_argument("--band", type=float, default=0.10, help="uncertain band")


def _train_probs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Train cnn2d on train (best val loss kept); P(covid), labels, patients of val and test."""
    import torch

    from edge_node.train.loop import (
        class_weights,
        clone_state,
        predict_logits,
        train_epoch,
        validate,
    )
    from export.zoo import create_model

    torch.set_num_threads(args.threads)
    if args.prepared is not None and args.prepared.is_file():
        items, cache = load_prepared(args.prepared)
        sets = build_sets(items, "images", False, cache)
    else:
        items, kind = discover(args.dataset)
        sets = build_sets(items, kind, False)
    torch.manual_seed(args.seed)
    model = create_model("cnn2d")
    model.set_train_mode("full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    weight = class_weights(sets["train"].labels)
    best, best_state, best_epoch, bad = None, clone_state(model), 0, 0
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, opt, sets["train"], batch_size=16, generator=gen, weight=weight)
        val_loss, val_m = validate(model, sets["val"], weight)
        print(
            f"  epoch {epoch}: val_loss {val_loss:.4f} val_acc {val_m.accuracy:.3f}",
            file=sys.stderr,
            flush=True,
        )
        if best is None or val_loss < best:
            best, best_state, best_epoch, bad = val_loss, clone_state(model), epoch, 0
        else:
            bad += 1
            if bad >= 3:
                break
    model.load_state_dict(best_state)
    out: dict[str, np.ndarray] = {"best_epoch": np.array(best_epoch)}
    for split in ("val", "test"):
        s = sets[split]
        logits = predict_logits(model, s)
        z = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        out[f"{split}_p"] = prob[:, 1].astype(np.float64)
        out[f"{split}_y"] = np.asarray(s.labels, dtype=np.int64)
        # a patient id is unique within its class folder only; stored hashed
        out[f"{split}_patient"] = np.array(
            [
                hashlib.sha256(f"{y}:{k}".encode()).hexdigest()[:16]
                for y, k in zip(s.labels, s.patient_keys, strict=True)
            ]
        )
    return out


def _patients(p: np.ndarray, y: np.ndarray, who: np.ndarray) -> list[tuple[int, np.ndarray]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(who):
        groups[str(key)].append(i)
    out = []
    for idx in groups.values():
        labels = y[idx]
        out.append((int(2 * labels.sum() >= len(labels)), p[idx]))
    return out


def evaluate_rules(
    p: np.ndarray, y: np.ndarray, who: np.ndarray, threshold: float, band: float
) -> dict[str, dict[str, Any]]:
    """Patient-level figures of every rule (and top_k_mean for each k in TOP_K)."""
    from edge_node.series.verdict import RULES, decide

    patients = _patients(p, y, who)
    rng = np.random.default_rng(0)
    boot = [rng.integers(0, len(patients), len(patients)) for _ in range(BOOTSTRAP)]
    configs = [(name, 5) for name in RULES if name != "top_k_mean"]
    configs += [("top_k_mean", k) for k in TOP_K]
    results: dict[str, dict[str, Any]] = {}
    for name, k in configs:
        tp = tn = fp = fn = unc = 0
        # per patient: 1 right, 0 wrong, -1 uncertain (for the bootstrap over patients)
        outcome = np.zeros(len(patients), dtype=np.int64)
        for j, (label, probs) in enumerate(patients):
            v = decide(probs, rule=name, threshold=threshold, band=band, top_k=k).verdict
            outcome[j] = -1 if v == "uncertain" else int((v == "covid") == bool(label))
            if v == "uncertain":
                unc += 1
            elif v == "covid":
                tp, fp = tp + label, fp + (1 - label)
            else:
                tn, fn = tn + (1 - label), fn + label
        decided = tp + tn + fp + fn
        key = f"top_k_mean(k={k})" if name == "top_k_mean" else name
        results[key] = {
            "patients": len(patients),
            "accuracy_decided": (tp + tn) / decided if decided else None,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "uncertain_rate": unc / len(patients) if patients else None,
            "accuracy_uncertain_wrong": (tp + tn) / len(patients) if patients else None,
            "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp, "uncertain": unc},
            "ci95": _bootstrap(outcome, boot),
        }
    return results


def _bootstrap(outcome: np.ndarray, boot: list[np.ndarray]) -> dict[str, list[float]]:
    """95% percentile intervals (patients resampled) of the decided accuracy, the
    accuracy with uncertain counted wrong, and the uncertain rate."""
    dec, acc, unc = [], [], []
    for idx in boot:
        o = outcome[idx]
        decided = o >= 0
        if decided.any():
            dec.append(float(o[decided].mean()))
        acc.append(float((o == 1).mean()))
        unc.append(float((o == -1).mean()))

    def ci(v: list[float]) -> list[float]:
        return [round(float(np.percentile(v, 2.5)), 3), round(float(np.percentile(v, 97.5)), 3)]

    return {
        "accuracy_decided": ci(dec),
        "accuracy_uncertain_wrong": ci(acc),
        "uncertain_rate": ci(unc),
    }


def slices_per_patient(who: np.ndarray) -> dict[str, float]:
    counts = np.array(list(Counter(str(w) for w in who).values()))
    return {
        "min": int(counts.min()),
        "median": float(np.median(counts)),
        "mean": round(float(counts.mean()), 2),
        "max": int(counts.max()),
        "single_slice_patients": int((counts == 1).sum()),
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| rule | split | patients | acc (decided) | sens | spec | uncertain "
        "| acc (unc=wrong) [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for split in ("val", "test"):
        for rule, m in doc[split].items():
            lines.append(
                f"| {rule} | {split} | {m['patients']} | {_fmt(m['accuracy_decided'])} | "
                f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | "
                f"{_fmt(m['uncertain_rate'])} | {_fmt(m['accuracy_uncertain_wrong'])} "
                f"[{m['ci95']['accuracy_uncertain_wrong'][0]:.2f}, "
                f"{m['ci95']['accuracy_uncertain_wrong'][1]:.2f}] |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.json)
    if args.probs is not None:
        if not args.probs.is_file():
            raise BenchError(f"--probs {args.probs} does not exist")
        probs = dict(np.load(args.probs, allow_pickle=False))
    else:
        probs = _train_probs(args)
        np.savez(out.with_suffix(".probs.npz"), **probs)  # type: ignore[arg-type]
    doc: dict[str, Any] = {
        "schema": "fedscan.bench.series_rule/1",
        "model": "cnn2d, random init, trained on the UCSD official train split",
        "best_epoch": int(probs["best_epoch"]),
        "threshold": args.threshold,
        "uncertain_band": args.band,
        "calibrated": False,
        "slices": {s: len(probs[f"{s}_p"]) for s in ("val", "test")},
        "slices_per_patient": {
            s: slices_per_patient(probs[f"{s}_patient"]) for s in ("val", "test")
        },
    }
    for split in ("val", "test"):
        doc[split] = evaluate_rules(
            probs[f"{split}_p"],
            probs[f"{split}_y"],
            probs[f"{split}_patient"],
            args.threshold,
            args.band,
        )
    val = doc["val"]
    doc["chosen_on_val"] = max(
        val,
        key=lambda r: (val[r]["accuracy_uncertain_wrong"] or 0.0, -(val[r]["uncertain_rate"] or 0)),
    )
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"chosen on val: {doc['chosen_on_val']}  ({doc['seconds']} s)")
    return 0
