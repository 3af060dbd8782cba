"""The C-STORE SCP: instances sent by a modality or PACS land in the inbox as Part-10 files.

Each instance is written as received (the peer's transfer syntax, no decode and re-encode) to a
hidden staging folder inside the destination, fsynced, and renamed into
``<inbox>/<dest_subdir>/<study-hash>/<instance-hash>.dcm``. The rename is atomic on one file
system, so the watcher (which skips hidden folders) sees only complete files, by a "moved"
event, and the existing dedupe, quarantine and audit apply unchanged. The SCP answers success
only once the file is durable (``fsync = true``, the default): a modality may delete its copy
after that. TCP_NODELAY is set on every association (see :func:`no_delay`).

Associations from a calling AE that is not allowed, to another called AE, or beyond the
association limit are refused; refusals and failed stores are logged (AE titles and status
codes, never a UID or patient attribute) and counted in /metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from edge_node.config import DicomListenerConfig
from edge_node.serve.stats import DicomStats
from fl_protocol.files import fsync_dir, write_atomic

log = logging.getLogger(__name__)

STAGING = ".staging"  # hidden: the watcher never looks inside

# C-STORE status codes (PS3.4 Annex B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def quiet_pynetdicom() -> None:
    """pynetdicom's standard handlers log UIDs at INFO/DEBUG: keep them out of our logs."""
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def no_delay(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY on the association's socket, so a small PDU (a C-STORE-RSP)
    never waits for the peer's delayed ACK. pynetdicom leaves Nagle on; for DCMTK storescp
    (TCP_NODELAY=1) it is the difference between 21 and 277 slices/s in `fedscan bench dicom`."""
    with contextlib.suppress(AttributeError, OSError):  # no socket (tests), already closed
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def uid_hash(uid: str) -> str:
    """A file-name-safe stand-in for a UID (names carry no identifier)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


def server_tls_context(config: DicomListenerConfig) -> ssl.SSLContext | None:
    """TLS for the SCP when a certificate is configured; client certificates with ``tls_ca``."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    if config.tls_ca is not None:
        ctx.load_verify_locations(str(config.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class InstanceWriter:
    """Writes received Part-10 bytes into ``dest`` (staging + rename; fsync of the file and
    its folder unless ``durable`` is off)."""

    def __init__(self, dest: Path, *, durable: bool = True) -> None:
        self.dest = dest
        self.durable = durable
        self.staging = dest / STAGING
        self.staging.mkdir(parents=True, exist_ok=True)

    def write(self, data: bytes, sop_instance_uid: str) -> Path:
        study = study_uid_of(data) or "unknown-study"
        folder = self.dest / uid_hash(study)
        target = folder / f"{uid_hash(sop_instance_uid)}.dcm"
        folder.mkdir(parents=True, exist_ok=True)  # each time: an operator may tidy up
        self.staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.staging, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.durable:
            fsync_dir(folder)  # the rename survives a power cut before we answer success
        return target

    def clean_staging(self) -> int:
        """Remove temp files a crash left behind (never answered success); returns the count."""
        n = 0
        for p in self.staging.glob("*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
        return n


def study_uid_of(data: bytes) -> str | None:
    """The StudyInstanceUID of Part-10 bytes, read without touching the pixel data."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
        )
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError):
        return None
    value = ds.get("StudyInstanceUID")
    return str(value) if value else None


class Listener:
    """A pynetdicom AE serving C-STORE and C-ECHO on ``config.host:config.port``."""

    def __init__(
        self,
        config: DicomListenerConfig,
        inbox: Path,
        stats: DicomStats,
        port_file: Path | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.port_file = port_file
        self.writer = InstanceWriter(inbox / config.dest_subdir, durable=config.fsync)
        self.port: int | None = None
        self._server: Any = None
        quiet_pynetdicom()
        ae = AE(ae_title=config.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.require_calling_aet = list(config.allowed_calling_aes)
        ae.maximum_pdu_size = config.max_pdu
        ae.maximum_associations = config.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
        self.ae = ae

    def start(self) -> int:
        """Listen (non-blocking); returns the bound port (also written to ``port_file``)."""
        left = self.writer.clean_staging()
        if left:
            log.warning("dicom listener: removed %d partial file(s) left by a crash", left)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self.ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            ssl_context=server_tls_context(self.config),
            evt_handlers=handlers,
        )
        self.port = int(self._server.server_address[1])
        if self.port_file is not None:
            write_atomic(self.port_file, f"{self.port}\n".encode())
        log.info(
            "dicom listener: AE %s on %s:%d (calling AEs: %s, TLS %s)",
            self.config.ae_title,
            self.config.host,
            self.port,
            ",".join(self.config.allowed_calling_aes) or "any (loopback)",
            "on" if self.config.tls_cert else "off",
        )
        return self.port

    def stop(self) -> None:
        """Stop accepting and abort associations in progress: an instance being written is
        finished (or left in staging, removed at the next start), the rest is not acknowledged,
        so the sender keeps it and sends it again."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            active = [a for a in self.ae.active_associations if a.is_acceptor]
            for assoc in active:
                assoc.abort()
            log.info("dicom listener stopped (%d association(s) aborted)", len(active))

    # -- event handlers (pynetdicom threads) -------------------------------------------------
    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            sop_uid = str(event.request.AffectedSOPInstanceUID)
        except Exception as exc:  # a malformed request: refuse it, keep serving
            self.stats.add("store_failures")
            log.error("dicom listener: C-STORE not understood (%s)", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        try:
            self.writer.write(data, sop_uid)
        except OSError as exc:
            self.stats.add("store_failures")
            log.error("dicom listener: C-STORE not written (%s): answered A700", exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        self.stats.add("instances_stored")
        self.stats.add("bytes_stored", len(data))
        return STATUS_SUCCESS

    def _on_echo(self, event: Any) -> int:
        self.stats.add("echoes")
        return STATUS_SUCCESS

    def _on_accepted(self, event: Any) -> None:
        self.stats.add("associations_accepted")
        log.info("dicom listener: association from AE %s accepted", _calling_ae(event))

    def _on_rejected(self, event: Any) -> None:
        self.stats.add("associations_refused")
        calling, called = _requested_aes(event)
        if self.config.allowed_calling_aes and calling not in self.config.allowed_calling_aes:
            why = "calling AE not allowed"
        elif called != self.config.ae_title:
            why = "called AE is not ours"
        else:
            why = "association limit reached"
        log.warning(
            "dicom listener: association from AE %s to AE %s refused: %s", calling, called, why
        )


def _calling_ae(event: Any) -> str:
    return _requested_aes(event)[0]


def _requested_aes(event: Any) -> tuple[str, str]:
    """(calling, called) AE titles of the association request (for logs: no patient data)."""
    try:
        rq = event.assoc.requestor.primitive
        return str(rq.calling_ae_title).strip() or "?", str(rq.called_ae_title).strip() or "?"
    except AttributeError:
        return "?", "?"
