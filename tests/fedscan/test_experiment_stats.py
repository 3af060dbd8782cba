"""The experiment's statistics: patient-level verdicts, ECE, bootstrap intervals over patients."""

from __future__ import annotations

import numpy as np
import pytest

from fedscan.experiment import stats


def test_patient_verdict_is_the_mean_of_its_slices() -> None:
    """Patient A (2 covid slices, scores .9/.3) and B (1 non-covid slice, .2): one verdict each."""
    _, groups = stats.patient_index(["A", "A", "B"])
    labels, probs = stats.patient_level(np.array([1, 1, 0]), np.array([0.9, 0.3, 0.2]), groups)
    assert labels.tolist() == [1, 0]
    assert probs == pytest.approx([0.6, 0.2])
    m = stats.binary_metrics(labels, probs)
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0


def test_ece_is_zero_when_calibrated_and_large_when_overconfident() -> None:
    """Labels drawn from the stated probabilities: ECE near 0; all 0.99 at a 50% rate: ~0.49."""
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert stats.ece(y, p) < 0.02
    y2 = rng.integers(0, 2, size=2000)
    assert stats.ece(y2, np.full(2000, 0.99)) == pytest.approx(0.49, abs=0.03)
    curve = stats.reliability(y, p)
    assert len(curve) == 10 and sum(b["n"] for b in curve) == 20000


def test_paired_interval_is_narrower_than_either_arm_and_excludes_zero_for_a_real_gain() -> None:
    """Arm B = arm A with 10% of slices flipped to correct: the paired difference's interval
    lies above 0 although the two arms' own intervals overlap."""
    rng = np.random.default_rng(1)
    n_pat, per = 120, 4
    patients = [f"p{i}" for i in range(n_pat) for _ in range(per)]
    y = np.repeat(rng.integers(0, 2, size=n_pat), per)
    correct_a = rng.random(len(y)) < 0.65
    correct_b = correct_a | (rng.random(len(y)) < 0.15)
    pa = np.where(correct_a, np.where(y == 1, 0.8, 0.2), np.where(y == 1, 0.2, 0.8))
    pb = np.where(correct_b, np.where(y == 1, 0.8, 0.2), np.where(y == 1, 0.2, 0.8))
    _, groups = stats.patient_index(patients)
    stat = stats.arm_statistic(y, {"b": pb, "a": pa}, {}, [("b", "a")])
    ci = stats.bootstrap(groups, stat, n_boot=300, seed=0)
    diff = ci["b-a.accuracy"]
    assert diff["lo"] > 0
    assert diff["estimate"] == pytest.approx(
        ci["b.accuracy"]["estimate"] - ci["a.accuracy"]["estimate"]
    )
    width_a = ci["a.accuracy"]["hi"] - ci["a.accuracy"]["lo"]
    assert diff["hi"] - diff["lo"] < width_a
    assert ci["a.accuracy"]["hi"] > ci["b.accuracy"]["lo"]  # unpaired intervals overlap
    assert "b.patient_accuracy" in ci and "b.ece" in ci


def test_thresholds_per_slice_and_formatting() -> None:
    """A per-slice threshold array decides each slice; intervals print as percent."""
    y = np.array([1, 0, 1, 0])
    p = np.array([0.4, 0.3, 0.9, 0.6])
    m = stats.binary_metrics(y, p, np.array([0.35, 0.35, 0.7, 0.7]))
    assert m["accuracy"] == 1.0
    assert stats.fmt_ci({"estimate": 0.5, "lo": 0.4, "hi": 0.61}) == "50.0 [40.0, 61.0]"
    assert stats.fmt_ci(None) == "-"
