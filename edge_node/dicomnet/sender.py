"""The C-STORE SCU: delivers the outbox to the PACS (and/or a results folder), with retries.

One association carries every object that is due (up to ``BATCH``); an object the PACS
accepts (success or warning status) moves to ``sent/``; a refusal, failure status, timeout or
unreachable PACS leaves it in ``pending/`` with an exponential backoff (capped). Nothing is
held in memory only: a node killed while the PACS is down sends everything after its restart,
each object once (the PACS may see an object again only if the node died between the PACS's
answer and the move to ``sent/``; same SOP Instance UID, so the PACS replaces it).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt

from edge_node.config import DicomSendConfig
from edge_node.dicomnet.listener import no_delay, quiet_pynetdicom
from edge_node.dicomnet.outbox import Outbox
from edge_node.serve.stats import DicomStats
from fl_protocol.files import write_atomic

log = logging.getLogger(__name__)

BATCH = 64  # objects per association (pynetdicom allows 128 presentation contexts)
POLL_S = 1.0  # also look at pending/ this often (objects queued by another process)
PRUNE_EVERY_S = 3600.0  # how often delivered objects past keep_sent_s are deleted
# After a wake-up, wait this long for the rest of a series' results (SR, SC are queued a few
# ms apart): one association for all of them instead of one each (~0.3 s per association)
GATHER_S = 0.1

# Success (0x0000) and the C-STORE warnings: coercion, elements discarded, SOP class mismatch
_ACCEPTED = {0x0000, 0xB000, 0xB006, 0xB007}
_UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


def client_tls_context(config: DicomSendConfig) -> ssl.SSLContext | None:
    """TLS to the PACS when a CA is configured (server certificate checked, hostname too)."""
    if config.tls_ca is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.tls_ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert is not None and config.tls_key is not None:
        ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return ctx


class Sender:
    """Background loop draining ``outbox`` to the PACS and/or ``results_dir``."""

    def __init__(
        self,
        outbox: Outbox,
        stats: DicomStats,
        pacs: DicomSendConfig | None = None,
        results_dir: Path | None = None,
        poll_s: float = POLL_S,
        keep_sent_s: float = 7 * 86400.0,
    ) -> None:
        if pacs is None and results_dir is None:
            raise ValueError("a sender needs a PACS, a results folder, or both")
        self.outbox = outbox
        self.stats = stats
        self.pacs = pacs
        self.results_dir = results_dir
        self.poll_s = poll_s
        self.keep_sent_s = keep_sent_s
        self._pruned_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tls = client_tls_context(pacs) if pacs is not None else None
        quiet_pynetdicom()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dicom-sender", daemon=True)
        self._thread.start()
        where = f"AE {self.pacs.ae_title} at {self.pacs.host}:{self.pacs.port}" if self.pacs else ""
        log.info(
            "dicom sender: %s%s%s (%d pending)",
            where,
            " and " if self.pacs and self.results_dir else "",
            f"folder {self.results_dir}" if self.results_dir else "",
            len(self.outbox.pending()),
        )

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.outbox.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S or not self._pruned_at:
                self._pruned_at = time.monotonic()
                try:
                    pruned = self.outbox.prune_sent(self.keep_sent_s)
                    if pruned:
                        log.info(
                            "dicom sender: %d delivered object(s) past retention deleted", pruned
                        )
                except OSError as exc:
                    log.warning("dicom sender: pruning sent/ failed: %s", exc.strerror)
            try:
                t0 = time.monotonic()
                if self.run_once():
                    log.debug("dicom sender: pass took %.0f ms", (time.monotonic() - t0) * 1000)
            except Exception:
                log.exception("dicom sender: pass failed; retrying")
            wait = self.outbox.next_due_in()
            if self.outbox.wait(self.poll_s if wait is None else min(max(wait, 0.05), self.poll_s)):
                self._stop.wait(GATHER_S)

    def run_once(self, now: float | None = None) -> int:
        """Try every due object once; returns how many were delivered."""
        due = self.outbox.due(now)[:BATCH]
        if not due:
            return 0
        if self.results_dir is not None:
            folder = self.results_dir
            due = [p for p in due if self._copy_to_folder(p, folder)]
        if self.pacs is None:
            for path in due:
                self.outbox.mark_sent(path)
                self.stats.add("sent")
            return len(due)
        return self._send_to_pacs(due, self.pacs)

    def _copy_to_folder(self, path: Path, folder: Path) -> bool:
        try:
            write_atomic(folder / path.name, path.read_bytes())
            return True
        except OSError as exc:
            self._failed(path, f"results folder: {exc.strerror}")
            return False

    def _send_to_pacs(self, due: list[Path], pacs: DicomSendConfig) -> int:
        metas: list[tuple[Path, str, str]] = []
        for path in due:
            try:
                meta = read_file_meta_info(path)
                metas.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
            except FileNotFoundError:
                continue  # re-enqueued or moved meanwhile
            except (InvalidDicomError, ValueError, AttributeError, KeyError) as exc:
                self.stats.add("send_failures")
                self.outbox.mark_unsendable(path, f"not a readable DICOM file: {exc}")
            except OSError as exc:
                self._failed(path, f"outbox file not readable: {exc.strerror}")
        if not metas:
            return 0
        t0 = time.monotonic()
        ae = AE(ae_title=pacs.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = pacs.timeout_s
        ae.connection_timeout = pacs.timeout_s
        for sop_class, ts in sorted({(c, t) for _, c, t in metas}):
            extra = list(_UNCOMPRESSED) if ts in _UNCOMPRESSED else []
            if ts == DeflatedExplicitVRLittleEndian:
                extra = [ExplicitVRLittleEndian]
            ae.add_requested_context(sop_class, list(dict.fromkeys([ts, *extra])))
        kwargs: dict[str, Any] = {
            "ae_title": pacs.ae_title,
            "evt_handlers": [(evt.EVT_CONN_OPEN, no_delay)],
        }
        if self._tls is not None:
            kwargs["tls_args"] = (self._tls, pacs.host)
        assoc = ae.associate(pacs.host, pacs.port, **kwargs)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "PACS unreachable or aborted"
            for path, _, _ in metas:
                self._failed(path, why)
            return 0
        sent = 0
        try:
            for path, _, _ in metas:
                if not assoc.is_established:
                    self._failed(path, "association lost")
                    continue
                status = assoc.send_c_store(path)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in _ACCEPTED:
                    self.outbox.mark_sent(path)
                    self.stats.add("sent")
                    sent += 1
                elif code == -1:
                    self._failed(path, "no response (timeout or abort)")
                else:
                    self._failed(path, f"PACS status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            log.info(
                "dicom sender: %d object(s) stored at the PACS (%.0f ms)",
                sent,
                (time.monotonic() - t0) * 1000,
            )
        return sent

    def _failed(self, path: Path, reason: str) -> None:
        self.stats.add("send_failures")
        record = self.outbox.mark_failed(path, reason)
        log.warning(
            "dicom sender: %s not delivered (%s), attempt %d, next try in %.0f s",
            path.name,
            reason,
            record.count,
            max(0.0, record.next_attempt_at - time.time()),
        )
