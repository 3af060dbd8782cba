"""Coordinate-wise trimmed mean (Yin et al. 2018): a robust aggregate that ignores the
``k = max(1, floor(trim_ratio * n))`` largest and smallest values of every coordinate, so up to
``k`` poisoned or broken updates cannot pull the model arbitrarily far. At least one value is
cut at each end, so it needs 3 updates: ``rounds.min_nodes >= 3`` is required at start-up
(``coordinator.config``), and a round that still ends with fewer (impossible with that quorum)
is averaged plainly with a warning.

Unlike FedAvg this cannot stream: every coordinate needs the values of all nodes. Memory stays
bounded anyway, because ``aggregate`` reads the on-disk spool *tensor by tensor*: at any time it
holds one tensor from each node (largest tensor x number of nodes), never whole models.
``accumulate`` / ``finish`` (for in-memory use) must keep every delta and so hold one model per
node; the coordinator always goes through ``aggregate``. The mean is unweighted: sample counts
are self-reported, and letting one node weigh more would undo the robustness.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.errors import ConfigError, StateError
from coordinator.strategy.base import Strategy, UpdateSource, register_strategy
from coordinator.strategy.utils import (
    Weights,
    apply_delta,
    integer_step,
    is_counter,
    trim_count,
    trimmed_mean,
)

log = logging.getLogger(__name__)


class _InMemory:
    """An in-memory delta seen through the ``UpdateSource`` interface."""

    def __init__(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        self._delta = dict(delta)
        self._n = num_samples

    @property
    def num_samples(self) -> int:
        return self._n

    def keys(self) -> list[str]:
        return list(self._delta)

    def tensor(self, key: str) -> np.ndarray:
        return self._delta[key]

    def load(self) -> dict[str, np.ndarray]:
        return dict(self._delta)


@register_strategy
class TrimmedMean(Strategy):
    name = "trimmed_mean"
    needs_all_updates = True

    def __init__(self, trim_ratio: float = 0.2) -> None:
        if not 0.0 < trim_ratio < 0.5:
            raise ConfigError(f"trimmed_mean: trim_ratio must be in (0, 0.5), not {trim_ratio}")
        self.trim_ratio = trim_ratio  # share of values cut at EACH end of every coordinate
        self._global: Mapping[str, np.ndarray] | None = None
        self._buffered: list[_InMemory] = []

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self._global = global_weights
        self._buffered = []

    def accumulate(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        if self._global is None:
            raise StateError("accumulate() before begin_round()")
        self._buffered.append(_InMemory(delta, num_samples))

    def finish(self) -> Weights:
        if self._global is None:
            raise StateError("finish() before begin_round()")
        global_weights, updates = self._global, self._buffered
        self._global, self._buffered = None, []
        return self.aggregate(global_weights, updates)

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[UpdateSource]
    ) -> Weights:
        n = len(updates)
        if trim_count(n, self.trim_ratio) == 0:
            log.warning("trimmed_mean: %d updates, nothing can be cut (plain mean)", n)
        key_sets = [set(u.keys()) for u in updates]
        out: Weights = {}
        for key, g in global_weights.items():
            holders = [u for u, ks in zip(updates, key_sets, strict=True) if key in ks]
            if not holders:
                out[key] = g.copy()
                continue
            if is_counter(key, g):
                max_delta = holders[0].tensor(key)
                for u in holders[1:]:
                    max_delta = np.maximum(max_delta, u.tensor(key))
                out[key] = integer_step(g, max_delta)
                continue
            # filled row by row: one node's tensor at a time besides the stack
            stack = np.empty((len(holders), *g.shape), dtype=np.float32)
            for row, u in enumerate(holders):
                stack[row] = u.tensor(key)
            out[key] = apply_delta(g, trimmed_mean(stack, self.trim_ratio))
            del stack
        return out
