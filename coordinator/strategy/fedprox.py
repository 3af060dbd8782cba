"""FedProx (Li et al. 2020): FedAvg aggregation on the server; the proximal term
``mu / 2 * ||w - w_global||^2`` is added to each node's local loss. The server's only part is to
send ``mu`` to the nodes in the round config.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.errors import ConfigError
from coordinator.strategy.base import register_strategy
from coordinator.strategy.fedavg import FedAvg

log = logging.getLogger(__name__)


@register_strategy
class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, mu: float = 0.01, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
        if mu < 0:
            raise ConfigError(f"fedprox: mu must be >= 0, not {mu}")
        if mu == 0:
            log.warning("fedprox with mu = 0 is plain FedAvg")
        self.mu = float(mu)  # proximal term weight applied by the nodes

    def round_config(self) -> dict[str, Any]:
        return {"mu": self.mu}
