"""A real `fedscan node run` with [dicom]: DCMTK storescu sends a CT series by C-STORE and every
slice is predicted; result objects in the outbox reach the PACS, also when the PACS was down
and the node was killed meanwhile (each object arrives once); SIGTERM still exits 0."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from edge_node.dicomnet.listener import uid_hash
from edge_node.dicomnet.outbox import Outbox
from fedscan.bench.dicom import SR_PREFIX, set_toml
from fedscan.bench.dicom_peers import RecordingScp, dcmtk, dcmtk_available, echo, free_port
from tests.helpers.dicom_factory import sample_path, write_secondary_capture, write_series
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not dcmtk_available(), reason="DCMTK not installed (apt-get install dcmtk)"),
]

PACS_PORT = free_port()

DICOM_TOML = f"""
[dicom.listener]
enabled = true
ae_title = "FEDSCAN"
port = 0
allowed_calling_aes = ["MODALITY"]

[dicom.send_to]
enabled = true
ae_title = "PACS"
port = {PACS_PORT}
retry_base_s = 0.5
retry_cap_s = 1.0
timeout_s = 5
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("dicom-node")
    n = NodeProcess(folder, extra_toml=DICOM_TOML)
    # series complete 2 s after their last slice: the SR of the first test's series is queued
    # while the PACS is still down, and must reach it in the second test
    n.toml.write_text(set_toml(n.toml.read_text(), "series", "quiet_time_s", "2.0"))
    make_classifier(folder / "models" / "current.onnx", version="1")
    n.start()
    yield n
    try:
        assert n.terminate() == 0
    finally:
        n.kill()


def _dicom_port(node: NodeProcess) -> int:
    port_file = node.folder / "state" / "dicom.port"
    wait_for(port_file.exists, 30, "state/dicom.port")
    return int(port_file.read_text())


def test_storescu_series_is_received_and_predicted(node: NodeProcess, tmp_path: Path) -> None:
    """20 slices of one CT series over C-STORE (DCMTK storescu, the outside peer): the watcher
    predicts all 20; C-ECHO answers; an unknown calling AE is refused; /metrics counts it all."""
    port = _dicom_port(node)
    assert echo(port, "FEDSCAN", calling_ae="MODALITY")
    assert not echo(port, "FEDSCAN", calling_ae="INTRUDER")  # not on allowed_calling_aes
    # BodyPartExamined CHEST: the chest-only series filter takes this real (head) CT slice
    files = write_series(sample_path("693_UNCR.dcm"), tmp_path / "series", 20, body_part="CHEST")
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    cmd = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "FEDSCAN", "127.0.0.1", str(port)]
    result = subprocess.run([*cmd, *map(str, files)], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()

    def predicted() -> set[str]:
        rows = node.query("SELECT sop_instance_uid FROM predictions")
        return {r[0] for r in rows} & sent

    wait_for(lambda: predicted() == sent, 120, "20 predictions of the received series")
    metrics = httpx.get(f"http://127.0.0.1:{node.port}/metrics", timeout=10).text
    assert "fedscan_dicom_instances_stored_total 20" in metrics
    assert "fedscan_dicom_associations_accepted_total 2" in metrics  # echo + store
    assert "fedscan_dicom_associations_refused_total 1" in metrics
    assert "fedscan_dicom_echoes_total 1" in metrics
    log = node.log.read_text()
    assert all(uid not in log for uid in sent)  # no UIDs in the node's log


def test_outbox_survives_pacs_down_and_node_kill(node: NodeProcess, tmp_path: Path) -> None:
    """With the PACS down, queued results (three objects queued here, and the SR the node made
    for the series of the previous test) fail and back off; the node is SIGKILLed and
    restarted; then the PACS comes up and receives every object exactly once."""
    box = Outbox(node.folder / "state" / "outbox")
    completed = "SELECT study_instance_uid FROM series WHERE status = 'complete'"
    studies = wait_for(lambda: node.query(completed), 60, "the received series complete")
    wait_for(lambda: len(box.pending()) >= 1, 30, "the series results queued")
    uids = []
    for i in range(3):
        pixels = np.full((32, 32), 40 * i, dtype=np.uint8)
        ds = pydicom.dcmread(write_secondary_capture(tmp_path / f"r{i}.dcm", pixels))
        box.enqueue(ds)
        uids.append(str(ds.SOPInstanceUID))
    wait_for(lambda: all(box.attempts(p).count >= 1 for p in box.pending()), 30, "failed tries")
    queued = len(box.pending())
    assert queued >= 4
    node.kill()
    node.start()
    with RecordingScp(port=PACS_PORT, folder=tmp_path / "pacs") as pacs:
        wait_for(lambda: len(pacs.received) >= queued, 30, f"{queued} objects at the PACS")
        time.sleep(2.0)  # a duplicate would arrive within a retry period (<= 1 s)
    got = [uid for uid, _, _ in pacs.received]
    assert len(got) == len(set(got)) == queued and set(uids) <= set(got)
    reports = [
        pydicom.dcmread(f)
        for f, cls in zip(sorted((tmp_path / "pacs").iterdir()), pacs.sop_classes, strict=True)
        if cls.startswith(SR_PREFIX)
    ]
    assert [str(sr.StudyInstanceUID) for sr in reports] == [studies[0][0]]
    assert box.pending() == []


@pytest.mark.slow  # ~18 s (a node restart): outside `make test`, in the full suite
def test_sigterm_during_a_transfer_loses_nothing(node: NodeProcess, tmp_path: Path) -> None:
    """SIGTERM while storescu is sending 60 slices: the node exits 0, every file it wrote is a
    complete instance, storescu sees the rest fail; after the restart every received slice is
    predicted and a resend of the whole series completes it."""
    port = _dicom_port(node)
    files = write_series(sample_path("693_UNCR.dcm"), tmp_path / "big", 60, body_part="CHEST")
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    dest = node.inbox / "dicom-in" / uid_hash(str(study))
    cmd = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "FEDSCAN", "127.0.0.1", str(port)]
    scu = subprocess.Popen([*cmd, *map(str, files)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(dest.glob("*.dcm"))) >= 5, 60, "5 slices received")
        assert node.terminate() == 0
        scu.wait(60)
    finally:
        if scu.poll() is None:
            scu.kill()
            scu.wait(10)
        if scu.stderr is not None:
            scu.stderr.close()
    received = {str(pydicom.dcmread(f).SOPInstanceUID) for f in dest.glob("*.dcm")}  # all parse
    assert 5 <= len(received) < 60 and received <= set(uids)
    node.start()
    port = _dicom_port(node)
    result = subprocess.run([*cmd[:-1], str(port), *map(str, files)], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()

    def predicted() -> int:
        marks = ",".join("?" * len(uids))
        sql = "SELECT COUNT(DISTINCT sop_instance_uid) FROM predictions"
        sql += f" WHERE sop_instance_uid IN ({marks})"
        return int(node.query(sql, tuple(uids))[0][0])

    wait_for(lambda: predicted() == 60, 120, "all 60 slices predicted once")
