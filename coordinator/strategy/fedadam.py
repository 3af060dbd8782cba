"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The server treats the negated mean delta as a pseudo-gradient ``g = -mean(delta)`` and takes an
Adam step with it::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    x = x - eta * m / (sqrt(v) + tau)

with ``m_0 = 0`` and ``v_0 = tau^2`` (the paper asks ``v_{-1} >= tau^2``), no bias correction.
The mean delta is computed by streaming exactly as in FedAvg (weighted by samples unless
``weighted=False``, the paper's plain mean). The moments are server state: they are returned
by ``state_dict`` and checkpointed with every global version, so a restarted coordinator
continues the same optimizer trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.errors import ConfigError
from coordinator.strategy.base import register_strategy
from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.utils import Weights, adam_update


@register_strategy
class FedAdam(FedAvg):
    name = "fedadam"

    def __init__(
        self,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighted: bool = True,
    ) -> None:
        super().__init__(weighted=weighted)
        if eta <= 0 or tau <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ConfigError("fedadam: need eta > 0, tau > 0, 0 <= beta1, beta2 < 1")
        self.eta = eta  # server learning rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau  # adaptivity / numerical floor
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def finish(self) -> Weights:
        out = super().finish()
        self.steps += 1
        return out

    def server_step(self, key: str, g: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        m = self.m.get(key, np.zeros(g.shape, np.float32))
        v = self.v.get(key, np.full(g.shape, self.tau**2, np.float32))
        new, self.m[key], self.v[key] = adam_update(
            g, -mean_delta, m, v, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau
        )
        return new

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"m/{k}": v for k, v in self.m.items()}
        state.update({f"v/{k}": v for k, v in self.v.items()})
        state["steps"] = np.array([self.steps], dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v/")}
        steps = state.get("steps")
        self.steps = int(steps[0]) if steps is not None else 0
