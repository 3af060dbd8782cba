"""Series verdict rules: every registered rule, the uncertain band, weak evidence."""

from __future__ import annotations

import pytest

from edge_node.errors import ConfigError
from edge_node.series.verdict import RULES, decide


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_separates_clear_series(rule: str) -> None:
    """A series whose slices are all clearly covid is covid, all clearly not is non_covid,
    under every rule of the registry."""
    assert decide([0.95, 0.9, 0.97], rule=rule, threshold=0.5, band=0.1).verdict == "covid"
    assert decide([0.05, 0.1, 0.02], rule=rule, threshold=0.5, band=0.1).verdict == "non_covid"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_no_slices_is_uncertain(rule: str) -> None:
    """A series with no usable slice probability (none, or NaN only) is uncertain, score None."""
    v = decide([float("nan")], rule=rule, threshold=0.5, band=0.1)
    assert (v.verdict, v.score, v.n_slices) == ("uncertain", None, 0)


def test_top_k_mean_uses_the_highest_slices_and_the_band() -> None:
    """top_k_mean averages the k highest P(covid): two lesion slices among many clean ones make
    the series covid, while the overall mean would not; a score within the band is uncertain."""
    probs = [0.9, 0.85] + [0.1] * 10
    v = decide(probs, rule="top_k_mean", threshold=0.5, band=0.1, top_k=2)
    assert v.verdict == "covid" and v.score == pytest.approx(0.875) and v.rule == "top_k_mean(k=2)"
    assert decide(probs, rule="mean", threshold=0.5, band=0.1).verdict == "non_covid"
    near = decide([0.55, 0.58], rule="top_k_mean", threshold=0.5, band=0.1, top_k=2)
    assert near.verdict == "uncertain" and near.threshold == 0.5 and near.band == 0.1


def test_majority_compares_a_fraction_with_one_half() -> None:
    """majority counts slices at or above the model threshold (calibrated 0.3 here) and
    compares that share with 0.5."""
    v = decide([0.35, 0.4, 0.2, 0.9], rule="majority", threshold=0.3, band=0.1)
    assert v.score == pytest.approx(0.75) and v.threshold == 0.5 and v.verdict == "covid"


def test_majority_of_uncertain_slices_is_an_uncertain_series() -> None:
    """Twelve slices at P(covid) 0.55 (threshold 0.5, band 0.1) are each uncertain; all lie
    above the threshold, but the series must not be reported as a confident covid call."""
    v = decide([0.55] * 12, rule="majority", threshold=0.5, band=0.1)
    assert v.score == pytest.approx(1.0) and v.verdict == "uncertain"
    mixed = decide([0.55] * 5 + [0.9] * 7, rule="majority", threshold=0.5, band=0.1)
    assert mixed.verdict == "covid"  # most slices are confident covid calls


def test_unknown_rule_lists_the_choices() -> None:
    """A typo in [series] rule is a ConfigError naming every rule."""
    with pytest.raises(ConfigError, match="top_k_mean"):
        decide([0.5], rule="avg", threshold=0.5, band=0.1)
