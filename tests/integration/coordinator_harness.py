"""A real coordinator process with in-process scripted nodes: config, seed state, start, stop,
checks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import load_config
from coordinator.model_init import ensure_initial_version
from coordinator.state import State
from fl_protocol.errors import TransportError
from fl_protocol.transport import MqttSettings, PahoTransport
from tests.coordinator.fakes import FakeNode, NodeThread, tiny_source
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]


FEDERATION = "itest"


def write_config(tmp_path: Path, broker_url: str | None, **rounds: Any) -> Path:
    broker = f'url = "{broker_url}"' if broker_url else "embedded_port = 0"
    params = {
        "num_rounds": 2,
        "min_nodes": 2,
        "expected_nodes": ["a", "b", "c"],
        "round_timeout_s": 120.0,
        "chunk_timeout_s": 2.0,
        "codec": "fp16",
    }
    params.update(rounds)
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f'federation = "{FEDERATION}"\nstate_dir = "state"\n[broker]\n{broker}\n'
        f'[model]\narch = "cnn2d"\n[rounds]\n{lines}\n'
    )
    return path


def start_coordinator(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedscan.cli", "coordinator", "run", "--config", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def await_rounds(
    proc: subprocess.Popen[bytes], log: Path, done: Callable[[], bool], timeout: float, what: str
) -> None:
    """Wait until ``done`` (the nodes finished their rounds), then for the coordinator to exit
    0 by itself; its log tail is the failure message."""
    wait_for(done, timeout, what, (log,), (proc,), exit_grace_s=15.0)
    assert proc.wait(60) == 0, log.read_text()[-3000:]


def kill_if_running(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def make_nodes(port: int, names: str, samples: dict[str, int]) -> dict[str, NodeThread]:
    out = {}
    for name in names:
        transport = PahoTransport(
            MqttSettings(host="127.0.0.1", port=port, client_id=f"node-{name}")
        )
        node = FakeNode(transport, name, FEDERATION)
        out[name] = NodeThread(node, samples[name], final_version=2)
    return out


def status_json(config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedscan.cli",
            "coordinator",
            "status",
            "--config",
            str(config),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def accepted(state_dir: Path, round_id: int) -> int:
    if not (state_dir / "coordinator.sqlite").exists():
        return 0
    state = State(state_dir, readonly=True)
    try:
        return len(state.updates(round_id, accepted=True))
    finally:
        state.close()


def stop_all(threads: dict[str, NodeThread]) -> None:
    for t in threads.values():
        t.stop.set()
    for t in threads.values():
        t.join(10)
        t.node.t.disconnect()


def check_two_rounds(config: Path, threads: dict[str, NodeThread]) -> None:
    doc = status_json(config)
    assert doc["global_version"] == 2
    rounds = doc["rounds"]
    assert [(r["round"], r["outcome"], r["version_out"]) for r in rounds] == [
        (1, "aggregated", 1),
        (2, "aggregated", 2),
    ]
    for r in rounds:
        assert r["counted"] == ["a", "b", "c"] and r["rejected"] == {}
    for t in threads.values():
        assert not t.errors, t.errors
        m = t.node.manifest
        assert (m.version, m.round) == (2, None)
    # every node reassembles the very bytes the coordinator checkpointed as v2
    state = State(config.parent / "state", readonly=True)
    try:
        sha = {v.version: v.sha256 for v in state.versions()}[2]
    finally:
        state.close()
    assert threads["a"].node.manifest.payload.sha256 == sha


def seed_state(config: Path) -> Path:
    """Version 0 made in-process from numpy (tiny cnn2d-like state), so the subprocess needs
    no torch and starts in a second; test_cli_run_from_scratch covers the torch start."""
    cfg = load_config(config)
    state = State(cfg.state_dir)
    ensure_initial_version(state, cfg.model, tiny_source)
    state.close()
    return cfg.state_dir


SAMPLES = {"a": 10, "b": 20, "c": 30}


def start_nodes(threads: dict[str, NodeThread]) -> None:
    for t in threads.values():
        t.node.connect()
        t.start()


def all_finished(threads: dict[str, NodeThread]) -> bool:
    return all(t.finished.is_set() for t in threads.values())


def fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def check_federation(config: Path, threads: dict[str, NodeThread]) -> None:
    """The invariants of the module docstring."""
    check_two_rounds(config, threads)
    state = State(config.parent / "state", readonly=True)
    try:
        versions = state.versions()
        assert [v.version for v in versions] == [0, 1, 2]
        for v in versions:
            data = state.checkpoint_path(v.version).read_bytes()
            assert hashlib.sha256(data).hexdigest() == v.sha256
        rounds = state.rounds()
        assert [(r.id, r.version_in, r.version_out) for r in rounds] == [(1, 0, 1), (2, 1, 2)]
        nonces: list[str | None] = []
        for r in rounds:
            rows = state.updates(r.id)
            assert sorted(u.node for u in rows) == sorted(SAMPLES)
            assert all(u.accepted and u.counted_in_aggregate for u in rows), rows
            nonces += [u.nonce for u in rows]
            before, _ = state.load_checkpoint(r.version_in)
            after, _ = state.load_checkpoint(r.version_out or -1)
            total = sum(SAMPLES.values())
            for key, g in before.items():
                if key.endswith("num_batches_tracked"):
                    continue
                mean = sum(SAMPLES[n] * fp16(t.sent[r.id][key]) for n, t in threads.items())
                np.testing.assert_allclose(after[key], g + mean / total, rtol=0, atol=1e-6)
        assert len(set(nonces)) == len(nonces) == 2 * len(SAMPLES)
    finally:
        state.close()


class ResilientNode(NodeThread):
    """A ``NodeThread`` that, like a real node, keeps its update and carries on when the broker
    is away (a publish fails with TransportError) instead of dying."""

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._loop()
                return
            except TransportError:
                time.sleep(0.5)  # pending update kept; resent once the broker is back
            except BaseException as exc:  # surfaced by the test
                self.errors.append(exc)
                return


def make_resilient_nodes(port: int, chunk_size: int = 16 * 1024) -> dict[str, NodeThread]:
    out: dict[str, NodeThread] = {}
    for name, n in SAMPLES.items():
        transport = PahoTransport(
            MqttSettings(host="127.0.0.1", port=port, client_id=f"node-{name}", reconnect_max_s=2)
        )
        node = FakeNode(transport, name, FEDERATION)
        out[name] = ResilientNode(node, n, final_version=2, chunk_size=chunk_size)
    return out
