"""A coordinator over an in-memory broker with scripted nodes: what the coordinator tests run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig, RoundsConfig
from coordinator.service import CoordinatorService
from fl_protocol.transport import MemoryBroker
from tests.coordinator.fakes import (
    FEDERATION,
    FakeClock,
    FakeNode,
    tiny_source,
)


def make_cfg(tmp_path: Path, **rounds: Any) -> CoordinatorConfig:
    params: dict[str, Any] = {
        "num_rounds": 2,
        "min_nodes": 2,
        "expected_nodes": ("a", "b", "c"),
        "round_timeout_s": 60.0,
        "chunk_timeout_s": 5.0,
        "codec": "fp32",
    }
    params.update(rounds)
    return CoordinatorConfig(
        state_dir=tmp_path / "state", federation=FEDERATION, rounds=RoundsConfig(**params)
    )


class World:
    """A memory broker, a coordinator service on a fake clock, and fake nodes."""

    def __init__(self, tmp_path: Path, **rounds: Any) -> None:
        self.broker = MemoryBroker()
        self.clock = FakeClock()
        self.cfg = make_cfg(tmp_path, **rounds)
        self.nodes = {n: FakeNode(self.broker.transport(f"node-{n}"), n).connect() for n in "abcd"}
        self.service = self.new_service()

    def new_service(self, hook: Any = None) -> CoordinatorService:
        service = CoordinatorService(
            self.cfg,
            self.broker.transport("coordinator"),
            model_source=tiny_source,
            clock=self.clock,
            hook=hook,
        )
        self.service = service
        return service

    def step(self) -> None:
        for _ in range(5):
            self.service.step()


def expected_fedavg(
    base: dict[str, np.ndarray], deltas: list[tuple[dict[str, np.ndarray], int]]
) -> dict[str, np.ndarray]:
    total = sum(n for _, n in deltas)
    out = {}
    for k, v in base.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v + max(float(d[k]) for d, _ in deltas)
        else:
            out[k] = v + sum(d[k] * n for d, n in deltas) / total
    return out
