"""Quarantine: a copy of each unusable input file with a ``<name>.reason.json`` beside it.

The inbox is never modified, so the original stays where it is; the copy lets an operator
inspect what the node refused even after the sender cleans up. The reason file is written
atomically (temporary name, then rename) so a reader never sees half of it. Copies hold
patient data: the folder is 0700 and every file 0600, whatever the source file's mode was
(``shutil.copy2`` would copy it), and ``edge_node.retention`` removes them after
``[retention] quarantine_days``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from fl_protocol.files import write_atomic

log = logging.getLogger(__name__)


def path_tag(path: Path | str) -> str:
    """A short stable tag for a file, for logs that must not carry paths (patient names)."""
    return hashlib.sha256(os.fsencode(str(path))).hexdigest()[:10]


class Quarantine:
    """Copies refused files into ``folder``."""

    def __init__(self, folder: Path, max_copy_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        # a refused file larger than this (limit:file_size: a 10 GB file in the inbox) gets
        # its reason file only, so refusing it cannot fill the disk; None = copy any size
        self.max_copy_bytes = max_copy_bytes
        self._lock = threading.Lock()

    def put(self, src: Path, reason: str, detail: str = "") -> Path | None:
        """Copy ``src`` and write its reason file; returns the copy, or None if ``src`` vanished
        (or was larger than ``max_copy_bytes``: then only the reason file is written)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:  # name choice + copy must not race another worker
            dst = self._free_name(src)
            try:
                size = src.stat().st_size
            except OSError:
                return None
            if self.max_copy_bytes is not None and size > self.max_copy_bytes:
                self._write_reason(dst, src, reason, detail, size, copied=False)
                log.warning("quarantined file %s (too large to copy): %s", path_tag(src), reason)
                return None
            try:
                with open(src, "rb") as inp:  # a vanished source: nothing created
                    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with open(fd, "wb") as out:
                        shutil.copyfileobj(inp, out, 1 << 20)
                # not copy2: the source's mode may be 0644, and retention ages the copy by
                # when it was quarantined (its mtime), not by when the sender wrote it
            except FileNotFoundError:
                return None
            except OSError as exc:
                dst.unlink(missing_ok=True)  # no partial copy left on a full disk
                log.error("quarantine copy failed for file %s: %s", path_tag(src), exc.strerror)
                return None
            self._write_reason(dst, src, reason, detail, dst.stat().st_size, copied=True)
        log.warning("quarantined file %s: %s", path_tag(src), reason)
        return dst

    def _write_reason(
        self, dst: Path, src: Path, reason: str, detail: str, size: int, *, copied: bool
    ) -> None:
        record = {
            "reason": reason,
            "detail": detail,
            "source_path": str(src),
            "size": size,
            "copied": copied,
            "quarantined_at": time.time(),
        }
        reason_path = dst.with_name(dst.name + ".reason.json")
        try:
            write_atomic(reason_path, (json.dumps(record, indent=2) + "\n").encode(), mode=0o600)
        except OSError as exc:  # disk full: the node's state still records the reason
            log.error(
                "quarantine reason file not written for file %s: %s", path_tag(src), exc.strerror
            )

    def _free_name(self, src: Path) -> Path:
        dst = self.folder / src.name
        if not dst.exists():
            return dst
        stem, suffix = src.stem, src.suffix
        tag = path_tag(src)
        for i in range(10_000):
            extra = f"-{tag}" if i == 0 else f"-{tag}-{i}"
            candidate = self.folder / f"{stem}{extra}{suffix}"
            if not candidate.exists():
                return candidate
        raise OSError(f"no free quarantine name for {src.name}")
