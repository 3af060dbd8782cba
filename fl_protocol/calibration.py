"""Operating point of a model from validation data: temperature, threshold, uncertain band.

Nodes never send per-slice scores. A node summarises its validation slices as
:class:`CalibrationStats`: the summed negative log-likelihood at every temperature of the
fixed grid ``TEMPERATURES``, and, for every logit margin ``z = logit_covid - logit_non_covid``
of the fixed grid ``MARGINS``, how many covid / non-covid slices have a margin at or above it
(counts only). Sums over nodes are the pooled statistics (each node weighs by its slice count),
and :func:`fit_operating_point` picks from them:

- temperature ``T``: the grid value with the lowest pooled NLL (temperature scaling);
- threshold: the margin with the highest Youden index (sensitivity + specificity - 1, i.e. the
  best balanced accuracy; ties: the margin closest to 0), as a probability
  ``sigmoid(z / T)`` (the node compares P(covid) after temperature scaling with it);
- uncertain band: the largest half-width in ``BANDS`` whose validation slices inside the band
  (``|P(covid) - threshold| < band``) are called correctly less than ``BAND_ACCURACY`` of the
  time, with at least ``BAND_MIN_SLICES`` slices in it; the smallest band when no candidate has
  such a low accuracy; ``DEFAULT_BAND`` when no band holds enough slices to judge.

Resolution: margins step by ``MARGIN_STEP`` (a threshold is exact up to that in logit units).
The same code serves the node trainer (its local validation split), the coordinator (the
nodes' reports, summed) and ``fedscan experiment``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

GRID_ID = "t41-m65"  # names the two grids below; stats on another grid are refused
TEMPERATURES: tuple[float, ...] = tuple(round(0.25 * 2.0 ** (k / 8.0), 5) for k in range(41))
MARGIN_STEP = 0.25
MARGINS: tuple[float, ...] = tuple(-8.0 + MARGIN_STEP * k for k in range(65))
BANDS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
BAND_ACCURACY = 0.7  # below this accuracy, calls near the threshold are shown as "uncertain"
BAND_MIN_SLICES = 5
DEFAULT_BAND = 0.1  # edge_node.serve.inference's default for an uncalibrated model
THRESHOLD_RANGE = (0.01, 0.99)


class CalibrationError(ValueError):
    """Malformed calibration statistics (wrong grid, negative or inconsistent counts)."""


@dataclass(frozen=True)
class CalibrationStats:
    """Aggregate validation statistics on the fixed grids (see the module docstring)."""

    n_pos: int  # covid slices
    n_neg: int  # non-covid slices
    nll_sum: tuple[float, ...]  # per TEMPERATURES entry: summed NLL of the slices
    pos_at_or_above: tuple[int, ...]  # per MARGINS entry: covid slices with margin >= it
    neg_at_or_above: tuple[int, ...]  # per MARGINS entry: non-covid slices with margin >= it

    def __post_init__(self) -> None:
        if self.n_pos < 0 or self.n_neg < 0:
            raise CalibrationError("negative slice counts")
        if len(self.nll_sum) != len(TEMPERATURES):
            raise CalibrationError(f"nll_sum needs {len(TEMPERATURES)} values ({GRID_ID})")
        for name, counts, total in (
            ("pos_at_or_above", self.pos_at_or_above, self.n_pos),
            ("neg_at_or_above", self.neg_at_or_above, self.n_neg),
        ):
            if len(counts) != len(MARGINS):
                raise CalibrationError(f"{name} needs {len(MARGINS)} counts ({GRID_ID})")
            if any(c < 0 or c > total for c in counts):
                raise CalibrationError(f"{name}: counts outside [0, {total}]")
            if any(a < b for a, b in itertools.pairwise(counts)):
                raise CalibrationError(f"{name}: counts must not increase with the margin")
        if any(not math.isfinite(v) or v < 0 for v in self.nll_sum):
            raise CalibrationError("nll_sum values must be finite and >= 0")

    @property
    def n(self) -> int:
        return self.n_pos + self.n_neg

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        return CalibrationStats(
            self.n_pos + other.n_pos,
            self.n_neg + other.n_neg,
            tuple(a + b for a, b in zip(self.nll_sum, other.nll_sum, strict=True)),
            tuple(a + b for a, b in zip(self.pos_at_or_above, other.pos_at_or_above, strict=True)),
            tuple(a + b for a, b in zip(self.neg_at_or_above, other.neg_at_or_above, strict=True)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": GRID_ID,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "nll_sum": list(self.nll_sum),
            "pos_at_or_above": list(self.pos_at_or_above),
            "neg_at_or_above": list(self.neg_at_or_above),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationStats:
        if d.get("grid") != GRID_ID:
            raise CalibrationError(f"calibration grid {d.get('grid')!r}, expected {GRID_ID!r}")
        try:
            return cls(
                int(d["n_pos"]),
                int(d["n_neg"]),
                tuple(float(v) for v in d["nll_sum"]),
                tuple(int(v) for v in d["pos_at_or_above"]),
                tuple(int(v) for v in d["neg_at_or_above"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"malformed calibration statistics: {exc}") from None


def margins_of(logits: ArrayLike) -> np.ndarray:
    """``[N, 2]`` logits -> the covid margin ``z = l1 - l0`` (float64)."""
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CalibrationError(f"logits must be [N, 2], got {arr.shape}")
    return arr[:, 1] - arr[:, 0]


def nll_at(z: np.ndarray, y: np.ndarray, temperature: float) -> np.ndarray:
    """Per-slice NLL of labels ``y`` under P(covid) = sigmoid(z / T)."""
    s = z / temperature
    return np.logaddexp(0.0, np.where(y == 1, -s, s))


def calibration_stats(logits: ArrayLike, labels: ArrayLike) -> CalibrationStats:
    """A node's summary of its validation slices (``logits`` [N, 2], labels 0/1)."""
    z = margins_of(logits)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != z.shape or np.any((y != 0) & (y != 1)):
        raise CalibrationError("labels must be 0/1, one per row of logits")
    grid = np.asarray(MARGINS)
    pos, neg = z[y == 1], z[y == 0]
    return CalibrationStats(
        n_pos=len(pos),
        n_neg=len(neg),
        nll_sum=tuple(float(nll_at(z, y, t).sum()) for t in TEMPERATURES),
        pos_at_or_above=tuple(int(v) for v in (pos[None, :] >= grid[:, None]).sum(axis=1)),
        neg_at_or_above=tuple(int(v) for v in (neg[None, :] >= grid[:, None]).sum(axis=1)),
    )


