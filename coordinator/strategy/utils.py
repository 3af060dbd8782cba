"""Pure numpy math shared by the aggregation strategies (no I/O, no state).

Weights and deltas are ``dict[str, np.ndarray]``; results come back in the global tensor's
dtype. Counters (integer tensors, and BatchNorm ``num_batches_tracked`` which the weights
format carries as float32) are not parameters: averaging them is meaningless, so they advance by
the largest rounded delta any node reported (see :func:`integer_step`) and do not count in
norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Weights = dict[str, np.ndarray]


COUNTER_SUFFIXES = ("num_batches_tracked",)


def is_integer(array: np.ndarray) -> bool:
    """True for int / uint / bool tensors."""
    return bool(np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_)


def is_counter(key: str, array: np.ndarray) -> bool:
    """True for counters that are not averaged: integer tensors, and BatchNorm
    ``num_batches_tracked`` even when stored as float32 (export.weights stores every tensor as
    float32)."""
    return is_integer(array) or key.endswith(COUNTER_SUFFIXES)


def l2_norm(tensors: Mapping[str, np.ndarray] | Iterable[np.ndarray]) -> float:
    """Global L2 norm over all tensors; for a mapping, counters are left out."""
    if isinstance(tensors, Mapping):
        values: Iterable[np.ndarray] = (v for k, v in tensors.items() if not is_counter(k, v))
    else:
        values = tensors
    total = 0.0
    for t in values:
        if is_integer(t):
            continue
        flat = np.asarray(t, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def weighted_accumulate(acc: np.ndarray, delta: np.ndarray, weight: float) -> None:
    """``acc += weight * delta`` in place, without a temporary the size of the tensor in f64."""
    if delta.dtype == acc.dtype:
        acc += weight * delta
    else:
        acc += weight * delta.astype(acc.dtype, copy=False)


def integer_step(global_value: np.ndarray, max_delta: np.ndarray | None) -> np.ndarray:
    """New value of a counter: global + the largest (rounded) node delta, never below 0.

    ``max_delta`` None means no node sent this tensor: keep the global value.
    """
    if max_delta is None:
        return global_value.copy()
    step = np.rint(np.asarray(max_delta, dtype=np.float64))
    out = np.maximum(np.asarray(global_value, dtype=np.float64) + step, 0)
    return np.asarray(out, dtype=global_value.dtype)  # 0-d stays an array, not a scalar


def capped_weights(claims: Sequence[float], max_share: float) -> list[float]:
    """Aggregation weights from self-reported sample counts, no node above ``max_share`` of
    the total.

    The largest claims are cut to one common ceiling ``T`` (water-filling), the others keep
    their claim: ``T = max_share * sum(min(claim, T))``. So a node that claims 1,000,000 samples
    weighs at most as much as ``max_share / (1 - max_share)`` times all the others together
    (0.5: as much as all of them). When even equal weights are above ``max_share`` (fewer than
    ``1 / max_share`` nodes), every node gets the same weight, the smallest claim.
    """
    n = len(claims)
    values = [float(c) for c in claims]
    if n == 0 or max_share >= 1.0 or max(values) <= max_share * sum(values):
        return values
    if n * max_share <= 1.0:
        return [min(values)] * n
    order = sorted(values)
    k = 1  # how many of the largest claims are cut to T
    while k < n and k * max_share < 1.0:
        kept = order[: n - k]
        ceiling = max_share * sum(kept) / (1.0 - k * max_share)
        if kept[-1] <= ceiling <= order[n - k]:
            return [min(c, ceiling) for c in values]
        k += 1
    return [min(values)] * n  # not reached: some k always fits when n * max_share > 1


def apply_delta(global_value: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``global + delta`` in the global tensor's dtype (float tensors only)."""
    out = np.asarray(global_value, dtype=np.float64) + np.asarray(delta, dtype=np.float64)
    return np.asarray(out, dtype=global_value.dtype)


def weighted_mean(deltas: list[Mapping[str, np.ndarray]], weights: list[float]) -> Weights:
    """Reference (non-streaming) weighted mean, for tests and small cases."""
    total = float(sum(weights))
    keys = set().union(*(d.keys() for d in deltas)) if deltas else set()
    out: Weights = {}
    for k in sorted(keys):
        pairs = [(d[k], w) for d, w in zip(deltas, weights, strict=True) if k in d]
        sub_total = sum(w for _, w in pairs) or total
        acc = np.zeros(np.shape(pairs[0][0]), dtype=np.float64)
        for v, w in pairs:
            acc += np.asarray(v, np.float64) * w
        out[k] = acc / sub_total
    return out


def trim_count(n: int, trim_ratio: float) -> int:
    """How many values are cut from EACH end of n sorted values: floor(ratio * n), but at least
    one when ``trim_ratio > 0`` and n >= 3 (with 3 nodes and ratio 0.2, floor gives 0 and a
    "trimmed" mean would cut nothing: one hostile node would count fully)."""
    k = math.floor(trim_ratio * n)
    if trim_ratio > 0:
        k = max(k, 1)
    # never cut everything: at least one value must remain in the middle
    return max(0, min(k, (n - 1) // 2))


def trimmed_mean(stack: np.ndarray, trim_ratio: float) -> np.ndarray:
    """Coordinate-wise trimmed mean along axis 0 (the nodes axis), as float64.

    Each coordinate drops its ``k`` smallest and ``k`` largest values, ``k = trim_count``.
    ``stack`` is scratch: it is sorted in place (no copy: memory stays one stack).
    """
    n = stack.shape[0]
    k = trim_count(n, trim_ratio)
    if k == 0:
        return np.asarray(stack.mean(axis=0, dtype=np.float64))
    stack.sort(axis=0)
    return np.asarray(stack[k : n - k].mean(axis=0, dtype=np.float64))


def adam_update(
    x: np.ndarray,
    pseudo_grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One FedAdam server step (Reddi et al. 2021, Algorithm 2), as written in the paper.

    With ``g = pseudo_grad = -mean(delta)``:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``x = x - eta m / (sqrt(v) + tau)``.
    The paper uses no bias correction; neither do we. Returns (x_new, m_new, v_new).
    """
    g = np.asarray(pseudo_grad, dtype=np.float64)
    m_new = beta1 * np.asarray(m, np.float64) + (1.0 - beta1) * g
    v_new = beta2 * np.asarray(v, np.float64) + (1.0 - beta2) * np.square(g)
    x_new = np.asarray(x, np.float64) - eta * m_new / (np.sqrt(v_new) + tau)
    return (
        np.asarray(x_new, dtype=x.dtype),
        np.asarray(m_new, dtype=np.float32),
        np.asarray(v_new, dtype=np.float32),
    )
