"""Child processes of the demo (broker, coordinator, nodes, trainings) and their clean-up.

Each child runs in its own session (process group), so a Ctrl-C in the terminal reaches only
the demo, which then stops the children in reverse start order: SIGTERM to the whole group
(the node's training worker included), a grace period, then SIGKILL. On Linux every child also
gets SIGTERM from the kernel if the demo itself dies without cleaning up (PR_SET_PDEATHSIG).
Output goes to one log file per child.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedscan.demo.errors import DemoError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 20.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def fedscan_argv(*args: str) -> list[str]:
    """``fedscan ARGS`` run by this interpreter (the same virtual environment)."""
    return [sys.executable, "-m", "fedscan.cli", *args]


def child_env(threads: int = 1) -> dict[str, str]:
    """The environment of every child: unbuffered output, thread pools capped (two cores)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Supervisor:
    """Starts children and guarantees they are gone when the ``with`` block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path | None = None, threads: int = 1
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as fh:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=child_env(threads),
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            except OSError as exc:
                raise DemoError(f"cannot start {name}: {exc}") from exc
        child = Child(name, list(argv), log_path, proc)
        self.children.append(child)
        log.debug("started %s (pid %d)", name, proc.pid)
        return child

    def stop(self, child: Child, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the child's process group, wait, SIGKILL what is left; its exit code."""
        if child.poll() is None:
            self._signal_group(child, signal.SIGTERM)
            try:
                child.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", child.name, grace_s)
        # the group may outlive its leader (a training worker): always sweep it
        self._signal_group(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5)
        return child.poll()

    @staticmethod
    def _signal_group(child: Child, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every child, newest first (nodes before the coordinator before the broker)."""
        running = [c for c in reversed(self.children)]
        for c in running:  # ask everyone first, so they drain in parallel
            if c.poll() is None:
                self._signal_group(c, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.1, deadline - time.monotonic()))
        for c in running:
            self.stop(c, grace_s=0.1)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def run_to_end(
    sup: Supervisor, jobs: Sequence[tuple[str, Sequence[str]]], timeout_s: float
) -> dict[str, Child]:
    """Run several commands in parallel and wait for all of them (killed after ``timeout_s``)."""
    children = {name: sup.start(name, argv) for name, argv in jobs}
    deadline = time.monotonic() + timeout_s
    for child in children.values():
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            sup.stop(child, grace_s=2.0)
    return children
