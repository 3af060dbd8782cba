"""The persistent outbox of DICOM result objects waiting for the PACS.

Layout under ``root`` (``<state_dir>/outbox``)::

    pending/<key>.dcm        Part-10 file, written atomically (fsynced temp file + rename)
    pending/<key>.dcm.json   attempt count, last error, next attempt time (only after a failure)
    sent/<key>.dcm           delivered; kept as a record (small SR/SC objects)
    failed/<key>.dcm         cannot ever be sent (not a readable DICOM file), with .reason.json

``key`` is a hash of the SOP Instance UID, so enqueueing the same object twice replaces it
(the PACS sees it once) and no file name carries a UID. A crash at any point leaves either the
old file or the new one; a file in ``pending/`` is retried until the PACS accepts it, also after
a restart of the node.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from fl_protocol.files import write_atomic

log = logging.getLogger(__name__)

_SIDECAR = ".json"

# One wake-up event per outbox folder, shared by every Outbox object of this process on it:
# the results code and the sender may each build their own Outbox(root).
_WAKE_LOCK = threading.Lock()
_WAKE: dict[str, tuple[threading.Event, threading.Lock]] = {}


def _shared(root: Path) -> tuple[threading.Event, threading.Lock]:
    """The (wake-up event, file lock) of an outbox folder, one pair per folder."""
    key = str(root.resolve())
    with _WAKE_LOCK:
        return _WAKE.setdefault(key, (threading.Event(), threading.Lock()))


@dataclass(frozen=True)
class Attempts:
    """Delivery history of one pending object (persisted in its JSON sidecar)."""

    count: int = 0  # failed attempts so far
    last_error: str | None = None  # short reason of the last failure (no patient data)
    next_attempt_at: float = 0.0  # time.time() before which the sender leaves it alone


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff after ``attempts`` failures: base, 2*base, 4*base, ... capped."""
    if attempts <= 0:
        return 0.0
    return float(min(cap_s, base_s * (2 ** min(attempts - 1, 30))))


def object_key(sop_instance_uid: str) -> str:
    """File stem for an object: a UID hash, so names are stable and carry no identifier."""
    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:32]


def encode_part10(ds: pydicom.Dataset) -> bytes:
    """``ds`` as Part-10 bytes; builds the file meta when the dataset has none."""
    sop_class = ds.get("SOPClassUID")
    sop_instance = ds.get("SOPInstanceUID")
    if not sop_class or not sop_instance:
        raise ValueError("a result object needs SOPClassUID and SOPInstanceUID")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class Outbox:
    """Pending result objects on disk; safe to use from several threads of one process."""

    def __init__(self, root: Path, *, backoff_base_s: float = 2.0, backoff_cap_s: float = 300.0):
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.sent_dir = self.root / "sent"
        self.failed_dir = self.root / "failed"
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.sent_dir.mkdir(parents=True, exist_ok=True)
        self._wake, self._lock = _shared(self.root)

    # -- producer side (the series/results code) --------------------------------------------
    def enqueue(self, ds: pydicom.Dataset) -> Path:
        """Write ``ds`` atomically into ``pending/`` and wake the sender; returns the file."""
        data = encode_part10(ds)
        path = self.pending_dir / f"{object_key(str(ds.SOPInstanceUID))}.dcm"
        with self._lock:
            write_atomic(path, data, sync_dir=True)
            self._sidecar(path).unlink(missing_ok=True)  # a re-enqueued object starts afresh
        log.info("outbox: queued %s (%d bytes)", path.name, len(data))
        self._wake.set()
        return path

    # -- sender side -------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        """Pending objects, oldest first (temp files of an interrupted write are ignored)."""
        files = [
            p for p in self.pending_dir.glob("*.dcm") if not p.name.startswith(".") and p.is_file()
        ]
        return sorted(files, key=lambda p: (_mtime(p), p.name))

    def due(self, now: float | None = None) -> list[Path]:
        """Pending objects whose backoff has expired."""
        t = time.time() if now is None else now
        return [p for p in self.pending() if self.attempts(p).next_attempt_at <= t]

    def next_due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next pending object is due (0 if one is due now; None if empty)."""
        t = time.time() if now is None else now
        waits = [max(0.0, self.attempts(p).next_attempt_at - t) for p in self.pending()]
        return min(waits) if waits else None

    def attempts(self, path: Path) -> Attempts:
        try:
            raw = json.loads(self._sidecar(path).read_text())
            return Attempts(
                count=int(raw.get("count", 0)),
                last_error=raw.get("last_error"),
                next_attempt_at=float(raw.get("next_attempt_at", 0.0)),
            )
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return Attempts()

    def mark_sent(self, path: Path) -> Path:
        """Move a delivered object to ``sent/`` and drop its attempt record."""
        target = self.sent_dir / path.name
        with self._lock:
            os.replace(path, target)
            self._sidecar(path).unlink(missing_ok=True)
        return target

    def mark_unsendable(self, path: Path, reason: str) -> Path:
        """Move an object that can never be sent (unreadable) to ``failed/`` with its reason."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        target = self.failed_dir / path.name
        with self._lock:
            os.replace(path, target)
            self._sidecar(path).unlink(missing_ok=True)
            write_atomic(
                target.with_name(target.name + ".reason.json"),
                json.dumps({"reason": reason[:200], "at": time.time()}).encode(),
            )
        log.error("outbox: %s cannot be sent (%s): moved to failed/", path.name, reason)
        return target

    def mark_failed(self, path: Path, reason: str, now: float | None = None) -> Attempts:
        """Record one failed delivery; the object stays pending and backs off exponentially."""
        t = time.time() if now is None else now
        with self._lock:
            previous = self.attempts(path)
            count = previous.count + 1
            record = Attempts(
                count=count,
                last_error=reason[:200],
                next_attempt_at=t + backoff_s(count, self.backoff_base_s, self.backoff_cap_s),
            )
            if path.exists():
                write_atomic(self._sidecar(path), json.dumps(record.__dict__).encode())
        return record

    def prune_sent(self, max_age_s: float, now: float | None = None) -> int:
        """Delete delivered objects older than ``max_age_s``; returns how many."""
        cutoff = (time.time() if now is None else now) - max_age_s
        n = 0
        for p in self.sent_dir.glob("*.dcm"):
            if _mtime(p) < cutoff:
                p.unlink(missing_ok=True)
                n += 1
        return n

    def wait(self, timeout_s: float) -> bool:
        """Block until an object is enqueued or ``timeout_s`` passes (the sender's sleep)."""
        woke = self._wake.wait(timeout_s)
        self._wake.clear()
        return woke

    def wake(self) -> None:
        self._wake.set()

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(path.name + _SIDECAR)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
