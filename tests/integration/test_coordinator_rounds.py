"""The coordinator as a real `fedscan coordinator run` subprocess with simulated nodes (threads
on PahoTransport) completing rounds through a real broker: the embedded one, and Mosquitto with
a SIGKILL of the coordinator mid-round."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from coordinator.config import load_config
from coordinator.service import read_broker_port
from coordinator.state import State
from fedscan.brokers.mosquitto import Mosquitto
from tests.coordinator.fakes import NodeThread
from tests.helpers.wait import wait_for
from tests.integration.coordinator_harness import (
    accepted,
    all_finished,
    await_rounds,
    check_two_rounds,
    kill_if_running,
    make_nodes,
    seed_state,
    start_coordinator,
    stop_all,
    write_config,
)

pytestmark = pytest.mark.integration


def run_two_rounds(config: Path, tmp_path: Path, port: int | None, timeout: float) -> None:
    log = tmp_path / "coordinator.log"
    state_dir = config.parent / "state"
    proc = start_coordinator(config, log)
    threads: dict[str, NodeThread] = {}
    try:
        if port is None:  # embedded broker: its port appears once it listens
            wait_for(
                lambda: read_broker_port(state_dir) is not None,
                timeout,
                "broker",
                (log,),
                (proc,),
                exit_grace_s=15.0,
            )
            port = read_broker_port(state_dir)
        assert port is not None
        threads = make_nodes(port, "abc", {"a": 10, "b": 20, "c": 30})
        for t in threads.values():
            t.node.connect()
            t.start()
        await_rounds(proc, log, lambda: all_finished(threads), timeout, "two rounds")
    finally:
        kill_if_running(proc)
        stop_all(threads)
    check_two_rounds(config, threads)


def test_two_rounds_on_the_embedded_broker(tmp_path: Path) -> None:
    """No broker configured: the coordinator starts the embedded broker on loopback and three
    nodes complete two rounds through it."""
    config = write_config(tmp_path, None)
    seed_state(config)
    run_two_rounds(config, tmp_path, None, 60)


def test_two_rounds_on_mosquitto(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The same two rounds through a real Mosquitto."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}")
    seed_state(config)
    run_two_rounds(config, tmp_path, mosquitto.port, 60)


@pytest.mark.slow
def test_cli_run_from_scratch_builds_version_0_with_torch(tmp_path: Path) -> None:
    """`fedscan coordinator run` on an empty state_dir builds cnn2d's version 0 with torch
    (tens of seconds on a loaded machine, hence slow), then runs two rounds."""
    config = write_config(tmp_path, None)
    run_two_rounds(config, tmp_path, None, 240)
    assert (tmp_path / "state" / "model.json").exists()
    meta = State(tmp_path / "state", readonly=True).checkpoint_metadata(0)
    assert (meta["arch"], meta["init"], meta["format"]) == ("cnn2d", "random", "fedscan.weights/1")


def test_coordinator_killed_mid_round_resumes_on_mosquitto(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """SIGKILL after two of three updates are recorded; the third node sends while the
    coordinator is down (Mosquitto queues it for the coordinator's persistent session); the
    restarted coordinator resumes round 1, counts every node once, and finishes round 2."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}")
    cfg = load_config(config)
    seed_state(config)
    log = tmp_path / "coordinator.log"
    threads = make_nodes(mosquitto.port, "abc", {"a": 10, "b": 20, "c": 30})
    proc = start_coordinator(config, log)
    try:
        for name in "ab":
            threads[name].node.connect()
            threads[name].start()
        wait_for(
            lambda: accepted(cfg.state_dir, 1) >= 2,
            60,
            "two updates",
            (log,),
            (proc,),
            exit_grace_s=15.0,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert State(cfg.state_dir, readonly=True).round(1).status == "collecting"
        threads["c"].node.connect()
        threads["c"].start()
        wait_for(lambda: 1 in threads["c"].node.pending, 30, "node c to send its update")
        proc = start_coordinator(config, log)
        await_rounds(proc, log, lambda: all_finished(threads), 90, "two rounds")
    finally:
        kill_if_running(proc)
        stop_all(threads)
    check_two_rounds(config, threads)


def test_mosquitto_restarted_mid_round_the_round_still_completes(tmp_path: Path) -> None:
    """Mosquitto (with persistence) is stopped and started again after two updates: the
    coordinator and the nodes reconnect, the retained global model survives, the third node
    then gets it and reports, and both rounds complete with every node counted once."""
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    extra = f"persistence true\npersistence_location {broker_dir}/\nautosave_interval 1\n"
    if os.geteuid() == 0:  # otherwise mosquitto drops to user "mosquitto", who cannot write here
        extra += "user root\n"
    with Mosquitto(broker_dir, extra=extra) as broker:
        config = write_config(tmp_path, f"mqtt://127.0.0.1:{broker.port}")
        state_dir = seed_state(config)
        log = tmp_path / "coordinator.log"
        threads = make_nodes(broker.port, "abc", {"a": 10, "b": 20, "c": 30})
        proc = start_coordinator(config, log)
        try:
            for name in "ab":
                threads[name].node.connect()
                threads[name].start()
            wait_for(
                lambda: accepted(state_dir, 1) >= 2,
                60,
                "two updates",
                (log,),
                (proc,),
                exit_grace_s=15.0,
            )
            broker.stop()
            time.sleep(1.0)
            broker.start()
            threads["c"].node.connect()
            threads["c"].start()
            await_rounds(proc, log, lambda: all_finished(threads), 90, "two rounds")
        finally:
            kill_if_running(proc)
            stop_all(threads)
        check_two_rounds(config, threads)