def combine(items: Iterable[CalibrationStats]) -> CalibrationStats | None:
    """The pooled statistics of several nodes (None when there are none)."""
    total: CalibrationStats | None = None
    for s in items:
        total = s if total is None else total + s
    return total


def point_metadata(
    temperature: float, threshold: float, uncertain_band: float, n_val: int
) -> dict[str, str]:
    """The ``fedscan.*`` ONNX metadata entries of an operating point (the one writer of them:
    ``OperatingPoint`` and the manifest's ``ServingPoint`` both use it)."""
    return {
        "fedscan.temperature": f"{temperature:.6g}",
        "fedscan.threshold": f"{threshold:.6g}",
        "fedscan.uncertain_band": f"{uncertain_band:.6g}",
        "fedscan.calibration_n_val": str(n_val),
    }


@dataclass(frozen=True)
class OperatingPoint:
    """What goes into the ONNX metadata (``fedscan.temperature`` etc.)."""

    temperature: float  # logits / T before the softmax
    threshold: float  # P(covid) >= threshold -> covid
    uncertain_band: float  # |P(covid) - threshold| < band -> uncertain
    n_val: int  # validation slices it was fitted on
    val_sensitivity: float  # at the threshold, on those slices
    val_specificity: float
    band_accuracy: float | None  # validation accuracy of the calls inside the band
    band_slices: int  # validation slices inside the band

    def __post_init__(self) -> None:
        if not 0.01 <= self.temperature <= 100.0:
            raise CalibrationError("temperature outside [0.01, 100]")
        if not 0.0 < self.threshold < 1.0:
            raise CalibrationError("threshold outside (0, 1)")
        if not 0.0 <= self.uncertain_band < 0.5:
            raise CalibrationError("uncertain band outside [0, 0.5)")

    def metadata(self) -> dict[str, str]:
        """The ``fedscan.*`` ONNX metadata entries (docs/CONTRACTS.md)."""
        return point_metadata(self.temperature, self.threshold, self.uncertain_band, self.n_val)

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "threshold": self.threshold,
            "uncertain_band": self.uncertain_band,
            "n_val": self.n_val,
            "val_sensitivity": self.val_sensitivity,
            "val_specificity": self.val_specificity,
            "band_accuracy": self.band_accuracy,
            "band_slices": self.band_slices,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OperatingPoint:
        ba = d.get("band_accuracy")
        return cls(
            float(d["temperature"]),
            float(d["threshold"]),
            float(d["uncertain_band"]),
            int(d["n_val"]),
            float(d["val_sensitivity"]),
            float(d["val_specificity"]),
            None if ba is None else float(ba),
            int(d["band_slices"]),
        )


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return math.log(p / (1.0 - p))


