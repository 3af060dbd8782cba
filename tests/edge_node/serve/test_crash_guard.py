"""A file that kills the process while it is decoded must not crash-loop the node.

Layer 1 (edge_node.ingest.dicom_decode.check_jpeg_frames): a JPEG Lossless / JPEG-LS frame header
that disagrees with the DICOM header is refused before python-gdcm, which aborts on some of them.
Layer 2 (Pipeline decoding markers + recover_crashed): should a decoder still abort, the next
start quarantines the file (reason ``crashed_decoder``) instead of decoding it again. The abort
here is real: layer 1 is switched off in a forked child and gdcm gets a file it aborts on.
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

import edge_node.ingest.dicom_decode as dicom_decode
from edge_node.config import PreprocessConfig
from edge_node.errors import PixelDecodeError
from edge_node.ingest.dicom_decode import check_jpeg_frames, jpeg_frame_header, read_dataset
from edge_node.ingest.quarantine import Quarantine
from edge_node.ingest.watcher import ReadyFile
from edge_node.serve.crash_guard import CRASHED_DECODER
from edge_node.serve.inference import ModelHolder
from edge_node.serve.pipeline import Pipeline
from edge_node.store import Store
from tests.helpers.dicom_factory import sample_path
from tests.helpers.onnx_models import make_classifier

SIZE = 32


def edited(name: str, **values: Any) -> bytes:
    ds = pydicom.dcmread(sample_path(name))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


def make_pipeline(tmp: Path, model: Path) -> tuple[Pipeline, Store]:
    store = Store(tmp / "state" / "node.sqlite")
    holder = ModelHolder(intra_op_threads=1)
    holder.swap(model)
    pipeline = Pipeline(
        holder=holder,
        store=store,
        quarantine=Quarantine(tmp / "quarantine"),
        preprocess=PreprocessConfig(size=SIZE, modalities=("*",)),
        decoding_dir=tmp / "state" / "decoding",
    )
    return pipeline, store


def ready_file(path: Path) -> ReadyFile:
    st = path.stat()
    return ReadyFile(path, st.st_size, st.st_mtime, True, time.monotonic(), "catchup")


def crash_decoding(tmp: Path, model: Path, poison: Path) -> None:
    """One node start in a forked child, with layer 1 off: gdcm aborts it on ``poison``."""
    pid = os.fork()
    if pid == 0:
        try:
            faulthandler.disable()  # the abort is expected: no dump
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            dicom_decode.check_jpeg_frames = lambda ds: None
            pipeline, _ = make_pipeline(tmp, model)
            assert pipeline.recover_crashed() == 0
            current = pipeline.holder.current()
            assert current is not None
            pipeline._prepare(ready_file(poison), current)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT, status


def test_a_decoder_abort_is_quarantined_at_the_next_start(tmp_path: Path) -> None:
    model = make_classifier(tmp_path / "models" / "m.onnx", version="1", size=SIZE)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    poison = inbox / "poison.dcm"
    poison.write_bytes(edited("JLSL_16_15_1_1F.dcm", Rows=256, Modality="CT"))

    for attempt in (1, 2):  # the first death may be a coincidence (SIGKILL): decoded again
        crash_decoding(tmp_path, model, poison)
        markers = list((tmp_path / "state" / "decoding").glob("*.json"))
        assert len(markers) == 1
        assert json.loads(markers[0].read_text()) == {"path": str(poison), "attempt": attempt}

    pipeline, store = make_pipeline(tmp_path, model)  # "the next start"
    try:
        assert pipeline.recover_crashed() == 1  # died twice on it: quarantined
        row = store.file(str(poison))
        assert row is not None and row["outcome"] == "quarantined"
        assert str(row["reason"]).startswith(CRASHED_DECODER)
        st = poison.stat()
        assert store.file_signatures()[str(poison)] == (st.st_size, st.st_mtime)  # not rescanned
        reason = json.loads((tmp_path / "quarantine" / "poison.dcm.reason.json").read_text())
        assert reason["reason"] == CRASHED_DECODER
        assert (tmp_path / "quarantine" / "poison.dcm").read_bytes() == poison.read_bytes()
        assert list((tmp_path / "state" / "decoding").iterdir()) == []
        assert pipeline.recover_crashed() == 0
    finally:
        store.close()


def test_decoded_and_refused_files_leave_no_marker(tmp_path: Path) -> None:
    model = make_classifier(tmp_path / "models" / "m.onnx", version="1", size=SIZE)
    pipeline, store = make_pipeline(tmp_path, model)
    try:
        current = pipeline.holder.current()
        assert current is not None
        good = tmp_path / "good.dcm"
        good.write_bytes(sample_path("JLSL_16_15_1_1F.dcm").read_bytes())
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(edited("JLSL_16_15_1_1F.dcm", Rows=256))
        assert type(pipeline._prepare(ready_file(good), current)).__name__ == "Prepared"
        out = pipeline._prepare(ready_file(bad), current)
        assert (getattr(out, "outcome", None), getattr(out, "reason", None)) == (
            "quarantined",
            "jpeg_header_mismatch",
        )
        assert list((tmp_path / "state" / "decoding").glob("*")) == []
    finally:
        store.close()


def sof_frame(marker: int, p: int, y: int, x: int, nf: int) -> bytes:
    """A JPEG codestream start: SOI, an APP0 segment, the SOF, then SOS."""
    app0 = b"\xff\xe0" + struct.pack(">H", 6) + b"JFIF"
    sof = struct.pack(">BBHBHHB", 0xFF, marker, 8 + 3 * nf, p, y, x, nf) + b"\x01\x11\x00" * nf
    return b"\xff\xd8" + app0 + sof + b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00"


@pytest.mark.parametrize("marker", [0xC0, 0xC1, 0xC3, 0xF7])
def test_jpeg_frame_header_reads_the_sof(marker: int) -> None:
    sof = jpeg_frame_header(sof_frame(marker, 12, 512, 256, 1))
    assert sof is not None
    assert (sof.marker, sof.precision, sof.rows, sof.columns, sof.components) == (
        marker,
        12,
        512,
        256,
        1,
    )


def test_jpeg_frame_header_none_without_sof() -> None:
    assert jpeg_frame_header(b"") is None
    assert jpeg_frame_header(b"\x00\x00\x00") is None
    assert jpeg_frame_header(b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00") is None


def with_frame(name: str, frame: bytes) -> pydicom.Dataset:
    from pydicom.encaps import encapsulate

    ds = read_dataset(sample_path(name))
    ds.PixelData = encapsulate([frame])
    return ds


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (sof_frame(0xF7, 15, 0, 128, 1), "DNL"),  # height deferred: cannot be verified
        (b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00", "no JPEG frame header"),
        (sof_frame(0xF7, 15, 128, 128, 3), "components"),
        (sof_frame(0xF7, 17, 128, 128, 1), "precision"),
    ],
)
def test_unverifiable_or_mismatched_frames_are_refused(frame: bytes, why: str) -> None:
    ds = with_frame("JLSL_16_15_1_1F.dcm", frame)
    with pytest.raises(PixelDecodeError, match=why) as info:
        check_jpeg_frames(ds)
    assert info.value.reason == "jpeg_header_mismatch"


def test_real_jpeg_lossless_and_ls_samples_pass_the_check() -> None:
    for name in (
        "JLSL_16_15_1_1F.dcm",
        "JPEG-LL.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "bad_sequence.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ):
        check_jpeg_frames(read_dataset(sample_path(name)))


def test_one_death_while_decoding_a_good_file_does_not_quarantine_it(tmp_path: Path) -> None:
    """A SIGKILL (or power cut) that happens during a decode: the file is decoded again."""
    model = make_classifier(tmp_path / "models" / "m.onnx", version="1", size=SIZE)
    good = tmp_path / "good.dcm"
    good.write_bytes(sample_path("JLSL_16_15_1_1F.dcm").read_bytes())
    pipeline, store = make_pipeline(tmp_path, model)
    store.close()
    assert pipeline._mark_decoding(ready_file(good)) is not None  # then "killed"

    pipeline, store = make_pipeline(tmp_path, model)
    try:
        assert pipeline.recover_crashed() == 0
        assert store.file(str(good)) is None
        current = pipeline.holder.current()
        assert current is not None
        assert type(pipeline._prepare(ready_file(good), current)).__name__ == "Prepared"
        assert list((tmp_path / "state" / "decoding").glob("*")) == []
        assert not (tmp_path / "quarantine").exists() or not any(
            (tmp_path / "quarantine").iterdir()
        )
    finally:
        store.close()
