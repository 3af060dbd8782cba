"""Shared pieces of the reliability suite: invariant checks, a file writer, process sampling.

The invariants every fault test ends with:

- ``audit_cli`` runs the operator's proof, `fedscan node audit --json --wait`, in a subprocess:
  every inbox file has exactly one recorded outcome once the node caught up;
- ``check_sqlite`` runs ``PRAGMA integrity_check`` (and ``quick_check`` on the WAL);
- ``one_prediction_per_slice`` checks the predictions table never holds a slice twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def fedscan_cmd(*args: str) -> list[str]:
    """The `fedscan` console script of this checkout, as a subprocess argv."""
    return [sys.executable, "-m", "fedscan.cli", *args]


def audit_cli(toml: Path, wait_s: float = 60.0) -> dict[str, Any]:
    """`fedscan node audit --config TOML --json --wait S` as an operator runs it."""
    result = subprocess.run(
        fedscan_cmd("node", "audit", "--config", str(toml), "--json", "--wait", str(wait_s)),
        cwd=REPO,
        capture_output=True,
        timeout=wait_s + 60,
    )
    if result.returncode != 0:
        raise AssertionError(f"audit exited {result.returncode}: {result.stderr.decode()[-2000:]}")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def check_sqlite(db: Path) -> None:
    """The database opens and passes ``PRAGMA integrity_check``."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    assert rows == [("ok",)], f"{db.name}: integrity_check says {rows[:5]}"


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, tuple(params)).fetchall()
    finally:
        con.close()


def one_prediction_per_slice(db: Path) -> int:
    """Number of predicted slices; fails if any (sop, frame) appears twice."""
    dup = query(
        db,
        "SELECT sop_instance_uid, frame, COUNT(*) FROM predictions GROUP BY 1, 2 HAVING COUNT(*)>1",
    )
    assert not dup, f"{len(dup)} slices predicted more than once"
    return int(query(db, "SELECT COUNT(*) FROM predictions")[0][0])


@dataclass
class FileWriter:
    """Writes files into an inbox from a thread, like a PACS sending a series.

    ``make(i, path)`` writes file ``i`` and returns its SOPInstanceUID; ``pause_every`` files it
    sleeps ``pause_s`` (bursts). ``written`` holds (path, uid) of every finished file.
    """

    folder: Path
    count: int
    make: Callable[[int, Path], str]
    name: str = "s{:05d}.dcm"
    pause_every: int = 0
    pause_s: float = 0.0
    written: list[tuple[Path, str]] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="file-writer", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> FileWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 300.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("file writer did not finish")
        if self.error is not None:
            raise self.error

    @property
    def n_written(self) -> int:
        with self._lock:
            return len(self.written)

    def _run(self) -> None:
        try:
            for i in range(self.count):
                path = self.folder / self.name.format(i)
                uid = self.make(i, path)
                with self._lock:
                    self.written.append((path, uid))
                if self.pause_every and (i + 1) % self.pause_every == 0:
                    time.sleep(self.pause_s)
        except BaseException as exc:  # surfaced by join()
            self.error = exc


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@dataclass
class ProcessSampler:
    """Samples RSS, open fds and threads of a process every ``every_s`` in a thread."""

    pid: int
    every_s: float = 2.0
    samples: list[dict[str, float]] = field(default_factory=list)
    progress: Callable[[], int] = lambda: 0  # e.g. predictions so far, stored with each sample

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> ProcessSampler:
        self._thread.start()
        return self

    def sample(self) -> dict[str, float] | None:
        try:
            s = {
                "t_s": round(time.monotonic() - self._t0, 2),
                "rss_kib": float(rss_kib(self.pid)),
                "fds": float(open_fds(self.pid)),
                "threads": float(threads_of(self.pid)),
                "done": float(self.progress()),
            }
        except (OSError, AssertionError):
            return None  # the process is gone
        self.samples.append(s)
        return s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)
