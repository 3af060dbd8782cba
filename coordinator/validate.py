"""Checks every update must pass before it counts; each refusal is an ``UpdateRejected`` with a
short reason code (logged with the node id, sent back in the "rejected" ack).

Reason codes: ``stale`` (round not open), ``wrong_federation``, ``unknown_node`` (not in the
expected list), ``unknown_keys`` / ``missing_keys``, ``shape``, ``dtype``, ``not_finite``,
``num_samples`` (not positive or above the cap), ``counter`` (a BatchNorm counter delta that is
not a whole number in [0, ``max_counter_step``]), ``norm`` (L2 norm out of line),
``norm_outlier`` (refused at aggregation time: its weighted contribution is out of line with the
other nodes', see :func:`contribution_outliers`).

The norm test compares an update with the median of the norms already accepted in the round
(``max_norm_ratio`` x median); with fewer than 3 accepted, a median means little, so an
absolute cap applies instead: ``max_abs_norm_ratio`` x the L2 norm of the global weights.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.config import ValidationConfig
from coordinator.errors import UpdateRejected
from coordinator.strategy.utils import is_counter, is_integer, l2_norm

MIN_FOR_MEDIAN = 3  # accepted updates needed before the median test replaces the absolute cap


@dataclass(frozen=True)
class ModelSpec:
    """What an update for the current global model must look like."""

    shapes: Mapping[str, tuple[int, ...]]
    integer_keys: frozenset[str]  # counters: may be omitted, float or integer deltas allowed
    expected_keys: frozenset[str]  # float tensors every update must carry
    global_norm: float

    @classmethod
    def from_weights(
        cls, weights: Mapping[str, np.ndarray], expected: Collection[str] | None = None
    ) -> ModelSpec:
        """``expected``: the keys announced in the round config (trainable-only rounds);
        None = every float tensor of the model."""
        integer = frozenset(k for k, v in weights.items() if is_counter(k, v))
        floats = frozenset(weights) - integer
        wanted = floats if expected is None else frozenset(expected) & floats
        return cls(
            shapes={k: tuple(v.shape) for k, v in weights.items()},
            integer_keys=integer,
            expected_keys=wanted,
            global_norm=l2_norm(weights),
        )

    @property
    def allowed_keys(self) -> frozenset[str]:
        return self.expected_keys | self.integer_keys


def check_round(
    federation: str, msg_federation: str, round_id: int, open_round: int | None
) -> None:
    if msg_federation != federation:
        raise UpdateRejected("wrong_federation", f"{msg_federation!r}")
    if open_round is None or round_id != open_round:
        raise UpdateRejected("stale", f"round {round_id} is not open (open: {open_round})")


def check_node(node_id: str, expected_nodes: Collection[str]) -> None:
    if expected_nodes and node_id not in expected_nodes:
        raise UpdateRejected("unknown_node", "not in rounds.expected_nodes")


def check_num_samples(num_samples: int, max_num_samples: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise UpdateRejected("num_samples", "not an integer")
    if not 0 < num_samples <= max_num_samples:
        raise UpdateRejected("num_samples", f"{num_samples} not in [1, {max_num_samples}]")


def check_delta(
    delta: Mapping[str, np.ndarray], spec: ModelSpec, max_counter_step: int = 1_000_000
) -> float:
    """Keys, shapes, dtypes, finiteness and counter bounds; returns the delta's L2 norm."""
    unknown = set(delta) - spec.allowed_keys
    if unknown:
        raise UpdateRejected("unknown_keys", f"{len(unknown)} tensors not in the round's model")
    missing = spec.expected_keys - set(delta)
    if missing:
        raise UpdateRejected("missing_keys", f"{len(missing)} expected tensors absent")
    for key, value in delta.items():
        if not isinstance(value, np.ndarray):
            raise UpdateRejected("dtype", f"{key}: not an array")
        if tuple(value.shape) != spec.shapes[key]:
            raise UpdateRejected("shape", f"{key}: {tuple(value.shape)} != {spec.shapes[key]}")
        if key in spec.integer_keys:
            if not (np.issubdtype(value.dtype, np.floating) or is_integer(value)):
                raise UpdateRejected("dtype", f"{key}: {value.dtype}")
        elif not np.issubdtype(value.dtype, np.floating):
            raise UpdateRejected("dtype", f"{key}: {value.dtype} is not floating point")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UpdateRejected("not_finite", f"{key} has NaN or inf")
        if key in spec.integer_keys:
            check_counter(key, value, max_counter_step)
    # counters are not parameters: their deltas (batches run) do not count in the norm
    return l2_norm(v for k, v in delta.items() if k not in spec.integer_keys)


