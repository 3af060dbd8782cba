"""The persistent outbox: atomic Part-10 files, attempts and backoff that survive a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from edge_node.dicomnet.outbox import Outbox, backoff_s, encode_part10
from tests.helpers.dicom_factory import write_secondary_capture


def _result(tmp_path: Path, name: str = "sc.dcm") -> pydicom.Dataset:
    pixels = np.zeros((64, 64), dtype=np.uint8)
    return pydicom.dcmread(write_secondary_capture(tmp_path / name, pixels))


def test_enqueue_writes_a_readable_part10_file_named_without_uids(tmp_path: Path) -> None:
    """An enqueued result object is a valid Part-10 file in pending/ whose name is no UID."""
    box = Outbox(tmp_path / "outbox")
    ds = _result(tmp_path)
    path = box.enqueue(ds)
    assert path.parent == tmp_path / "outbox" / "pending"
    assert str(ds.SOPInstanceUID) not in path.name
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert box.pending() == [path]


def test_same_object_enqueued_twice_is_pending_once(tmp_path: Path) -> None:
    """Re-enqueueing an object with the same SOP Instance UID replaces it (sent once)."""
    box = Outbox(tmp_path / "outbox")
    ds = _result(tmp_path)
    first = box.enqueue(ds)
    box.mark_failed(first, "PACS unreachable")
    second = box.enqueue(ds)
    assert first == second and box.pending() == [second]
    assert box.attempts(second).count == 0  # a re-enqueued object starts afresh


def test_dataset_without_file_meta_gets_one(tmp_path: Path) -> None:
    """A dataset built in memory (no file meta) is written as Explicit VR Little Endian."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    data = encode_part10(ds)
    assert data[128:132] == b"DICM"
    path = Outbox(tmp_path / "outbox").enqueue(ds)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_dataset_without_uids_is_refused(tmp_path: Path) -> None:
    """An object without SOP Class/Instance UID cannot be sent: enqueue refuses it."""
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        Outbox(tmp_path / "outbox").enqueue(pydicom.Dataset())


def test_failures_back_off_exponentially_and_persist_across_restarts(tmp_path: Path) -> None:
    """Failed deliveries double the wait up to the cap; a new Outbox (node restart) keeps them."""
    assert [backoff_s(n, 2.0, 10.0) for n in range(6)] == [0.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    box = Outbox(tmp_path / "outbox", backoff_base_s=2.0, backoff_cap_s=10.0)
    path = box.enqueue(_result(tmp_path))
    assert box.due(now=0.0) == [path]
    box.mark_failed(path, "PACS unreachable", now=100.0)
    rec = box.mark_failed(path, "PACS status 0xA700", now=100.0)
    assert rec.count == 2 and rec.next_attempt_at == 104.0
    restarted = Outbox(tmp_path / "outbox", backoff_base_s=2.0, backoff_cap_s=10.0)
    assert restarted.attempts(path).count == 2
    assert restarted.attempts(path).last_error == "PACS status 0xA700"
    assert restarted.due(now=103.0) == [] and restarted.due(now=104.0) == [path]
    assert restarted.next_due_in(now=101.0) == 3.0


def test_mark_sent_moves_to_sent_and_temp_files_are_not_pending(tmp_path: Path) -> None:
    """A delivered object leaves pending/ for sent/; a torn temp file is never offered."""
    box = Outbox(tmp_path / "outbox")
    path = box.enqueue(_result(tmp_path))
    (box.pending_dir / ".abc.dcm.123.tmp").write_bytes(b"partial")
    box.mark_failed(path, "x")
    sent = box.mark_sent(path)
    assert box.pending() == [] and sent.is_file()
    assert not list(box.pending_dir.glob("*.json"))
    assert box.next_due_in() is None


def test_delivered_objects_are_pruned_after_retention(tmp_path: Path) -> None:
    """sent/ keeps delivered objects for the retention period only (it would grow forever)."""
    box = Outbox(tmp_path / "outbox")
    sent = box.mark_sent(box.enqueue(_result(tmp_path)))
    now = sent.stat().st_mtime
    assert box.prune_sent(3600, now=now + 60) == 0 and sent.exists()
    assert box.prune_sent(3600, now=now + 7200) == 1 and not sent.exists()
