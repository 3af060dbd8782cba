"""A coordinator killed at any phase resumes without losing or double-counting updates.

The crash is injected in-process through the service's phase hook (an exception that unwinds
everything, like a kill: nothing after it runs, the in-memory inbox is lost, the transport is
dropped without a clean disconnect). A new service on the same state directory then takes
over; nodes behave like real ones and resend every update that was not acknowledged. The final
global model must be bit-identical to an uninterrupted run. (tests/integration has the same
with a real SIGKILL of a coordinator subprocess.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.service import CoordinatorService
from tests.coordinator.fakes import make_delta, tiny_source
from tests.coordinator.world import World

SAMPLES = {"a": 10, "b": 30, "c": 60}


class Crash(BaseException):
    """Unwinds like a SIGKILL: not an Exception, so no handler on the way catches it."""


def crash_at(phase: str, nth: int) -> Any:
    seen = 0

    def hook(p: str) -> None:
        nonlocal seen
        if p == phase:
            seen += 1
            if seen == nth:
                raise Crash(p)

    return hook


def drive(w: World) -> None:
    """One turn of the nodes: send this round's update once, resend it until acknowledged."""
    for i, (name, n) in enumerate(SAMPLES.items()):
        node = w.nodes[name]
        if not node.manifests or node.manifest.round is None:
            continue
        rnd = node.manifest.round.round
        if rnd not in node.pending:
            node.send_update(make_delta(rnd * 10 + i), n)
            continue
        ack = node.last_ack(rnd)
        if ack is None or ack.status not in ("complete", "duplicate"):
            node.resend(rnd)
    w.service.step()


def run_federation(tmp_path: Path, strategy: str, crash: tuple[str, int] | None) -> World:
    w = World(tmp_path, strategy=strategy, num_rounds=2)
    crashed = False
    w.new_service(hook=crash_at(*crash) if crash else None)
    for _ in range(40):
        try:
            if not w.service.machine.done and w.service.machine.current is None:
                w.service.start()
            drive(w)
        except Crash:
            crashed = True
            w.service.state.close()
            w.service.transport.drop()  # type: ignore[attr-defined]
            w.new_service()
            w.service.start()
        if w.service.done:
            break
    assert w.service.done, "federation did not finish"
    assert crashed == (crash is not None), "the crash phase was never reached"
    return w


CRASHES = [
    ("round_opened", 1),
    ("round_published", 1),
    ("update_spooled", 2),
    ("update_recorded", 1),
    ("update_recorded", 3),
    ("aggregating", 1),
    ("checkpoint_written", 1),
    ("aggregate_committed", 1),
    ("round_opened", 2),
    ("checkpoint_written", 2),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    """Final global weights of uninterrupted runs."""
    out = {}
    for strategy in ("fedadam", "fedavg"):
        w = run_federation(tmp_path_factory.mktemp(strategy), strategy, None)
        out[strategy] = w.service.state.load_checkpoint(2)[0]
    return out


@pytest.mark.parametrize(("phase", "nth"), CRASHES)
def test_crash_at_each_phase_resumes_to_the_same_model(
    tmp_path: Path, reference: dict[str, dict[str, np.ndarray]], phase: str, nth: int
) -> None:
    """FedAdam (server state in the checkpoint) after a crash at ``phase``: same v2, each
    node counted exactly once per round, one row per version."""
    w = run_federation(tmp_path, "fedadam", (phase, nth))
    state = w.service.state
    assert [v.version for v in state.versions()] == [0, 1, 2]
    for round_id in (1, 2):
        rows = state.updates(round_id)
        assert sorted(u.node for u in rows if u.counted_in_aggregate) == ["a", "b", "c"]
        assert state.round(round_id).outcome == "aggregated"
    final = state.load_checkpoint(2)[0]
    for key, value in reference["fedadam"].items():
        np.testing.assert_array_equal(final[key], value, err_msg=key)
    assert w.nodes["a"].manifest.version == 2 and w.nodes["a"].manifest.round is None


def test_fedavg_crash_between_checkpoint_and_commit(
    tmp_path: Path, reference: dict[str, dict[str, np.ndarray]]
) -> None:
    """The orphan checkpoint written before the crash is recomputed, not trusted."""
    w = run_federation(tmp_path, "fedavg", ("checkpoint_written", 1))
    final = w.service.state.load_checkpoint(2)[0]
    for key, value in reference["fedavg"].items():
        np.testing.assert_array_equal(final[key], value, err_msg=key)


def test_restart_after_the_last_round_only_republishes(tmp_path: Path) -> None:
    """A finished federation started again publishes the final model and does nothing else."""
    w = run_federation(tmp_path, "fedavg", None)
    w.service.close()
    again = CoordinatorService(
        w.cfg,
        w.broker.transport("coordinator"),
        model_source=tiny_source,
        clock=w.clock,
    )
    again.start()
    assert again.done and [v.version for v in again.state.versions()] == [0, 1, 2]
    assert w.nodes["b"].manifest.version == 2 and w.nodes["b"].manifest.round is None
