"""The C-STORE SCU over the outbox: delivery to DCMTK storescp and to a pynetdicom SCP,
retries with backoff while the PACS is down or refuses, nothing lost across a restart."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_node.config import DicomSendConfig
from edge_node.dicomnet.outbox import Outbox
from edge_node.dicomnet.sender import Sender
from edge_node.serve.stats import DicomStats
from fedscan.bench.dicom_peers import DcmtkStoreScp, RecordingScp, dcmtk_available, free_port
from tests.helpers.dicom_factory import sample_path, series_from, write_secondary_capture

needs_dcmtk = pytest.mark.skipif(not dcmtk_available(), reason="DCMTK not installed")


def _results(tmp_path: Path, n: int) -> list[pydicom.Dataset]:
    out = []
    for i in range(n):
        pixels = np.full((32, 48), 10 * i, dtype=np.uint8)
        out.append(pydicom.dcmread(write_secondary_capture(tmp_path / f"sc{i}.dcm", pixels)))
    return out


def _pacs(port: int, **kw: float) -> DicomSendConfig:
    return DicomSendConfig(enabled=True, ae_title="PACS", port=port, timeout_s=5, **kw)


@needs_dcmtk
def test_outbox_delivered_to_dcmtk_storescp(tmp_path: Path) -> None:
    """Three Secondary Captures and a CT slice in the outbox reach storescp in one pass; what
    storescp wrote has the same SOP Instance UIDs; the outbox is empty afterwards."""
    box = Outbox(tmp_path / "outbox")
    objects = _results(tmp_path, 3) + series_from(sample_path("693_UNCR.dcm"), 1)
    for ds in objects:
        box.enqueue(ds)
    stats = DicomStats()
    with DcmtkStoreScp(tmp_path / "pacs") as pacs:
        sender = Sender(box, stats, pacs=_pacs(pacs.port))
        assert sender.run_once() == 4
        got = {str(pydicom.dcmread(f).SOPInstanceUID) for f in pacs.files()}
    assert got == {str(ds.SOPInstanceUID) for ds in objects}
    assert box.pending() == [] and len(list(box.sent_dir.glob("*.dcm"))) == 4
    assert stats.snapshot()["sent"] == 4


def test_pacs_down_then_up_after_restart_delivers_each_object_once(tmp_path: Path) -> None:
    """PACS down: the attempt fails and backs off; the node "restarts" (new Outbox and Sender);
    the PACS comes up: every object arrives exactly once, a further pass sends nothing."""
    port = free_port()
    box = Outbox(tmp_path / "outbox", backoff_base_s=1.0, backoff_cap_s=4.0)
    objects = _results(tmp_path, 3)
    for ds in objects:
        box.enqueue(ds)
    stats = DicomStats()
    assert Sender(box, stats, pacs=_pacs(port)).run_once() == 0
    assert stats.snapshot()["send_failures"] == 3
    assert {box.attempts(p).last_error for p in box.pending()} == {"PACS unreachable or aborted"}
    assert Sender(box, stats, pacs=_pacs(port)).run_once() == 0  # backing off: not even tried
    assert stats.snapshot()["send_failures"] == 3

    restarted = Outbox(tmp_path / "outbox", backoff_base_s=1.0, backoff_cap_s=4.0)
    with RecordingScp(port=port) as pacs:
        sender = Sender(restarted, DicomStats(), pacs=_pacs(port))
        assert sender.run_once(now=time.time() + 2) == 3
        assert sender.run_once(now=time.time() + 100) == 0
    assert sorted(uid for uid, _, _ in pacs.received) == sorted(
        str(ds.SOPInstanceUID) for ds in objects
    )


def test_failure_status_is_retried_until_accepted(tmp_path: Path) -> None:
    """A PACS answering A700 (out of resources) keeps the object pending with the status as the
    reason; the next due pass delivers it."""
    box = Outbox(tmp_path / "outbox")
    (ds,) = _results(tmp_path, 1)
    path = box.enqueue(ds)
    with RecordingScp(statuses=[0xA700]) as pacs:
        sender = Sender(box, DicomStats(), pacs=_pacs(pacs.port))
        assert sender.run_once() == 0
        assert box.attempts(path).last_error == "PACS status 0xA700"
        assert box.attempts(path).count == 1
        assert sender.run_once(now=time.time() + 10) == 1
    assert pacs.answers == [0xA700, 0x0000] and box.pending() == []


def test_wrong_called_ae_is_a_rejected_association(tmp_path: Path) -> None:
    """Calling the PACS by the wrong AE title is a refused association, retried later."""
    box = Outbox(tmp_path / "outbox")
    path = box.enqueue(_results(tmp_path, 1)[0])
    with RecordingScp(ae_title="REALPACS") as pacs:
        assert Sender(box, DicomStats(), pacs=_pacs(pacs.port)).run_once() == 0
    assert pacs.received == []
    assert box.attempts(path).last_error == "association rejected"


def test_results_folder_without_pacs(tmp_path: Path) -> None:
    """With only a results folder, each object is copied there (same bytes) and marked sent."""
    box = Outbox(tmp_path / "outbox")
    path = box.enqueue(_results(tmp_path, 1)[0])
    data = path.read_bytes()
    assert Sender(box, DicomStats(), results_dir=tmp_path / "results").run_once() == 1
    (copy,) = (tmp_path / "results").iterdir()
    assert copy.read_bytes() == data and box.pending() == []


def test_sender_loop_wakes_on_enqueue_from_another_outbox_object(tmp_path: Path) -> None:
    """The running sender picks up an object queued through another Outbox on the same folder
    (the results code builds its own) well within a second."""
    with RecordingScp() as pacs:
        sender = Sender(Outbox(tmp_path / "outbox"), DicomStats(), pacs=_pacs(pacs.port))
        sender.poll_s = 30.0  # only the wake-up can make it quick
        sender.start()
        try:
            time.sleep(0.2)
            t0 = time.monotonic()
            ds = _results(tmp_path, 1)[0]
            Outbox(tmp_path / "outbox").enqueue(ds)
            deadline = t0 + 10
            while not pacs.received and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pacs.received and pacs.received[0][0] == str(ds.SOPInstanceUID)
            assert time.monotonic() - t0 < 1.0
        finally:
            sender.stop()


def test_unreadable_outbox_file_is_set_aside_and_the_rest_is_sent(tmp_path: Path) -> None:
    """A file in pending/ that is not DICOM (a foreign drop) moves to failed/ with its reason;
    it does not hold up the valid object queued beside it."""
    box = Outbox(tmp_path / "outbox")
    good = box.enqueue(_results(tmp_path, 1)[0])
    junk = box.pending_dir / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with RecordingScp() as pacs:
        assert Sender(box, DicomStats(), pacs=_pacs(pacs.port)).run_once() == 1
    assert box.pending() == [] and (box.sent_dir / good.name).is_file()
    assert (box.failed_dir / "junk.dcm").is_file()
    assert "not a readable DICOM file" in (box.failed_dir / "junk.dcm.reason.json").read_text()
