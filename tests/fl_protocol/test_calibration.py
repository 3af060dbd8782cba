"""Operating point from aggregate validation statistics: temperature, threshold, band."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_protocol.calibration import (
    DEFAULT_BAND,
    MARGINS,
    TEMPERATURES,
    CalibrationError,
    CalibrationStats,
    OperatingPoint,
    calibration_stats,
    combine,
    fit_operating_point,
)


def _logits(z: np.ndarray) -> np.ndarray:
    return np.stack([np.zeros_like(z), z], axis=1)


def _overconfident(n: int, seed: int, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z0) but logits scale x too large: the fitted T is ~scale."""
    rng = np.random.default_rng(seed)
    z0 = rng.normal(0.0, 1.5, size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z0))).astype(np.int64)
    return _logits(scale * z0), y


def test_temperature_recovers_overconfidence_and_stats_are_counts_only() -> None:
    """Logits 4x too confident: the NLL-minimising grid temperature is near 4; the summary
    holds counts and sums on the fixed grids only, and round-trips through a dict."""
    logits, y = _overconfident(4000, seed=1)
    s = calibration_stats(logits, y)
    assert len(s.nll_sum) == len(TEMPERATURES) and len(s.pos_at_or_above) == len(MARGINS)
    assert s.n_pos + s.n_neg == 4000 and s.pos_at_or_above[0] <= s.n_pos
    op = fit_operating_point(s)
    assert op is not None and 3.0 <= op.temperature <= 5.5
    assert CalibrationStats.from_dict(s.to_dict()) == s


def test_node_sums_equal_the_pooled_statistics() -> None:
    """Three nodes' summaries summed give the same operating point as one pooled summary."""
    logits, y = _overconfident(900, seed=2)
    parts = [calibration_stats(logits[i::3], y[i::3]) for i in range(3)]
    pooled = calibration_stats(logits, y)
    total = combine(parts)
    assert total is not None
    assert total.pos_at_or_above == pooled.pos_at_or_above
    assert total.nll_sum == pytest.approx(pooled.nll_sum)
    assert fit_operating_point(total) == fit_operating_point(pooled)


def test_threshold_moves_to_the_best_balanced_accuracy() -> None:
    """A model whose covid margins are all shifted down by 2: the threshold follows, so
    sensitivity and specificity are both high on the validation data."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=600)
    z = np.where(y == 1, 1.0, -5.0) + rng.normal(0, 0.7, size=600)  # boundary near -2
    op = fit_operating_point(calibration_stats(_logits(z), y))
    assert op is not None
    assert op.threshold < 0.5
    assert op.val_sensitivity > 0.95 and op.val_specificity > 0.95
    boundary = op.temperature * math.log(op.threshold / (1 - op.threshold))
    assert -3.5 < boundary < -0.5


def test_band_widens_for_an_unsure_model_and_metadata_is_valid() -> None:
    """Random scores near the threshold: the band is the widest candidate; a separable model
    gets the narrowest; metadata values parse as the node expects."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=400)
    noisy = fit_operating_point(calibration_stats(_logits(rng.normal(0, 0.3, 400)), y))
    z = np.where(y == 1, 6.0, -6.0) + rng.normal(0, 0.5, size=400)
    clean = fit_operating_point(calibration_stats(_logits(z), y))
    assert noisy is not None and clean is not None
    assert noisy.uncertain_band >= 0.2 and clean.uncertain_band <= 0.1
    meta = clean.metadata()
    assert 0 < float(meta["fedscan.threshold"]) < 1
    assert 0.01 <= float(meta["fedscan.temperature"]) <= 100
    assert 0 <= float(meta["fedscan.uncertain_band"]) < 0.5
    assert OperatingPoint.from_dict(clean.to_dict()) == clean


def test_one_class_or_bad_stats_are_refused() -> None:
    """Only one class: no operating point; a malformed summary raises CalibrationError."""
    s = calibration_stats(_logits(np.array([1.0, 2.0])), np.array([1, 1]))
    assert fit_operating_point(s) is None
    d = s.to_dict()
    with pytest.raises(CalibrationError):
        CalibrationStats.from_dict({**d, "grid": "other"})
    with pytest.raises(CalibrationError):
        CalibrationStats.from_dict({**d, "pos_at_or_above": [5] * len(MARGINS)})
    tiny = calibration_stats(_logits(np.array([-1.0, 1.0])), np.array([0, 1]))
    op = fit_operating_point(tiny)
    assert op is not None and op.uncertain_band == DEFAULT_BAND