def check_counter(key: str, value: np.ndarray, max_step: int) -> None:
    """A counter delta (batches run) is a whole number in [0, ``max_step``]: counters skip the
    norm test, so without this bound one node could push them to 3.4e38 and the next global
    model would hold inf."""
    v = np.asarray(value, dtype=np.float64)
    if v.size == 0:
        return
    if not (np.all(v >= 0) and np.all(v <= max_step) and np.all(v == np.rint(v))):
        raise UpdateRejected("counter", f"{key}: not a whole number in [0, {max_step}]")


def check_norm(
    norm: float, spec: ModelSpec, accepted_norms: Sequence[float], policy: ValidationConfig
) -> None:
    median = statistics.median(accepted_norms) if len(accepted_norms) >= MIN_FOR_MEDIAN else 0.0
    if median > 0:
        limit = policy.max_norm_ratio * median
        if norm > limit:
            raise UpdateRejected(
                "norm", f"{norm:.4g} > {policy.max_norm_ratio} x median {median:.4g}"
            )
    else:
        limit = policy.max_abs_norm_ratio * max(spec.global_norm, policy.min_abs_norm)
        if norm > limit:
            raise UpdateRejected(
                "norm",
                f"{norm:.4g} > {policy.max_abs_norm_ratio} x global norm {spec.global_norm:.4g}",
            )


def validate_update(
    delta: Mapping[str, np.ndarray],
    num_samples: int,
    spec: ModelSpec,
    policy: ValidationConfig,
    accepted_norms: Sequence[float],
) -> float:
    """Every content check of one update; returns its norm or raises ``UpdateRejected``."""
    check_num_samples(num_samples, policy.max_num_samples)
    norm = check_delta(delta, spec, policy.max_counter_step)
    check_norm(norm, spec, accepted_norms, policy)
    return norm


def norm_outliers(norms: Mapping[str, float], max_norm_ratio: float) -> list[str]:
    """Nodes whose norm exceeds ``max_norm_ratio`` x the median of the whole round (run once
    at aggregation so the verdict does not depend on arrival order); empty with < 3 updates."""
    if len(norms) < MIN_FOR_MEDIAN:
        return []
    median = statistics.median(norms.values())
    if median <= 0:
        return []
    return sorted(n for n, v in norms.items() if v > max_norm_ratio * median)


def contribution_outliers(contributions: Mapping[str, float], max_ratio: float) -> list[str]:
    """Nodes whose weighted contribution to the aggregate (weight share x delta norm) is above
    ``max_ratio`` x the median contribution of the OTHER nodes of the round.

    Leave-one-out, so it works from 2 updates on (of two, only the larger can be refused) and a
    hostile node never sits in its own reference. Judged on what actually reaches the model: a
    node that claims many samples must keep its norm down accordingly. Run once, at
    aggregation, over every accepted update, so the verdict does not depend on arrival order.
    """
    out = []
    for node, value in contributions.items():
        others = [v for n, v in contributions.items() if n != node]
        if not others:
            continue
        median = statistics.median(others)
        if median > 0 and value > max_ratio * median:
            out.append(node)
    return sorted(out)
