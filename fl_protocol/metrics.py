"""Clinical classification metrics shared by the edge node and the coordinator (numpy only).

Positive class = ``covid`` = 1, negative = ``non_covid`` = 0 (docs/CONTRACTS.md). The formulas
are the paper's, from the confusion matrix ``[[tn, fp], [fn, tp]]``:

    accuracy    = (tp + tn) / n
    precision   = tp / (tp + fp)
    recall      = tp / (tp + fn)        (= sensitivity)
    specificity = tn / (tn + fp)
    f1          = 2 * precision * recall / (precision + recall)
    auc         = P(score of a random positive > score of a random negative), ties count 1/2

Degenerate cases are defined, never an exception: a ratio whose denominator is zero is 0.0
(scikit-learn's ``zero_division=0``; e.g. no positive predicted -> precision 0, no positive in
``y_true`` -> recall 0, no negative -> specificity 0), an empty set gives all zeros, and ``auc``
is ``None`` when it is undefined (no scores given, or only one class present in ``y_true``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

Confusion = tuple[tuple[int, int], tuple[int, int]]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


@dataclass(frozen=True)
class Metrics:
    """The paper's metrics for one evaluation (or a weighted average of several)."""

    accuracy: float
    precision: float
    recall: float  # = sensitivity (true positive rate of covid)
    specificity: float  # true negative rate (non_covid)
    f1: float
    auc: float | None  # ROC AUC; None when undefined (one class absent, or no scores)
    confusion: Confusion  # [[tn, fp], [fn, tp]]
    n: int  # number of evaluated samples

    @property
    def sensitivity(self) -> float:
        return self.recall

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; carries ``sensitivity`` as well as ``recall`` for the report."""
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "sensitivity": self.recall,
            "specificity": self.specificity,
            "f1": self.f1,
            "auc": self.auc,
            "confusion": [list(self.confusion[0]), list(self.confusion[1])],
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        """Inverse of :meth:`to_dict` (extra keys such as ``sensitivity`` are ignored)."""
        c = d["confusion"]
        auc = d.get("auc")
        return cls(
            accuracy=float(d["accuracy"]),
            precision=float(d["precision"]),
            recall=float(d["recall"]),
            specificity=float(d["specificity"]),
            f1=float(d["f1"]),
            auc=None if auc is None else float(auc),
            confusion=((int(c[0][0]), int(c[0][1])), (int(c[1][0]), int(c[1][1]))),
            n=int(d["n"]),
        )


def _as_binary(y: ArrayLike, name: str) -> NDArray[np.int64]:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 (non_covid) and 1 (covid)")
    return arr.astype(np.int64)


def from_confusion(tn: int, fp: int, fn: int, tp: int, auc: float | None = None) -> Metrics:
    """Metrics from confusion counts (also used to pool several nodes' confusion matrices)."""
    if min(tn, fp, fn, tp) < 0:
        raise ValueError("confusion counts must be >= 0")
    n = tn + fp + fn + tp
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return Metrics(
        accuracy=_ratio(tp + tn, n),
        precision=precision,
        recall=recall,
        specificity=_ratio(tn, tn + fp),
        f1=_ratio(2 * precision * recall, precision + recall),
        auc=auc,
        confusion=((int(tn), int(fp)), (int(fn), int(tp))),
        n=int(n),
    )


def classification_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, y_score: ArrayLike | None = None
) -> Metrics:
    """Metrics of predictions ``y_pred`` (0/1) against ``y_true`` (0/1).

    ``y_score`` (probability or any score of covid, higher = more covid) enables the AUC.
    """
    t = _as_binary(y_true, "y_true")
    p = _as_binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    tp = int(np.sum((t == 1) & (p == 1)))
    tn = int(np.sum((t == 0) & (p == 0)))
    fp = int(np.sum((t == 0) & (p == 1)))
    fn = int(np.sum((t == 1) & (p == 0)))
    auc = None if y_score is None else roc_auc(t, y_score)
    return from_confusion(tn, fp, fn, tp, auc=auc)


def _scores(y_score: ArrayLike, n: int) -> NDArray[np.float64]:
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"y_score must have shape ({n},), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("y_score must be finite")
    return s


