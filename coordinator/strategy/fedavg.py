"""FedAvg (McMahan et al. 2017): the new global model is the global model plus the average of
the node deltas weighted by each node's number of training samples.

Streaming: one float32 accumulator per tensor (``sum_i n_i * delta_i``) and the total weight
per tensor. An update is folded in tensor by tensor: from the spool (``Strategy.aggregate``
hands a lazy :func:`coordinator.strategy.source_tensors` view) each tensor is decoded, added
weighted into its accumulator and dropped before the next is decoded, so memory is the global
model plus the accumulator plus one decoded tensor, however many nodes report. Every tensor
goes through the same float32 ``acc += n * delta`` in the same node order as a whole-delta
fold, so the result is bit-identical to accumulating whole decoded deltas.
A node may omit tensors (a "trainable only" round); each tensor is averaged over the nodes
that sent it and left unchanged when none did.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.errors import StateError
from coordinator.strategy.base import Strategy, register_strategy
from coordinator.strategy.utils import Weights, integer_step, is_counter, weighted_accumulate


@register_strategy
class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted  # False: every node counts the same (plain mean)
        self._global: Mapping[str, np.ndarray] | None = None
        self._acc: dict[str, np.ndarray] = {}
        self._weight: dict[str, float] = {}
        self._int_max: dict[str, np.ndarray] = {}
        self.num_updates = 0

    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        self._global = global_weights
        self._acc = {}
        self._weight = {}
        self._int_max = {}
        self.num_updates = 0

    def accumulate(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        if self._global is None:
            raise StateError("accumulate() before begin_round()")
        w = float(num_samples) if self.weighted else 1.0
        for key, value in delta.items():
            # a lazy delta decodes each tensor as the loop advances: drop it before the next
            self._fold(key, self._global[key], value, w)
            del value
        self.num_updates += 1

    def _fold(self, key: str, g: np.ndarray, value: np.ndarray, w: float) -> None:
        """Fold tensor ``key`` (global value ``g``) of one node's delta in with weight ``w``."""
        if is_counter(key, g):
            prev = self._int_max.get(key)
            self._int_max[key] = value.copy() if prev is None else np.maximum(prev, value)
            return
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = np.zeros(g.shape, dtype=np.float32)
        weighted_accumulate(acc, value, w)
        self._weight[key] = self._weight.get(key, 0.0) + w

    def mean_delta(self) -> dict[str, np.ndarray]:
        """The weighted mean delta per float tensor that any node sent (turns the accumulators
        into means in place: call once, from ``finish``)."""
        out: dict[str, np.ndarray] = {}
        for key, acc in self._acc.items():
            acc /= self._weight[key]
            out[key] = acc
        self._acc = {}
        return out

    def integer_tensors(self) -> Weights:
        """New values of the integer counters (every integer tensor of the global model)."""
        if self._global is None:
            raise StateError("finish() before begin_round()")
        return {
            k: integer_step(g, self._int_max.get(k))
            for k, g in self._global.items()
            if is_counter(k, g)
        }

    def finish(self) -> Weights:
        if self._global is None:
            raise StateError("finish() before begin_round()")
        out = self.integer_tensors()
        mean = self.mean_delta()
        for key, g in self._global.items():
            if key in out:
                continue
            d = mean.pop(key, None)
            # no node trained this tensor: no step (a server optimiser keeps its state)
            out[key] = g.copy() if d is None else self.server_step(key, g, d)
        self._global = None
        return out

    def server_step(self, key: str, g: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """The new value of tensor ``key`` from its global value and the round's mean delta
        (``mean_delta`` is the accumulator, free to reuse). FedAvg: ``g + mean_delta``;
        server optimisers (FedAvgM, FedAdam) override this step only."""
        mean_delta += g  # reuse the accumulator buffer for the result
        return mean_delta.astype(g.dtype, copy=False)
