"""Shared pieces of `fedscan bench federation`: machine facts, Mosquitto, the coordinator process.

The broker parts use the real Mosquitto harness (``fedscan.brokers.mosquitto``, shared with the
integration tests); a missing binary turns into a skip reason instead of an error.
The coordinator runs as a real ``fedscan coordinator run`` process; its version 0 is made here
with the real model zoo (as the integration tests do), so the process itself needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedscan.brokers.mosquitto import Mosquitto, MosquittoNotFound, mosquitto_binary

REPO_ROOT = Path(__file__).resolve().parents[3]
FEDERATION = "bench"


class PartSkipped(Exception):
    """A part of the benchmark cannot run here (no Mosquitto, no data); the reason is kept."""


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else ""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "open_files_limit": [soft, hard],
    }
    with contextlib.suppress(OSError, ValueError):
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gb"] = round(int(mem[1]) / 1024 / 1024, 1)
    for module in ("numpy", "torch", "paho.mqtt", "safetensors"):
        with contextlib.suppress(ImportError, AttributeError):
            info[module.split(".")[0]] = __import__(module, fromlist=["__version__"]).__version__
    binary = mosquitto_binary()
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
            info["mosquitto"] = (out.stdout or out.stderr).splitlines()[0].strip()
    return info


def raise_open_files_limit(want: int = 4096) -> list[int]:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (100 MQTT clients + spools need fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return list(resource.getrlimit(resource.RLIMIT_NOFILE))


# -- Mosquitto -----------------------------------------------------------------------------------


def start_mosquitto(workdir: Path, binary: str | None) -> Mosquitto:
    """A started Mosquitto (dev config, free loopback port); PartSkipped when the binary is
    missing or the broker does not start."""
    try:
        broker = Mosquitto(workdir, binary=binary)
    except MosquittoNotFound as exc:
        raise PartSkipped(str(exc)) from None
    try:
        return broker.start()
    except RuntimeError as exc:
        raise PartSkipped(f"mosquitto did not start: {exc}") from None


# -- waiting and logs ----------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    alive: Callable[[], bool] = lambda: True,
    poll_s: float = 0.1,
) -> Any:
    """Poll ``predicate`` until truthy; RuntimeError on timeout or when ``alive`` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not alive():
            value = predicate()  # it may have finished just before exiting
            if value:
                return value
            raise RuntimeError(f"a process exited while waiting for {what}")
        time.sleep(poll_s)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_time(line: str) -> float | None:
    """Epoch seconds of a ``%(asctime)s`` log line (``2024-05-01 12:00:00,123 ...``)."""
    try:
        base = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
        return base + int(line[20:23]) / 1000.0
    except (ValueError, OverflowError):
        return None


def first_log_time(path: Path, needle: str) -> float | None:
    """Time of the first line of the log at ``path`` containing ``needle``."""
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            return log_time(line)
    return None


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


# -- coordinator ---------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float) -> int | None:
    """SIGTERM (a daemon drains), SIGKILL after ``grace_s``; the exit code, None if not started."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def coordinator_keys(work: Path) -> Path:
    """The coordinator's Ed25519 pair in ``work/keys`` (made once): it signs the global
    manifests, and every bench node trusts its public key (a node never federates without)."""
    from fl_protocol.signing import generate_keypair, save_private_key, save_public_key

    keys = work / "keys"
    if not (keys / "coordinator.pub").exists():
        keys.mkdir(parents=True, exist_ok=True)
        private, public = generate_keypair()
        save_private_key(private, keys / "coordinator.key")
        save_public_key(public, keys / "coordinator.pub")
    return keys


class CoordinatorProcess:
    """``fedscan coordinator run`` on ``folder/coordinator.toml``; state read from its SQLite."""

    def __init__(self, folder: Path, broker_url: str, arch: str, **rounds: Any) -> None:
        from coordinator.config import load_config
        from coordinator.model_init import ensure_initial_version, torch_model_source
        from coordinator.state import State

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.config = folder / "coordinator.toml"
        lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in rounds.items())
        key = coordinator_keys(folder.parent) / "coordinator.key"
        self.config.write_text(
            f'federation = "{FEDERATION}"\nstate_dir = "state"\nsigning_key = "{key}"\n'
            f'[broker]\nurl = "{broker_url}"\n[model]\narch = "{arch}"\n[rounds]\n{lines}\n'
        )
        cfg = load_config(self.config)
        state = State(cfg.state_dir)  # version 0 made here: the process needs no torch
        try:
            ensure_initial_version(state, cfg.model, torch_model_source)
        finally:
            state.close()
        self.db = cfg.database
        self.log = folder / "coordinator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CoordinatorProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "fedscan.cli", "coordinator", "run", "--config"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, str(self.config)],
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def rounds(self) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT id, status, opened_at, closed_at, version_in, version_out, outcome "
            "FROM rounds ORDER BY id"
        )
        keys = ("round", "status", "opened_at", "closed_at", "version_in", "version_out", "outcome")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def updates(self, round_id: int) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT node, accepted, reason, num_samples, counted_in_aggregate, received_at "
            "FROM updates WHERE round = ? ORDER BY received_at",
            (round_id,),
        )
        keys = ("node", "accepted", "reason", "num_samples", "counted", "received_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def closed(self, n_rounds: int) -> bool:
        rounds = self.rounds()
        return len(rounds) >= n_rounds and all(r["status"] == "closed" for r in rounds[:n_rounds])

    def stop(self) -> int | None:
        return stop_process(self.proc, 30.0)
