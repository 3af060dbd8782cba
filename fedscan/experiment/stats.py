"""The experiment's statistics: metrics of per-slice scores, patient-level verdicts, calibration
error, and bootstrap confidence intervals over patients (numpy only, no training).

- Slice level: every slice is a case (threshold on P(covid)).
- Patient level: one verdict per patient: the mean P(covid) of their slices against the same
  threshold; the patient's label is the majority of their slice labels (ties: covid).
- Bootstrap: patients are resampled with replacement (all of a patient's slices travel
  together, so correlated slices do not shrink the interval); a statistic is recomputed on
  every replicate and the interval is the 2.5 / 97.5 percentiles. Paired differences are
  computed inside each replicate from the same resample, so the two arms share their noise.
- ECE: expected calibration error over ``bins`` equal-width bins of P(covid) (the share of
  slices in a bin times |mean P(covid) - covid fraction|); the reliability curve is the
  per-bin mean P(covid), covid fraction and count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fl_protocol.metrics import roc_auc

N_BOOT = 1000
ECE_BINS = 10


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def binary_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray = 0.5
) -> dict[str, float]:
    """accuracy, sensitivity, specificity, f1, auc (NaN where undefined), n; ``threshold``:
    one value, or one per slice."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    pred = p >= threshold
    tp = float(np.sum(pred & (y == 1)))
    tn = float(np.sum(~pred & (y == 0)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    n = len(y)
    nan = float("nan")
    auc = roc_auc(y, p) if n else None
    return {
        "accuracy": (tp + tn) / n if n else nan,
        "sensitivity": tp / (tp + fn) if tp + fn else nan,
        "specificity": tn / (tn + fp) if tn + fp else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
        "auc": nan if auc is None else float(auc),
        "n": float(n),
    }


def patient_index(patients: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """(patient keys in first-seen order, the slice indices of each)."""
    order: dict[str, list[int]] = {}
    for i, key in enumerate(patients):
        order.setdefault(key, []).append(i)
    keys = list(order)
    return keys, [np.asarray(order[k], dtype=np.int64) for k in keys]


def patient_level(
    y: np.ndarray, p: np.ndarray, groups: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(patient labels by majority, ties covid; patient P(covid) = mean over their slices)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if not len(groups):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    idx = np.concatenate(list(groups))
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    labels = (2 * np.add.reduceat(y[idx], starts) >= sizes).astype(np.int64)
    probs = np.add.reduceat(p[idx], starts) / sizes
    return labels, probs


def reliability(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin of P(covid): mean P(covid), covid fraction, count."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append({"bin": b, "mean_p": float(p[m].mean()), "frac_covid": float(y[m].mean()),
                        "n": float(m.sum())})  # fmt: skip
    return out


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(covid) (see the module docstring)."""
    n = len(y)
    if not n:
        return float("nan")
    return float(
        sum(r["n"] / n * abs(r["mean_p"] - r["frac_covid"]) for r in reliability(y, p, bins))
    )


def bootstrap(
    groups: Sequence[np.ndarray],
    statistic: Callable[[list[np.ndarray]], Mapping[str, float]],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``statistic`` (patients, as lists of slice indices -> named values) on all patients and
    its 95% percentile interval over ``n_boot`` patient resamples: {name: {estimate, lo, hi}}."""
    full = dict(statistic(list(groups)))
    rng = np.random.default_rng(seed)
    reps: dict[str, list[float]] = {k: [] for k in full}
    n = len(groups)
    for _ in range(n_boot):
        pick = rng.integers(0, n, size=n)
        values = statistic([groups[i] for i in pick])
        for k in full:
            reps[k].append(float(values[k]))
    out: dict[str, dict[str, float]] = {}
    for k, est in full.items():
        arr = np.asarray(reps[k], dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        lo, hi = np.percentile(arr, [2.5, 97.5]) if len(arr) else (np.nan, np.nan)
        out[k] = {"estimate": float(est), "lo": float(lo), "hi": float(hi)}
    return out


def arm_statistic(
    y: np.ndarray,
    probs: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float | np.ndarray],
    pairs: Sequence[tuple[str, str]],
    keys: Sequence[str] = ("accuracy", "auc", "sensitivity", "specificity"),
) -> Callable[[list[np.ndarray]], dict[str, float]]:
    """A bootstrap statistic over slice indices for several arms and paired differences.

    ``probs[arm]``: P(covid) per slice; ``thresholds[arm]``: its operating threshold (0.5 =
    argmax). Values: ``<arm>.<metric>`` at slice level, ``<arm>.patient_<metric>`` at patient
    level, ``<arm>.ece``, and ``<a>-<b>.<metric>`` for every pair (a patient drawn twice
    counts twice).
    """

    def stat(drawn: list[np.ndarray]) -> dict[str, float]:
        idx = np.concatenate(drawn)
        yy = y[idx]
        ends = np.cumsum([len(g) for g in drawn])
        groups = [np.arange(e - len(g), e) for g, e in zip(drawn, ends, strict=True)]
        out: dict[str, float] = {}
        for arm, p in probs.items():
            pp = p[idx]
            th: Any = thresholds.get(arm, 0.5)
            th_pat: Any = th
            if isinstance(th, np.ndarray):  # a threshold per slice (per fold)
                th = th[idx]
                th_pat = patient_level(yy, th, groups)[1]
            m = binary_metrics(yy, pp, th)
            py, pp_pat = patient_level(yy, pp, groups)
            mp = binary_metrics(py, pp_pat, th_pat)
            for k in keys:
                out[f"{arm}.{k}"] = m[k]
                out[f"{arm}.patient_{k}"] = mp[k]
            out[f"{arm}.ece"] = ece(yy, pp)
        for a, b in pairs:
            for k in keys:
                out[f"{a}-{b}.{k}"] = out[f"{a}.{k}"] - out[f"{b}.{k}"]
                out[f"{a}-{b}.patient_{k}"] = out[f"{a}.patient_{k}"] - out[f"{b}.patient_{k}"]
        return out

    return stat


def fmt_ci(d: Mapping[str, Any] | None, scale: float = 100.0) -> str:
    """``62.9 [58.1, 67.4]`` (percent by default); ``-`` when missing or undefined."""
    if not d or not np.isfinite(d.get("estimate", np.nan)):
        return "-"
    return f"{scale * d['estimate']:.1f} [{scale * d['lo']:.1f}, {scale * d['hi']:.1f}]"
