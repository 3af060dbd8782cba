"""FedAvgM: FedAvg with server momentum (Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification").

The weighted mean delta of the round (streamed exactly as in FedAvg) feeds a momentum buffer::

    v = beta * v + mean(delta)
    x = x + server_lr * v

``beta = 0`` and ``server_lr = 1`` is plain FedAvg. The buffer is server state, returned by
``state_dict`` and checkpointed with every global version, so a restarted coordinator continues
the same trajectory. Integer tensors (BatchNorm counters) follow FedAvg's rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.errors import ConfigError
from coordinator.strategy.base import register_strategy
from coordinator.strategy.fedavg import FedAvg


@register_strategy
class FedAvgM(FedAvg):
    name = "fedavgm"

    def __init__(self, beta: float = 0.9, server_lr: float = 1.0, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
        if not 0.0 <= beta < 1.0 or server_lr <= 0:
            raise ConfigError("fedavgm: need 0 <= beta < 1 and server_lr > 0")
        self.beta = beta  # momentum of the server's update direction
        self.server_lr = server_lr  # step size on the momentum buffer
        self.velocity: dict[str, np.ndarray] = {}

    def server_step(self, key: str, g: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        v = self.beta * self.velocity.get(key, np.zeros(g.shape, np.float32)) + mean_delta
        self.velocity[key] = v.astype(np.float32)
        return (g + self.server_lr * self.velocity[key]).astype(g.dtype)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"v/{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.velocity = {
            k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v/")
        }
