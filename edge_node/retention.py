"""Retention of the patient-data copies the node makes itself (``[retention]`` in node.toml).

Swept by age (file mtime): ``state_dir/uploads`` (DICOM files posted to /api/predict),
``state_dir/thumbnails`` (cached PNGs, rebuilt on demand while the source file exists) and
``quarantine_dir`` (refused files; a copy and its ``.reason.json`` go together). A period of
0 keeps that folder forever. The daemon sweeps once at start and then every
``sweep_interval_s`` in a background thread. The inbox, the database and the labels are never
swept: prediction rows stay, and a thumbnail whose upload is gone answers 404.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

from edge_node.config import NodeConfig

log = logging.getLogger(__name__)

DAY_S = 86400.0
REASON_SUFFIX = ".reason.json"


def sweep(config: NodeConfig, now: float | None = None) -> dict[str, int]:
    """Remove files past their retention; returns how many per folder (uploads, thumbnails,
    quarantine). Never raises for a file that vanished or cannot be removed."""
    now = time.time() if now is None else now
    ret = config.retention
    state = config.paths.state
    removed = {
        "uploads": _sweep_folder(state.uploads, ret.uploads_days, now),
        "thumbnails": _sweep_folder(state.thumbnails, ret.thumbnails_days, now),
        "quarantine": _sweep_folder(config.paths.quarantine_dir, ret.quarantine_days, now),
    }
    if any(removed.values()):
        log.info(
            "retention: removed %d upload(s), %d thumbnail(s), %d quarantined file(s)",
            removed["uploads"],
            removed["thumbnails"],
            removed["quarantine"],
        )
    return removed


def _sweep_folder(folder: Path, days: float, now: float) -> int:
    """Remove regular files older than ``days`` directly in ``folder`` (a quarantine copy
    takes its reason file along); counts the data files removed, not the reason files."""
    if days <= 0:
        return 0
    cutoff = now - days * DAY_S
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        if entry.name.endswith(REASON_SUFFIX):
            continue  # goes with its copy (or alone below, when the copy is gone)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
            continue
        if _unlink(Path(entry.path)):
            removed += 1
            _unlink(Path(entry.path + REASON_SUFFIX))
    for entry in entries:  # a reason file whose copy was never written (disk full) or is gone
        if entry.name.endswith(REASON_SUFFIX) and not os.path.lexists(
            entry.path[: -len(REASON_SUFFIX)]
        ):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    _unlink(Path(entry.path))
            except OSError:
                continue
    return removed


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.error("retention: cannot remove a file (%s)", exc.strerror)
        return False


class RetentionSweeper:
    """Runs `sweep` at start and then every ``config.retention.sweep_interval_s``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        interval = self.config.retention.sweep_interval_s
        while True:
            try:
                sweep(self.config)
            except Exception:  # a sweep bug must not stop the node; the next one retries
                log.exception("retention sweep failed")
            self.sweeps += 1
            if self._stop.wait(interval):
                return
