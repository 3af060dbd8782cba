"""Update validation: each refusal has its reason code; good updates pass and report a norm."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.config import ValidationConfig
from coordinator.errors import UpdateRejected
from coordinator.validate import (
    ModelSpec,
    check_node,
    check_round,
    norm_outliers,
    validate_update,
)

GLOBAL = {
    "conv.weight": np.ones((4, 3), np.float32),
    "fc.bias": np.ones(2, np.float32),
    "bn.num_batches_tracked": np.array(5, np.int64),
}
SPEC = ModelSpec.from_weights(GLOBAL)
POLICY = ValidationConfig(max_norm_ratio=10.0, max_abs_norm_ratio=1.0)


def _delta(scale: float = 0.01) -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.full((4, 3), scale, np.float32),
        "fc.bias": np.full(2, scale, np.float32),
    }


def _reason(delta: dict[str, np.ndarray], n: int = 10, norms: list[float] | None = None) -> str:
    with pytest.raises(UpdateRejected) as info:
        validate_update(delta, n, SPEC, POLICY, norms or [])
    return info.value.reason


def test_a_good_update_passes_and_its_norm_is_returned() -> None:
    """Float tensors present, counter optional: accepted, norm = sqrt(14 * 0.01^2)."""
    norm = validate_update(_delta(), 10, SPEC, POLICY, [])
    assert norm == pytest.approx(np.sqrt(14) * 0.01, rel=1e-5)
    with_counter = {**_delta(), "bn.num_batches_tracked": np.array(3.0, np.float32)}
    assert validate_update(with_counter, 10, SPEC, POLICY, []) == pytest.approx(norm)


def test_structural_refusals() -> None:
    """Wrong keys, shapes, dtypes, NaN / inf each have their own reason."""
    assert _reason({**_delta(), "extra": np.zeros(1, np.float32)}) == "unknown_keys"
    assert _reason({"conv.weight": _delta()["conv.weight"]}) == "missing_keys"
    assert _reason({**_delta(), "fc.bias": np.zeros(3, np.float32)}) == "shape"
    assert _reason({**_delta(), "fc.bias": np.zeros(2, np.int32)}) == "dtype"
    bad = _delta()
    bad["fc.bias"][0] = np.nan
    assert _reason(bad) == "not_finite"
    bad["fc.bias"][0] = np.inf
    assert _reason(bad) == "not_finite"


def test_sample_count_must_be_positive_and_bounded() -> None:
    assert _reason(_delta(), n=0) == "num_samples"
    assert _reason(_delta(), n=POLICY.max_num_samples + 1) == "num_samples"


def test_norm_cap_absolute_before_three_updates_then_median() -> None:
    """With < 3 accepted, the cap is the global weights' norm; then 10 x the median."""
    global_norm = SPEC.global_norm  # sqrt(14)
    assert global_norm == pytest.approx(np.sqrt(14))
    assert _reason(_delta(scale=1.5)) == "norm"  # norm 1.5 sqrt(14) > sqrt(14)
    validate_update(_delta(scale=0.9), 1, SPEC, POLICY, [0.1, 0.2])  # < 3 norms: absolute
    norms = [0.01, 0.02, 0.03]  # median 0.02 -> limit 0.2
    assert _reason(_delta(scale=0.1), norms=norms) == "norm"  # 0.37 > 0.2
    validate_update(_delta(scale=0.05), 1, SPEC, POLICY, norms)  # 0.19 passes


def test_trainable_only_spec_expects_only_the_announced_keys() -> None:
    """A head-only round expects fc.* only; conv.* is then an unknown key."""
    spec = ModelSpec.from_weights(GLOBAL, expected={"fc.bias"})
    assert validate_update({"fc.bias": np.zeros(2, np.float32)}, 1, spec, POLICY, []) == 0.0
    with pytest.raises(UpdateRejected, match="unknown_keys"):
        validate_update(_delta(), 1, spec, POLICY, [])


def test_round_and_node_checks() -> None:
    """Another round is stale, another federation refused, unlisted nodes refused."""
    check_round("f", "f", 3, 3)
    for args, reason in [(("f", "f", 2, 3), "stale"), (("f", "f", 3, None), "stale"),
                         (("f", "g", 3, 3), "wrong_federation")]:  # fmt: skip
        with pytest.raises(UpdateRejected) as info:
            check_round(*args)  # type: ignore[arg-type]
        assert info.value.reason == reason
    check_node("a", ())
    check_node("a", ("a", "b"))
    with pytest.raises(UpdateRejected, match="unknown_node"):
        check_node("c", ("a", "b"))


def test_norm_outliers_against_the_whole_round() -> None:
    """At aggregation the median of all accepted norms decides, independent of arrival order."""
    assert norm_outliers({"a": 1.0, "b": 50.0}, 10.0) == []  # too few for a median
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}, 10.0) == ["d"]
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 1.0}, 10.0) == []
