"""Waiting in tests: poll a condition instead of sleeping a fixed time.

``wait_for`` returns the first truthy value of ``predicate`` or fails the test with what it was
waiting for and the tails of the logs that explain why; ``eventually`` answers True/False for
tests that assert on the outcome themselves.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    what: str = "condition",
    logs: Sequence[Path] = (),
    procs: Sequence[subprocess.Popen[Any]] = (),
    *,
    exit_grace_s: float = 0.0,
    poll_s: float = 0.05,
) -> Any:
    """Poll ``predicate`` until it returns something truthy and return it. When one of
    ``procs`` exits, wait ``exit_grace_s`` more (0: give up at once); on timeout raise
    AssertionError naming ``what``, with the last lines of each of ``logs``."""
    deadline = time.monotonic() + timeout
    watched = tuple(procs)
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if any(p.poll() is not None for p in watched):
            if exit_grace_s <= 0:
                break
            deadline = min(deadline, time.monotonic() + exit_grace_s)
            watched = ()
        time.sleep(poll_s)
    tails = "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists()
    )
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def eventually(predicate: Callable[[], Any], timeout: float = 15.0, poll_s: float = 0.02) -> bool:
    """True as soon as ``predicate`` is truthy, False when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(poll_s)
    return True
