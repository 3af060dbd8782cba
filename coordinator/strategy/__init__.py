"""Aggregation strategies, one per module, registered by name and built by one factory.

- ``base``: the ``Strategy`` contract (begin_round / accumulate / finish, state for restarts),
  the registry (``register_strategy``) and the factory (``create_strategy``).
- ``utils``: the pure math the strategies share (weighted accumulation, norms, Adam step).
- ``fedavg``, ``fedavgm``, ``fedprox``, ``fedadam``, ``trimmed_mean``: the strategies.
"""

from coordinator.strategy.base import (
    SequentialSource,
    Strategy,
    UpdateSource,
    create_strategy,
    list_strategies,
    register_strategy,
    source_tensors,
)

__all__ = [
    "SequentialSource",
    "Strategy",
    "UpdateSource",
    "create_strategy",
    "list_strategies",
    "register_strategy",
    "source_tensors",
]
