"""Patient data at rest and in the logs, against real `fedscan node init` / `node run`
processes started from a shell umask of 022 (issue 14 and issue 10): every file the node
writes is owner-only, and a malformed UID never reaches the log."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_node.ingest.preprocess import prepare, read_meta
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path, write_ct, write_garbage
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.node_process import REPO, NodeProcess

pytestmark = pytest.mark.integration

SECRET = "DOEJOHN"  # a patient's name pasted into a UID, as a broken writer might
BAD_UID = f"1.2.826.0.1.3680043.9.{SECRET}.7"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def shell_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what a login shell typically has
    yield
    os.umask(old)


def test_node_init_writes_owner_only(tmp_path: Path, shell_umask: None) -> None:
    """`fedscan node init` from umask 022: node.toml 0600, its folders 0700."""
    folder = tmp_path / "node"
    cmd = [sys.executable, "-m", "fedscan.cli", "node", "init", str(folder)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=60)
    assert _mode(folder / "node.toml") == 0o600
    for name in ("inbox", "state", "quarantine", "models"):
        assert _mode(folder / name) == 0o700, name


def test_running_node_keeps_patient_data_owner_only(tmp_path: Path, shell_umask: None) -> None:
    """`fedscan node run` from umask 022: the database, an upload, a thumbnail, a quarantine
    copy and its reason file are 0600 and their folders 0700; a 0644 upload left by an
    earlier run is tightened at start. A file with a malformed UID is predicted and neither
    the UID nor the name in it reaches the node's log."""
    node = NodeProcess(tmp_path / "node")
    make_classifier(node.folder / "models" / "current.onnx", version="3")
    leftover = node.folder / "state" / "uploads" / "earlier.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    leftover.chmod(0o644)
    node.start()
    try:
        write_ct(tmp_path / "bad_uid.dcm", rows=64, cols=64, sop_uid=BAD_UID)
        (tmp_path / "bad_uid.dcm").replace(node.inbox / "bad_uid.dcm")
        write_garbage(node.inbox / "junk.dcm")
        wait_for(lambda: node.n_predictions() >= 1, what="a prediction")
        upload = tmp_path / "up.dcm"
        copy_with_new_uid(sample_path("693_UNCR.dcm"), upload)
        base = f"http://127.0.0.1:{node.port}"
        r = httpx.post(
            f"{base}/api/predict",
            content=upload.read_bytes(),
            headers={"Content-Type": "application/dicom"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        pid = r.json()["predictions"][0]["id"]
        assert httpx.get(f"{base}/api/thumbnails/{pid}.png", timeout=60).status_code == 200
        quarantine = node.folder / "quarantine"
        wait_for(lambda: (quarantine / "junk.dcm.reason.json").exists(), what="quarantine")
    finally:
        assert node.terminate() == 0
    state = node.folder / "state"
    files = [
        node.folder / "node.toml",
        state / "node.sqlite",
        leftover,
        *(state / "uploads").iterdir(),
        *(state / "thumbnails").iterdir(),
        quarantine / "junk.dcm",
        quarantine / "junk.dcm.reason.json",
    ]
    assert len(list((state / "uploads").iterdir())) == 2
    for f in files:
        assert _mode(f) == 0o600, f
    for d in (state, state / "uploads", state / "thumbnails", quarantine):
        assert _mode(d) == 0o700, d
    text = node.log.read_text()
    assert "node stopped" in text and SECRET not in text and BAD_UID not in text


def test_malformed_uid_never_reaches_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom warns about an invalid UI value by quoting it, as a log line and again as a
    Python warning. Reading such a file (in process, every logger at DEBUG, warnings captured
    into logging) logs neither (a running node: the test above)."""
    path = write_ct(tmp_path / "bad_uid.dcm", rows=64, cols=64, sop_uid=BAD_UID)
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            from edge_node.ingest.dicom_decode import quiet_pydicom

            quiet_pydicom()  # catch_warnings reset the filters it installed at import
            assert read_meta(path).sop_instance_uid == BAD_UID
            assert len(prepare(path).frames) == 1
            logging.getLogger("pydicom").warning("Invalid value for VR UI: '%s'", BAD_UID)
    finally:
        logging.captureWarnings(False)
    assert SECRET not in caplog.text
    assert "<withheld>" in caplog.text  # the direct pydicom log line kept, its value withheld
    assert not [w for w in seen if SECRET in str(w.message)]