def _index_at(z: float) -> int:
    """The first grid index whose margin is >= z (len(MARGINS) when none is)."""
    return int(np.searchsorted(np.asarray(MARGINS), z - 1e-12, side="left"))


def fit_operating_point(stats: CalibrationStats) -> OperatingPoint | None:
    """Temperature, threshold and band from pooled statistics; None without both classes."""
    if stats.n_pos == 0 or stats.n_neg == 0:
        return None
    temperature = TEMPERATURES[int(np.argmin(stats.nll_sum))]
    pos = np.asarray(stats.pos_at_or_above, dtype=np.float64)
    neg = np.asarray(stats.neg_at_or_above, dtype=np.float64)
    sens = pos / stats.n_pos
    spec = 1.0 - neg / stats.n_neg
    youden = sens + spec - 1.0
    best = float(youden.max())
    candidates = [i for i in range(len(MARGINS)) if youden[i] >= best - 1e-12]
    k = min(candidates, key=lambda i: (abs(MARGINS[i]), i))
    lo, hi = THRESHOLD_RANGE
    threshold = min(max(1.0 / (1.0 + math.exp(-MARGINS[k] / temperature)), lo), hi)
    band, band_acc, band_n = _band(stats, temperature, threshold)
    return OperatingPoint(
        temperature=float(temperature),
        threshold=float(threshold),
        uncertain_band=band,
        n_val=stats.n,
        val_sensitivity=float(sens[k]),
        val_specificity=float(spec[k]),
        band_accuracy=band_acc,
        band_slices=band_n,
    )


def _count_between(counts: tuple[int, ...], total: int, a: int, b: int) -> int:
    """Slices with margin in [MARGINS[a], MARGINS[b]) from cumulative ``>=`` counts."""

    def at(i: int) -> int:
        return total if i <= 0 else (0 if i >= len(counts) else counts[i])

    return at(a) - at(b)


def _band(stats: CalibrationStats, t: float, threshold: float) -> tuple[float, float | None, int]:
    """(band, validation accuracy inside it, slices inside it); see the module docstring."""
    k = _index_at(t * _logit(threshold))
    judged: list[tuple[float, float, int]] = []
    for b in BANDS:
        lo = _index_at(t * _logit(threshold - b)) if threshold - b > 0 else 0
        hi = _index_at(t * _logit(threshold + b)) if threshold + b < 1 else len(MARGINS)
        correct = _count_between(stats.pos_at_or_above, stats.n_pos, k, hi) + _count_between(
            stats.neg_at_or_above, stats.n_neg, lo, k
        )
        inside = _count_between(stats.pos_at_or_above, stats.n_pos, lo, hi) + _count_between(
            stats.neg_at_or_above, stats.n_neg, lo, hi
        )
        if inside >= BAND_MIN_SLICES:
            judged.append((b, correct / inside, inside))
    if not judged:
        return DEFAULT_BAND, None, 0
    low = [j for j in judged if j[1] < BAND_ACCURACY]
    b, acc, n = max(low) if low else min(judged)
    return b, acc, n
