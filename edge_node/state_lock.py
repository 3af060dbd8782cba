"""One node per state directory: an exclusive ``flock`` on ``<state_dir>/node.lock``.

Two daemons on one state directory would share one SQLite file, one ``api.port`` and one
upload spool, and answer each other's files: the second must not start. The lock file holds
the pid of the process that holds the lock, so the refusal can name it. ``flock`` locks die
with the process (a SIGKILL or power cut leaves no stale lock to clean by hand); the file
itself stays and is simply locked again by the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from edge_node.errors import ConfigError
from edge_node.layout import StateLayout


class StateLock:
    """Held from ``acquire()`` until ``release()`` (or the process ends)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = StateLayout(Path(state_dir)).lock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise ``ConfigError`` naming the pid that holds it (exit 2)."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "another process"
            raise ConfigError(
                f"state dir {self.path.parent} in use by {who} "
                "(one node per state directory: stop it or give this one its own [paths] state_dir)"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no pid of a process that no longer holds the lock
        os.close(fd)  # closing the descriptor drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