def _average_ranks(s: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``s``, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)  # last rank of each distinct value
    mean_rank = ends - (counts - 1) / 2.0
    ranks: NDArray[np.float64] = mean_rank[inverse.reshape(-1)]
    return ranks


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float | None:
    """ROC AUC by the Mann-Whitney rank statistic (ties count one half); None if undefined."""
    t = _as_binary(y_true, "y_true")
    s = _scores(y_score, t.size)
    n_pos = int(t.sum())
    n_neg = int(t.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    u = float(ranks[t == 1].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


@dataclass(frozen=True)
class RocCurve:
    """ROC points, from (0, 0) at threshold +inf to (1, 1) at the lowest score."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    thresholds: tuple[float, ...]  # predict covid when score >= threshold

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "fpr": list(self.fpr),
            "tpr": list(self.tpr),
            "thresholds": list(self.thresholds),
        }


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> RocCurve:
    """Every operating point of the score (one per distinct value), for the report's plot.

    Matches scikit-learn's ``roc_curve(..., drop_intermediate=False)``. A rate whose class is
    absent is 0 throughout (the curve is then degenerate and the AUC is ``None``).
    """
    t = _as_binary(y_true, "y_true")
    s = _scores(y_score, t.size)
    if t.size == 0:
        return RocCurve(fpr=(0.0,), tpr=(0.0,), thresholds=(float("inf"),))
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    t_sorted = t[order]
    # last index of each run of equal scores: the operating point once that run is included
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], t.size - 1]
    tps = np.cumsum(t_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    n_pos = int(t.sum())
    n_neg = int(t.size - n_pos)
    tpr = np.r_[0.0, tps / n_pos if n_pos else np.zeros(len(tps))]
    fpr = np.r_[0.0, fps / n_neg if n_neg else np.zeros(len(fps))]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return RocCurve(
        fpr=tuple(float(v) for v in fpr),
        tpr=tuple(float(v) for v in tpr),
        thresholds=tuple(float(v) for v in thresholds),
    )


def weighted_average(items: Iterable[tuple[Metrics, float]]) -> Metrics:
    """Weighted mean of each metric (the coordinator weighs nodes by their validation size).

    The confusion matrix and ``n`` are summed. ``auc`` averages only the items that have one,
    with their weights renormalised, and is None when none has. Items of weight 0 count only in
    the sums; if all weights are 0 every rate is 0.
    """
    pairs: Sequence[tuple[Metrics, float]] = list(items)
    if any(w < 0 or not np.isfinite(w) for _, w in pairs):
        raise ValueError("weights must be finite and >= 0")
    total = float(sum(w for _, w in pairs))

    def mean(name: str) -> float:
        if total == 0:
            return 0.0
        return float(sum(getattr(m, name) * w for m, w in pairs)) / total

    with_auc = [(m.auc, w) for m, w in pairs if m.auc is not None]
    auc_weight = float(sum(w for _, w in with_auc))
    auc = (
        float(sum(a * w for a, w in with_auc)) / auc_weight if with_auc and auc_weight > 0 else None
    )
    tn = sum(m.confusion[0][0] for m, _ in pairs)
    fp = sum(m.confusion[0][1] for m, _ in pairs)
    fn = sum(m.confusion[1][0] for m, _ in pairs)
    tp = sum(m.confusion[1][1] for m, _ in pairs)
    return Metrics(
        accuracy=mean("accuracy"),
        precision=mean("precision"),
        recall=mean("recall"),
        specificity=mean("specificity"),
        f1=mean("f1"),
        auc=auc,
        confusion=((tn, fp), (fn, tp)),
        n=sum(m.n for m, _ in pairs),
    )


def pooled(items: Iterable[Metrics]) -> Metrics:
    """Metrics of the summed confusion matrices (micro average; AUC is not poolable -> None)."""
    ms = list(items)
    return from_confusion(
        sum(m.confusion[0][0] for m in ms),
        sum(m.confusion[0][1] for m in ms),
        sum(m.confusion[1][0] for m in ms),
        sum(m.confusion[1][1] for m in ms),
    )
