"""The C-STORE SCP: real peers (pynetdicom SCU, DCMTK storescu/echoscu) send a multi-slice
series; every instance lands in the inbox byte for byte, refusals and failures are counted."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from edge_node.config import DicomListenerConfig
from edge_node.dicomnet.listener import STAGING, Listener, uid_hash
from edge_node.serve.stats import DicomStats
from fedscan.bench.dicom_peers import dcmtk, dcmtk_available, echo
from tests.helpers.dicom_factory import sample_path, series_from, write_series

needs_dcmtk = pytest.mark.skipif(not dcmtk_available(), reason="DCMTK not installed")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    cfg = DicomListenerConfig(enabled=True, port=0, allowed_calling_aes=("MODALITY",))
    scp = Listener(cfg, tmp_path / "inbox", DicomStats(), port_file=tmp_path / "dicom.port")
    scp.start()
    yield scp
    scp.stop()


def _send(port: int, datasets: list[pydicom.Dataset], calling: str = "MODALITY") -> list[int]:
    ae = AE(ae_title=calling)
    for ts, sop in {(str(d.file_meta.TransferSyntaxUID), str(d.SOPClassUID)) for d in datasets}:
        ae.add_requested_context(sop, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="FEDSCAN")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_pynetdicom_series_lands_in_inbox_as_sent(listener: Listener, tmp_path: Path) -> None:
    """20 CT slices of one series over one association: 20 files under one study folder, each
    with the pixels and transfer syntax sent, nothing left in staging, counters updated."""
    series = series_from(sample_path("693_UNCR.dcm"), 20)
    assert _send(listener.port or 0, series) == [0x0000] * 20
    study_dir = tmp_path / "inbox" / "dicom-in" / uid_hash(str(series[0].StudyInstanceUID))
    files = sorted(study_dir.glob("*.dcm"))
    assert len(files) == 20
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    for f in files:
        got = pydicom.dcmread(f)
        sent = by_uid.pop(str(got.SOPInstanceUID))
        assert f.name == f"{uid_hash(str(got.SOPInstanceUID))}.dcm"
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert got.PixelData == sent.PixelData and got.InstanceNumber == sent.InstanceNumber
    assert by_uid == {}
    assert not list((tmp_path / "inbox" / "dicom-in" / STAGING).iterdir())
    counts = listener.stats.snapshot()
    assert counts["instances_stored"] == 20 and counts["associations_accepted"] == 1
    assert counts["bytes_stored"] == sum(f.stat().st_size for f in files)
    assert (tmp_path / "dicom.port").read_text().strip() == str(listener.port)


def test_compressed_transfer_syntax_is_kept(listener: Listener, tmp_path: Path) -> None:
    """A JPEG 2000 slice is written as received: same syntax, same compressed bytes."""
    (ds,) = series_from(sample_path("693_J2KR.dcm"), 1)
    assert _send(listener.port or 0, [ds]) == [0x0000]
    (f,) = (tmp_path / "inbox" / "dicom-in").rglob("*.dcm")
    got = pydicom.dcmread(f)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert got.PixelData == ds.PixelData


@needs_dcmtk
def test_dcmtk_storescu_and_echoscu(listener: Listener, tmp_path: Path) -> None:
    """DCMTK as the outside peer: echoscu gets an answer, storescu sends a 5-slice series."""
    port = listener.port or 0
    assert echo(port, "FEDSCAN", calling_ae="MODALITY")
    files = write_series(sample_path("693_UNCR.dcm"), tmp_path / "series", 5)
    cmd = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "FEDSCAN", "127.0.0.1", str(port)]
    result = subprocess.run([*cmd, *map(str, files)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    received = {str(pydicom.dcmread(f).SOPInstanceUID) for f in (tmp_path / "inbox").rglob("*.dcm")}
    assert received == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    assert listener.stats.snapshot()["echoes"] == 1


@needs_dcmtk
def test_unknown_calling_or_called_ae_is_refused_and_counted(
    listener: Listener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A calling AE not on the list, or a call to another AE title, is refused, logged with the
    AE titles only, and counted; nothing is written."""
    port = listener.port or 0
    assert not echo(port, "FEDSCAN", calling_ae="INTRUDER")
    assert not echo(port, "OTHER", calling_ae="MODALITY")
    assert listener.stats.snapshot()["associations_refused"] == 2
    assert "calling AE not allowed" in caplog.text and "called AE is not ours" in caplog.text
    assert not list((tmp_path / "inbox").rglob("*.dcm"))


def test_write_failure_answers_out_of_resources(listener: Listener, tmp_path: Path) -> None:
    """When the study folder cannot be created (a file is in the way), the SCU gets A700 (out
    of resources) instead of a false success, and the failure is counted."""
    (ds,) = series_from(sample_path("693_UNCR.dcm"), 1)
    blocker = tmp_path / "inbox" / "dicom-in" / uid_hash(str(ds.StudyInstanceUID))
    blocker.write_bytes(b"in the way")
    assert _send(listener.port or 0, [ds]) == [0xA700]
    assert listener.stats.snapshot()["store_failures"] == 1
    assert not list((tmp_path / "inbox").rglob("*.dcm"))


def test_crash_leftovers_in_staging_are_removed_at_start(tmp_path: Path) -> None:
    """A temp file from a crash mid-write (never acknowledged) is deleted when the SCP starts."""
    staging = tmp_path / "inbox" / "dicom-in" / STAGING
    staging.mkdir(parents=True)
    (staging / "abc.tmp").write_bytes(b"half an instance")
    scp = Listener(DicomListenerConfig(enabled=True, port=0), tmp_path / "inbox", DicomStats())
    scp.start()
    try:
        assert not list(staging.iterdir())
    finally:
        scp.stop()


def test_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    """Starting the node's DICOM services on a port another program holds stops the node with
    a configuration error naming the address (exit 2), not a traceback."""
    import socket

    from edge_node.config import config_from_dict
    from edge_node.dicomnet.services import DicomServices
    from edge_node.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        paths = {"inbox": "in", "state_dir": "st", "quarantine_dir": "q", "model_dir": "m"}
        raw = {
            "node_id": "n",
            "paths": paths,
            "dicom": {"listener": {"enabled": True, "port": port}},
        }
        services = DicomServices(config_from_dict(raw, tmp_path), DicomStats())
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            services.start()
        services.stop()


def test_without_fsync_files_are_still_whole(tmp_path: Path) -> None:
    """``fsync = false`` (storescp's way, faster) still writes through staging + rename."""
    cfg = DicomListenerConfig(enabled=True, port=0, fsync=False)
    scp = Listener(cfg, tmp_path / "inbox", DicomStats())
    scp.start()
    try:
        series = series_from(sample_path("693_UNCR.dcm"), 3)
        assert _send(scp.port or 0, series) == [0x0000] * 3
    finally:
        scp.stop()
    got = sorted(pydicom.dcmread(f).InstanceNumber for f in (tmp_path / "inbox").rglob("*.dcm"))
    assert got == [1, 2, 3]
