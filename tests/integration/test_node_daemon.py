"""A real `fedscan node run` process: files written into its inbox become stored predictions.

Real CT DICOM in, real onnxruntime, real SQLite, real inotify; bad input is quarantined while
the daemon keeps running; partial writes give one prediction; a 500-file burst is predicted in
full; a model replaced on disk mid-stream is swapped in without losing a file; SIGTERM drains
and exits 0, and what was not finished is picked up at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.helpers.dicom_factory import (
    copy_with_new_uid,
    sample_path,
    truncated_copy,
    write_ct,
    write_garbage,
)
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("node")
    n = NodeProcess(folder)
    make_classifier(folder / "models" / "current.onnx", version="1")
    n.start()
    yield n
    try:
        assert n.terminate() == 0
    finally:
        n.kill()


def test_real_ct_slices_are_predicted(node: NodeProcess) -> None:
    uids = {}
    for name in ("693_UNCR.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm"):
        dst = node.inbox / "ct" / f"new_{name}"
        uids[name] = copy_with_new_uid(sample_path(name), dst)
    wait_for(lambda: node.n_predictions() >= 4, what="4 predictions (1 + 1 + 2 frames)")
    for name, uid in uids.items():
        rows = node.query(
            "SELECT frame, label, confidence, model_version FROM predictions"
            " WHERE sop_instance_uid = ?",
            (uid,),
        )
        assert len(rows) == (2 if name.startswith("eCT") else 1)
        for _frame, label, conf, version in rows:
            assert label in ("covid", "non_covid") and 0.5 <= conf <= 1 and version == "1"
    # lossless JPEG 2000 of the same slice gives the same prediction as the uncompressed one
    a, b = (
        node.query("SELECT prob_covid FROM predictions WHERE sop_instance_uid = ?", (uids[n],))[0][
            0
        ]
        for n in ("693_UNCR.dcm", "693_J2KR.dcm")
    )
    assert a == pytest.approx(b, abs=1e-5)


def test_bad_input_is_quarantined_and_the_daemon_lives(node: NodeProcess) -> None:
    bad = {
        "garbage.dcm": write_garbage(node.inbox / "bad" / "garbage.dcm"),
        "truncated.dcm": truncated_copy(
            sample_path("693_UNCR.dcm"), node.inbox / "bad" / "truncated.dcm", 0.3
        ),
        "README": node.inbox / "bad" / "README",
        "empty.dcm": node.inbox / "bad" / "empty.dcm",
    }
    bad["README"].write_text("this is not an image\n")
    bad["empty.dcm"].write_bytes(b"")
    for path in bad.values():
        outcome, reason = wait_for(partial(node.outcome, path), what=f"outcome of {path.name}")
        assert outcome == "quarantined", (path.name, reason)
        info = json.loads((node.folder / "quarantine" / f"{path.name}.reason.json").read_text())
        assert info["reason"] in ("not_dicom", "truncated") and str(reason).startswith(
            info["reason"]
        )
        assert path.exists()  # the inbox is never modified
    assert node.alive() and node.health()["status"] == "ok"
    good = node.inbox / "bad" / "after.dcm"
    copy_with_new_uid(sample_path("693_UNCR.dcm"), good)
    wait_for(lambda: node.outcome(good), what="a good file after bad ones")
    assert node.outcome(good) == ("predicted", None)


def test_partial_writes_give_exactly_one_prediction(node: NodeProcess, tmp_path: Path) -> None:
    """Half a file, a pause, the rest: kept open, and closed in between (the writer comes back)."""
    for mode in ("kept_open", "closed_between"):
        src = tmp_path / f"{mode}.dcm"
        uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), src)
        data = src.read_bytes()
        dst = node.inbox / "partial" / src.name
        dst.parent.mkdir(exist_ok=True)
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            if mode == "closed_between":
                f.close()
                time.sleep(0.3)
                f = open(dst, "ab")  # noqa: SIM115
            else:
                time.sleep(0.3)
            f.write(data[len(data) // 2 :])
            f.close()
        wait_for(partial(node.outcome, dst), what=f"{mode} outcome")
        assert node.outcome(dst) == ("predicted", None)
        assert len(node.query("SELECT id FROM predictions WHERE sop_instance_uid = ?", (uid,))) == 1
        assert not (node.folder / "quarantine" / dst.name).exists()


def test_burst_of_500_files_is_all_predicted(node: NodeProcess) -> None:
    before = node.n_predictions()
    burst = node.inbox / "burst"
    for i in range(500):
        write_ct(burst / f"s{i:03d}.dcm", rows=64, cols=64, seed=i % 7)
    wait_for(lambda: node.n_predictions() - before >= 500, 240, "500 burst predictions")
    rows = node.query(
        "SELECT COUNT(*) FROM files WHERE path LIKE ? AND outcome = 'predicted'",
        (f"{burst.resolve()}/%",),
    )
    assert rows[0][0] == 500
    metrics = node.health()
    assert metrics["queue"] == {"ready": 0, "prepared": 0}


def test_logs_carry_config_but_no_patient_identifiers(node: NodeProcess) -> None:
    log = node.log.read_text()
    assert "config: {" in log and '"node_id": "node1"' in log
    uids = [r[0] for r in node.query("SELECT sop_instance_uid FROM predictions")]
    assert uids
    for forbidden in ["Test^Patient", *uids, "s000.dcm", "new_693_UNCR.dcm", "garbage.dcm"]:
        assert forbidden not in log, forbidden


def test_model_hot_swap_mid_stream_and_sigterm(tmp_path: Path) -> None:
    """Replace models/current.onnx while files arrive: no file lost, versions switch; SIGTERM
    exits 0 and files it did not get to are predicted after a restart, once each."""
    n = NodeProcess(tmp_path / "node")
    models = n.folder / "models"
    make_classifier(models / "current.onnx", version="1")
    n.start()
    try:
        src = sample_path("693_UNCR.dcm")
        uids_v1 = [copy_with_new_uid(src, n.inbox / f"a{i:02d}.dcm") for i in range(20)]
        staged = make_classifier(models / ".incoming.onnx", version="2")
        os.replace(staged, models / "current.onnx")  # atomic, as the federation client does
        mid = [copy_with_new_uid(src, n.inbox / f"b{i:02d}.dcm") for i in range(20)]
        wait_for(lambda: n.health().get("model_version") == "2", 30, "swap to version 2")
        uids_v2 = [copy_with_new_uid(src, n.inbox / f"c{i:02d}.dcm") for i in range(20)]
        wait_for(lambda: n.n_predictions() >= 60, 120, "60 predictions")
        version = dict(n.query("SELECT sop_instance_uid, model_version FROM predictions"))
        assert len(version) == 60 and set(version) == set(uids_v1 + mid + uids_v2)
        assert {version[u] for u in uids_v2} == {"2"}
        assert set(version.values()) == {"1", "2"}
        assert n.health()["status"] == "ok"
        # a broken replacement is refused; version 2 keeps serving
        (models / "current.onnx").write_bytes(b"half a model")
        time.sleep(1.5)
        assert n.alive() and n.health()["model_version"] == "2"

        late = [copy_with_new_uid(src, n.inbox / f"d{i:02d}.dcm") for i in range(30)]
        assert n.terminate() == 0
        make_classifier(models / "current.onnx", version="2")  # a broken model stops a start
        log = n.log.read_text()
        assert "draining" in log and "node stopped" in log
        done = {r[0] for r in n.query("SELECT sop_instance_uid FROM predictions")}
        n.start()  # catch-up scan
        wait_for(lambda: n.n_predictions() >= 90, 120, "late files after restart")
        rows = n.query("SELECT sop_instance_uid, COUNT(*) FROM predictions GROUP BY 1")
        assert len(rows) == 90 and all(c == 1 for _u, c in rows)
        assert set(late) <= {r[0] for r in rows}
        assert n.query("SELECT COUNT(*) FROM files WHERE outcome = 'predicted'")[0][0] == 90
        assert len(done) >= 60
        assert n.terminate() == 0
    finally:
        n.kill()
        shutil.rmtree(n.folder / "inbox", ignore_errors=True)
