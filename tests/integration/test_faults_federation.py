"""Fault injection on the federation: the coordinator SIGKILLed at each phase of a round, and
Mosquitto stopped mid-round, with simulated nodes speaking the real protocol over Mosquitto.

The coordinator is a real process: `tests.integration.coordinator_driver` (what `fedscan
coordinator run` runs, plus a phase hook that sends SIGKILL to its own process at an exact
point), restarted as the real `fedscan coordinator run`. The nodes (tests/coordinator/fakes.py
``NodeThread`` on ``PahoTransport``) fetch each global model, send a small random delta and
resend until acknowledged, as real nodes do.

Invariants checked after every fault (``check_federation``), from the coordinator's SQLite
state and checkpoints:

- both rounds complete, every node counted in each (``coordinator status``);
- every accepted update is counted exactly once in exactly one round: one row per (round,
  node), all marked ``counted_in_aggregate``, no update nonce in two rows, and each new global
  model equals the FedAvg of exactly the deltas the nodes sent (a double-counted or lost
  update would move the weights);
- global versions only move forward: 0, 1, 2, each round's input is the previous output, each
  checkpoint's SHA-256 is the one recorded, and the nodes end on the last one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from coordinator.state import State
from fedscan.brokers.mosquitto import Mosquitto
from tests.conftest import ReliabilityProfile
from tests.helpers.wait import wait_for
from tests.integration.coordinator_harness import (
    accepted,
    all_finished,
    await_rounds,
    check_federation,
    kill_if_running,
    make_resilient_nodes,
    seed_state,
    start_coordinator,
    start_nodes,
    stop_all,
    write_config,
)
from tests.integration.fault_helpers import REPO

pytestmark = pytest.mark.integration


def start_driver(config: Path, kill_at: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = (sys.executable, "-m", "tests.integration.coordinator_driver")
    with log.open("ab") as out:
        return subprocess.Popen(
            [*driver, "--config", str(config), "--kill-at", kill_at],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


KILL_POINTS = [
    pytest.param("update_spooled:2", id="collecting-spool-written-row-not"),
    pytest.param("update_recorded:1", id="collecting-recorded-ack-not-sent"),
    pytest.param("aggregating:1", id="aggregating-nothing-written"),
    pytest.param("checkpoint_written:1", id="aggregating-checkpoint-not-committed"),
    pytest.param("aggregate_committed:1", id="aggregated-next-round-not-opened"),
    pytest.param("round_published:2", id="round-2-just-published"),
]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_coordinator_sigkilled_at_a_phase_resumes_and_counts_each_update_once(
    tmp_path: Path, mosquitto: Mosquitto, kill_at: str
) -> None:
    """kill -9 of the coordinator at one phase of a round, restart as `fedscan coordinator
    run`: both rounds complete and the invariants hold."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}")
    seed_state(config)
    log = tmp_path / "coordinator.log"
    threads = make_resilient_nodes(mosquitto.port)
    proc = start_driver(config, kill_at, log)
    try:
        start_nodes(threads)
        wait_for(lambda: proc.poll() is not None, 60, f"the kill at {kill_at}")
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        assert not all_finished(threads)
        proc = start_coordinator(config, log)
        await_rounds(proc, log, lambda: all_finished(threads), 90, "two rounds after the restart")
    finally:
        kill_if_running(proc)
        stop_all(threads)
    check_federation(config, threads)


def test_coordinator_sigkilled_twice_while_aggregating(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A second kill during the recomputed aggregation (checkpoint rewritten, not committed),
    then a clean restart: still one version per round, each update counted once."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}")
    seed_state(config)
    log = tmp_path / "coordinator.log"
    threads = make_resilient_nodes(mosquitto.port)
    proc = start_driver(config, "checkpoint_written:1", log)
    try:
        start_nodes(threads)
        for again in ("checkpoint_written:1", None):
            wait_for(partial(exited, proc), 60, "a kill while aggregating")
            assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
            state = State(config.parent / "state", readonly=True)
            try:
                assert state.round(1).status == "aggregating"
            finally:
                state.close()
            if again is not None:
                proc = start_driver(config, again, log)
        proc = start_coordinator(config, log)
        await_rounds(proc, log, lambda: all_finished(threads), 90, "two rounds after the restarts")
    finally:
        kill_if_running(proc)
        stop_all(threads)
    check_federation(config, threads)


@pytest.fixture
def persistent_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with persistence, so retained models and queued messages survive a stop."""
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    extra = f"persistence true\npersistence_location {broker_dir}/\nautosave_interval 1\n"
    if os.geteuid() == 0:  # otherwise mosquitto drops to user "mosquitto", who cannot write here
        extra += "user root\n"
    broker = Mosquitto(broker_dir, extra=extra)
    try:
        yield broker.start()
    finally:
        broker.stop()


def broker_outage_mid_round(tmp_path: Path, broker: Mosquitto, outage_s: float) -> None:
    """Stop Mosquitto once round 1 has its first accepted update (the others mid-transfer:
    small chunks), keep it down ``outage_s``, start it again: the rounds complete."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{broker.port}")
    state_dir = seed_state(config)
    log = tmp_path / "coordinator.log"
    threads = make_resilient_nodes(broker.port, chunk_size=64)
    proc = start_coordinator(config, log)
    try:
        start_nodes(threads)
        wait_for(
            lambda: accepted(state_dir, 1) >= 1,
            60,
            "a first update",
            (log,),
            (proc,),
            exit_grace_s=15.0,
        )
        broker.stop()
        at_stop = accepted(state_dir, 1)
        time.sleep(outage_s)
        assert proc.poll() is None, "the coordinator died while the broker was away"
        broker.start()
        timeout = 120 + outage_s
        await_rounds(
            proc, log, lambda: all_finished(threads), timeout, "two rounds after the outage"
        )
    finally:
        kill_if_running(proc)
        stop_all(threads)
    check_federation(config, threads)
    print(f"outage {outage_s:.0f}s with {at_stop} of 3 updates of round 1 accepted")


def test_mosquitto_down_mid_round_then_back(
    tmp_path: Path, persistent_mosquitto: Mosquitto, reliability: ReliabilityProfile
) -> None:
    """A short broker outage mid-round (5 s; 30 s with --full)."""
    broker_outage_mid_round(tmp_path, persistent_mosquitto, reliability.outage_s)


@pytest.mark.slow
def test_mosquitto_down_30_s_mid_round_then_back(
    tmp_path: Path, persistent_mosquitto: Mosquitto
) -> None:
    """The issue's 30 s outage (slow: half a minute of waiting)."""
    broker_outage_mid_round(tmp_path, persistent_mosquitto, 30.0)
