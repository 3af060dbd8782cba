"""Aggregation strategies: the base class, the registry and the one factory.

A strategy turns the accepted deltas of one round into the next global weights. The streaming
contract keeps memory at one model whatever the number of nodes::

    strategy.begin_round(global_weights)
    for update in accepted_updates:          # read from the disk spool one after the other
        strategy.accumulate(source_tensors(update), update.num_samples)
    new_global = strategy.finish()

``aggregate(global_weights, updates)`` runs exactly that over :class:`UpdateSource` objects.
:func:`source_tensors` is a lazy, read-only view of one update: each tensor is decoded from the
spool when it is looked up, so a strategy that folds ``delta[key]`` key by key (FedAvg and the
strategies built on it) never holds a whole decoded update, only one decoded tensor besides its
own state. ``accumulate`` also takes an ordinary in-memory mapping. Strategies that need every
update at once (trimmed mean) override ``aggregate`` to read the spool tensor by tensor across
all updates instead. Strategies register by name with :func:`register_strategy` and are built by
:func:`create_strategy`; an unknown name raises ``UnknownStrategyError`` listing the choices.
State that must survive a restart (FedAdam's moments) goes through ``state_dict`` /
``load_state_dict`` and is checkpointed next to the global weights.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np

from coordinator.errors import ConfigError, UnknownStrategyError
from coordinator.strategy.utils import Weights

log = logging.getLogger(__name__)

# modules holding the built-in strategies, imported on first use of the registry
_BUILTIN_MODULES = (
    "coordinator.strategy.fedavg",
    "coordinator.strategy.fedprox",
    "coordinator.strategy.fedadam",
    "coordinator.strategy.fedavgm",
    "coordinator.strategy.trimmed_mean",
)


class UpdateSource(Protocol):
    """One accepted update as the aggregator sees it (see ``coordinator.spool.SpoolFile``)."""

    @property
    def num_samples(self) -> int: ...

    def keys(self) -> Iterable[str]: ...

    def tensor(self, key: str) -> np.ndarray:
        """One float32 delta tensor, read on demand."""
        ...

    def load(self) -> dict[str, np.ndarray]:
        """The whole delta (float32)."""
        ...


@runtime_checkable
class SequentialSource(Protocol):
    """An update that can also be read front to back with one open file (``SpoolFile``)."""

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor, decoded one at a time as the iterator advances (the iterator keeps no
        reference to a tensor it has handed out)."""
        ...


class _StreamedItems(ItemsView[str, np.ndarray]):
    def __init__(self, view: _SourceTensors, source: SequentialSource) -> None:
        super().__init__(view)
        self._source = source

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return self._source.tensors()


class _SourceTensors(Mapping[str, np.ndarray]):
    """A read-only mapping over one update whose values are decoded on each lookup."""

    def __init__(self, source: UpdateSource) -> None:
        self._source = source
        self._keys = list(source.keys())
        self._key_set = frozenset(self._keys)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(key)
        return self._source.tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def items(self) -> ItemsView[str, np.ndarray]:
        """Tensor by tensor; one pass over one open file when the source can (a spool file)."""
        if isinstance(self._source, SequentialSource):
            return _StreamedItems(self, self._source)
        return super().items()


def source_tensors(source: UpdateSource) -> Mapping[str, np.ndarray]:
    """``source`` as a lazy mapping: ``m[key]`` decodes that one tensor (again on every lookup,
    so look each key up once and let the tensor go before the next)."""
    return _SourceTensors(source)


class Strategy(ABC):
    """Base of all strategies; subclasses set ``name`` and implement the streaming trio."""

    name: ClassVar[str] = ""
    # True when the strategy cannot stream (it reads every update tensor by tensor instead)
    needs_all_updates: ClassVar[bool] = False
    # True when updates count by their sample claims. The coordinator then hands each update
    # its CAPPED claim as ``num_samples`` (coordinator.aggregate.screen_updates); with False
    # every update arrives with num_samples = 1, so a strategy that weighs by samples must set
    # this to True (FedAvg and its subclasses do, from their ``weighted`` argument)
    weighted: bool = False

    @abstractmethod
    def begin_round(self, global_weights: Mapping[str, np.ndarray]) -> None:
        """Start aggregating deltas relative to ``global_weights`` (not modified)."""

    @abstractmethod
    def accumulate(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        """Fold one node's delta in; the delta may be released afterwards.

        ``delta`` may be lazy (:func:`source_tensors`): look each key up once, fold that tensor
        and drop it before the next, so a whole decoded delta never sits in memory. Never
        modify the tensors (an in-memory caller still owns them)."""

    @abstractmethod
    def finish(self) -> Weights:
        """The new global weights (every key of the global model)."""

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[UpdateSource]
    ) -> Weights:
        """Aggregate spooled updates; default: stream them one update after the other, each
        seen through :func:`source_tensors` (decoded tensor by tensor as ``accumulate`` reads)."""
        self.begin_round(global_weights)
        for update in updates:
            self.accumulate(source_tensors(update), update.num_samples)
        return self.finish()

    def round_config(self) -> dict[str, Any]:
        """Extra keys for the round config sent to nodes (FedProx's ``mu``)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-side state to checkpoint with the global weights (empty when stateless)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned; a stateless strategy ignores it."""
        if state:
            log.warning(
                "strategy %s keeps no state; ignoring %d saved tensors", self.name, len(state)
            )


S = TypeVar("S", bound=type[Strategy])
_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: S) -> S:
    """Class decorator: make ``cls`` available to :func:`create_strategy` under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_strategies() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def create_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build the strategy registered as ``name`` with its typed keyword arguments."""
    _load_builtins()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownStrategyError(
            f"unknown aggregation strategy {name!r}; choices: {', '.join(sorted(_REGISTRY))}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: bad arguments {sorted(kwargs)}: {exc}") from exc
