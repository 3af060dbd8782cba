"""Crash-loop guard: a file the node process died decoding is not decoded forever.

A native decoder (python-gdcm) can abort the whole process on a file, and the catch-up scan
would hand that file over again at every start. While a watched file is decoded,
``<state_dir>/decoding/<path tag>.json`` names it with its attempt count; at the next start
:meth:`CrashGuard.recover` reports each file the process died on ``DECODE_ATTEMPTS`` times, and
the pipeline quarantines it (reason ``crashed_decoder``). One death may be a SIGKILL or power
cut that merely happened during its decode, so a first death only counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CRASHED_DECODER = "crashed_decoder"  # quarantine reason of a file the process died decoding
DECODE_ATTEMPTS = 2  # deaths while decoding one file before it is quarantined as the cause


@dataclass(frozen=True)
class Crashed:
    """A file the process died decoding ``attempts`` times: to be quarantined."""

    path: Path
    attempts: int
    size: int
    mtime: float


class CrashGuard:
    """Decoding markers in ``folder``; ``file_ref`` names a file in logs (a path tag)."""

    def __init__(self, folder: Path, file_ref: Callable[[Path], str]) -> None:
        self.folder = folder
        self.file_ref = file_ref
        self._attempts: dict[str, int] = {}  # path -> deaths while decoding it so far

    def marker_name(self, tag: str) -> Path:
        return self.folder / f"{tag}.json"

    def mark(self, path: Path, tag: str) -> Path | None:
        """Durably (for a process crash: written and renamed, no fsync) note that ``path`` is
        being decoded; returns the marker for :meth:`done`, None when it could not be written."""
        marker = self.marker_name(tag)
        tmp = marker.with_name(f".{marker.name}.tmp")
        record = {"path": str(path), "attempt": self._attempts.get(str(path), 0) + 1}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, marker)
        except OSError as exc:  # a full disk must not stop decoding: only the guard is lost
            tmp.unlink(missing_ok=True)
            log.error(
                "decoding marker not written for file %s: %s", self.file_ref(path), exc.strerror
            )
            return None
        return marker

    def done(self, path: Path, marker: Path) -> None:
        """The file is past decoding (its outcome stored, or prepared): forget it."""
        marker.unlink(missing_ok=True)
        self._attempts.pop(str(path), None)

    def recover(self) -> list[Crashed]:
        """At start, before the catch-up scan: the files the process died decoding
        ``DECODE_ATTEMPTS`` times (their markers removed; the caller quarantines them). A first
        death is remembered and the file decoded again."""
        if not self.folder.is_dir():
            return []
        crashed: list[Crashed] = []
        for marker in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(marker.read_text())
                path, attempt = Path(str(record["path"])), int(record["attempt"])
            except (OSError, ValueError, KeyError, TypeError):
                log.error("unreadable decoding marker %s removed", marker.name)
                marker.unlink(missing_ok=True)
                continue
            try:
                st = path.stat()
            except OSError:  # gone since: nothing to record, nothing to scan again
                marker.unlink(missing_ok=True)
                continue
            if attempt < DECODE_ATTEMPTS:
                # The marker stays (rewritten with the next attempt when decoding starts), so
                # a death before that still counts this one.
                self._attempts[str(path)] = attempt
                log.warning(
                    "file %s was being decoded when the node died (%d of %d): decoding again",
                    self.file_ref(path),
                    attempt,
                    DECODE_ATTEMPTS,
                )
                continue
            crashed.append(Crashed(path, attempt, st.st_size, st.st_mtime))
            marker.unlink(missing_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return crashed
