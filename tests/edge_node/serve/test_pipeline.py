"""Pipeline with real DICOM files, the real preprocessor, onnxruntime and SQLite."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_node.config import PreprocessConfig
from edge_node.ingest.quarantine import Quarantine
from edge_node.ingest.watcher import ReadyFile
from edge_node.serve.inference import ModelHolder
from edge_node.serve.pipeline import Pipeline
from edge_node.store import Store
from tests.helpers.dicom_factory import (
    copy_with_new_uid,
    sample_path,
    truncated_copy,
    write_ct,
    write_garbage,
)
from tests.helpers.onnx_models import make_classifier

WAIT = 20.0


class Harness:
    """A started Pipeline whose watcher callbacks land in queues."""

    def __init__(self, tmp: Path, **kw: object) -> None:
        self.tmp = tmp
        self.inbox = tmp / "inbox"
        self.inbox.mkdir(exist_ok=True)
        self.store = Store(tmp / "state" / "node.sqlite")
        self.holder = ModelHolder(intra_op_threads=1)
        self.holder.swap(make_classifier(tmp / "models" / "v1.onnx", version="1"))
        self.finished: queue.Queue[ReadyFile] = queue.Queue()
        self.retried: queue.Queue[ReadyFile] = queue.Queue()
        self.pipeline = Pipeline(
            holder=self.holder,
            store=self.store,
            quarantine=Quarantine(tmp / "quarantine"),
            preprocess=PreprocessConfig(),
            on_finished=self.finished.put,
            on_retry=self.retried.put,
            **kw,  # type: ignore[arg-type]
        )
        self.pipeline.start()

    def submit(self, path: Path, stable: bool = True) -> ReadyFile:
        st = path.stat()
        r = ReadyFile(path.resolve(), st.st_size, st.st_mtime, stable, time.monotonic(), "closed")
        self.pipeline.submit(r)
        return r

    def wait(self, n: int = 1) -> list[ReadyFile]:
        return [self.finished.get(timeout=WAIT) for _ in range(n)]

    def file(self, path: Path) -> dict:
        row = self.store.file(str(path.resolve()))
        assert row is not None, f"no files row for {path.name}"
        return row


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.pipeline.drain(10)
    harness.store.close()


def _inbox_snapshot(inbox: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(inbox.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def test_real_ct_slice_is_predicted_and_stored(h: Harness) -> None:
    """A real 512x512 CT slice -> one prediction row with UIDs, label, timings; inbox untouched."""
    src = h.inbox / "ct.dcm"
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), src)
    before = _inbox_snapshot(h.inbox)
    h.submit(src)
    (done,) = h.wait()
    assert done.path == src.resolve()
    (row,) = h.store.predictions_for(uid)
    assert row["frame"] == 0 and row["path"] == str(src.resolve())
    assert row["label"] in ("covid", "non_covid") and 0.5 <= row["confidence"] <= 1.0
    assert row["model_version"] == "1"
    assert (
        row["series_instance_uid"] and row["study_instance_uid"] and len(row["patient_key"]) == 64
    )
    for k in ("read_ms", "preprocess_ms", "infer_ms", "total_ms"):
        assert row[k] is not None and row[k] >= 0
    f = h.file(src)
    assert (f["outcome"], f["n_frames"], f["sop_instance_uid"]) == ("predicted", 1, uid)
    assert _inbox_snapshot(h.inbox) == before


def test_model_window_from_metadata_decides_preprocessing(tmp_path: Path) -> None:
    """The same -300 HU image is bright in the lung window and black in a soft-tissue window."""
    h = Harness(tmp_path)
    try:
        hu = np.full((64, 64), -300.0, np.float32)
        write_ct(h.inbox / "a.dcm", hu=hu, rows=64, cols=64)
        h.submit(h.inbox / "a.dcm")
        h.wait()
        assert h.store.recent_predictions(1)[0]["label"] == "covid"  # mean 0.7 in L-600/W1500
        h.holder.swap(make_classifier(tmp_path / "m2.onnx", version="2", window=(40.0, 400.0)))
        write_ct(h.inbox / "b.dcm", hu=hu, rows=64, cols=64)
        h.submit(h.inbox / "b.dcm")
        h.wait()
        latest = h.store.recent_predictions(1)[0]
        assert (latest["label"], latest["model_version"]) == ("non_covid", "2")  # mean 0.0
    finally:
        h.pipeline.drain(10)


def test_multiframe_enhanced_ct_gives_one_row_per_frame(h: Harness) -> None:
    src = h.inbox / "enhanced.dcm"
    uid = copy_with_new_uid(sample_path("eCT_Supplemental.dcm"), src)
    h.submit(src)
    h.wait()
    assert [r["frame"] for r in h.store.predictions_for(uid)] == [0, 1]
    assert h.file(src)["n_frames"] == 2


def test_unusable_files_are_quarantined_or_skipped_with_reasons(h: Harness) -> None:
    """Garbage and cut-off files go to quarantine/ (copy + reason.json); non-CT is skipped."""
    garbage = write_garbage(h.inbox / "garbage.dcm")
    text = h.inbox / "notes"
    text.write_text("not a dicom file at all\n")
    cut = truncated_copy(sample_path("693_UNCR.dcm"), h.inbox / "cut.dcm", 0.5)
    mr = h.inbox / "mr.dcm"
    write_ct(mr, modality="MR", rows=32, cols=32)
    before = _inbox_snapshot(h.inbox)
    for p in (garbage, text, cut, mr):
        h.submit(p)
    h.wait(4)
    for p, reason in ((garbage, "not_dicom"), (text, "not_dicom"), (cut, "truncated")):
        f = h.file(p)
        assert f["outcome"] == "quarantined" and f["reason"].startswith(reason), f
        copy = h.tmp / "quarantine" / p.name
        assert copy.read_bytes() == p.read_bytes()
        info = json.loads((h.tmp / "quarantine" / f"{p.name}.reason.json").read_text())
        assert info["reason"] == reason and info["source_path"] == str(p.resolve())
    f = h.file(mr)
    assert f["outcome"] == "skipped" and f["reason"].startswith("modality:MR")
    assert not (h.tmp / "quarantine" / "mr.dcm").exists()
    assert h.store.count_predictions() == 0
    assert _inbox_snapshot(h.inbox) == before  # copies, never moves


def test_unconfirmed_partial_file_is_retried_not_quarantined(h: Harness) -> None:
    """A file handed over on a close event that does not parse may still be written to."""
    cut = truncated_copy(sample_path("693_UNCR.dcm"), h.inbox / "partial.dcm", 0.4)
    h.submit(cut, stable=False)
    r = h.retried.get(timeout=WAIT)
    assert r.path == cut.resolve()
    assert h.store.file(str(cut.resolve())) is None
    assert not (h.tmp / "quarantine" / "partial.dcm").exists()


def test_duplicate_sop_instance_in_another_file_is_skipped(h: Harness) -> None:
    first = h.inbox / "one.dcm"
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), first)
    h.submit(first)
    h.wait()
    second = h.inbox / "sub" / "copy_of_one.dcm"
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())
    h.submit(second)
    h.wait()
    assert h.file(second)["outcome"] == "skipped"
    assert h.file(second)["reason"].startswith("duplicate_sop_instance_uid")
    assert len(h.store.predictions_for(uid)) == 1
    # The same file seen again (touched) is predicted again in place, not a duplicate.
    os.utime(first)
    h.submit(first)
    h.wait()
    assert h.file(first)["outcome"] == "predicted"
    assert len(h.store.predictions_for(uid)) == 1


def test_burst_is_predicted_in_batches(tmp_path: Path) -> None:
    """Files submitted faster than they are predicted are grouped into fewer onnxruntime calls."""
    h = Harness(tmp_path, files_per_batch=16, slices_per_run=8)
    try:
        paths = [write_ct(h.inbox / f"b{i:03d}.dcm", rows=64, cols=64, seed=i) for i in range(60)]
        for p in paths:
            h.submit(p)
        h.wait(60)
        assert h.store.count_predictions() == 60
        assert h.store.counts_by_outcome()["predicted"] == 60
        snap = h.pipeline.stats.snapshot()
        assert snap.batch_slices == 60
        assert snap.batches < 60  # at least some calls carried several slices
        assert snap.batches >= 60 // 8  # slices_per_run caps one call
    finally:
        h.pipeline.drain(10)


def test_model_swap_between_stages_reprepares_with_the_new_window(h: Harness) -> None:
    """A file prepared for model 1 but predicted after a swap is preprocessed again."""
    write_ct(h.inbox / "w.dcm", hu=np.full((64, 64), -300.0, np.float32), rows=64, cols=64)
    st = (h.inbox / "w.dcm").stat()
    ready = ReadyFile((h.inbox / "w.dcm").resolve(), st.st_size, st.st_mtime, True, 0.0, "closed")
    m1 = h.holder.current()
    assert m1 is not None
    prepared = h.pipeline._prepare(ready, m1)
    h.holder.swap(make_classifier(h.tmp / "m2.onnx", version="2", window=(40.0, 400.0)))
    m2 = h.holder.current()
    assert m2 is not None
    rows = h.pipeline._predict_and_store([prepared], m2)  # type: ignore[list-item]
    (row,) = rows[str(ready.path)]
    assert (row["label"], row["model_version"]) == ("non_covid", "2")


def test_process_now_for_uploads(h: Harness) -> None:
    up = h.tmp / "upload.dcm"
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), up)
    out = h.pipeline.process_now(up)
    assert out.outcome == "predicted" and out.sop_instance_uid == uid
    assert [p["sop_instance_uid"] for p in out.predictions] == [uid]
    assert out.predictions[0]["id"] == h.store.predictions_for(uid)[0]["id"]
    bad = write_garbage(h.tmp / "bad_upload.dcm")
    refused = h.pipeline.process_now(bad)
    assert (refused.outcome, refused.reason) == ("quarantined", "not_dicom")
    assert h.store.file(str(bad)) is None  # uploads are not inbox files: no row, no copy
    assert not (h.tmp / "quarantine").exists() or not any((h.tmp / "quarantine").iterdir())


def test_drain_finishes_everything_submitted(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    paths = [write_ct(h.inbox / f"d{i}.dcm", rows=48, cols=48, seed=i) for i in range(20)]
    for p in paths:
        h.submit(p)
    assert h.pipeline.drain(30)
    assert h.store.count_predictions() == 20
    assert h.finished.qsize() == 20


def test_texture_model_gets_glcm_lbp_features_of_each_frame(tmp_path: Path) -> None:
    """fedscan.texture=glcm_lbp: the pipeline feeds ingest.texture features of the slice."""
    texture = pytest.importorskip("edge_node.ingest.texture")
    from edge_node.ingest.preprocess import PreprocessParams, prepare
    from edge_node.serve.inference import OnnxModel

    h = Harness(tmp_path)
    try:
        tex_model = make_classifier(
            tmp_path / "tex.onnx", version="t1", texture_dim=texture.TEXTURE_DIM
        )
        h.holder.swap(tex_model)
        src = h.inbox / "ct.dcm"
        uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), src)
        h.submit(src)
        h.wait()
        (row,) = h.store.predictions_for(uid)
        assert row["model_version"] == "t1"
        frame = prepare(src, PreprocessParams()).frames[0]
        feats = texture.texture_features(frame)[None]
        expected = OnnxModel(tex_model, 1).predict(frame[None, None], feats)
        assert row["prob_covid"] == pytest.approx(float(expected.prob_covid[0]), abs=1e-6)
    finally:
        h.pipeline.drain(10)


def test_every_outcome_is_logged_at_info_naming_the_file(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A predicted, a quarantined and a skipped file each give one INFO line naming the file:
    by its path tag by default, by its inbox-relative path when the daemon asks for it."""
    import logging

    from edge_node.ingest.quarantine import path_tag
    from edge_node.ingest.watcher import inbox_relative

    ct = h.inbox / "a" / "ct.dcm"
    copy_with_new_uid(sample_path("693_UNCR.dcm"), ct)
    junk = write_garbage(h.inbox / "a" / "junk.dcm")
    mr = write_ct(h.inbox / "a" / "mr.dcm", rows=16, cols=16, modality="MR")
    with caplog.at_level(logging.INFO, logger="edge_node.serve.pipeline"):
        h.submit(ct)
        h.wait()
        h.pipeline.file_ref = lambda p: inbox_relative(h.inbox.resolve(), p)
        for path in (junk, mr):
            h.submit(path)
            h.wait()
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith(f"file {path_tag(ct.resolve())} predicted (1 frame(s)") for m in info)
    assert "file a/junk.dcm quarantined (not_dicom)" in info, info
    assert any(m.startswith("file a/mr.dcm skipped (modality") for m in info), info
    assert not any("ct.dcm" in m for m in info)  # tag only while file_ref is the default
