"""`fedscan predict` and `fedscan node init/run` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_node.config import load_config
from fedscan.cli import main
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path, truncated_copy, write_ct
from tests.helpers.onnx_models import make_classifier

REPO = Path(__file__).resolve().parents[3]


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_predict_json_one_object_per_slice_or_frame(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_classifier(tmp_path / "m.onnx", version="9")
    ct = tmp_path / "in" / "ct.dcm"
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), ct)
    enhanced = tmp_path / "in" / "sub" / "enhanced.dcm"
    euid = copy_with_new_uid(sample_path("eCT_Supplemental.dcm"), enhanced)
    bad = truncated_copy(sample_path("693_UNCR.dcm"), tmp_path / "cut.dcm", 0.5)
    mr = write_ct(tmp_path / "mr.dcm", modality="MR", rows=32, cols=32)
    missing = tmp_path / "nope.dcm"
    rc = main(
        [
            "predict",
            str(ct),
            str(bad),
            str(tmp_path / "in" / "sub"),
            str(mr),
            str(missing),
            "--model",
            str(model),
            "--json",
            "--threads",
            "1",
        ]
    )
    assert rc == 9  # some inputs could not be used (exit code table, README)
    out = _lines(capsys.readouterr().out)
    assert [o["path"] for o in out] == [
        str(ct),
        str(bad),
        str(enhanced),
        str(enhanced),
        str(mr),
        str(missing),
    ]
    first = out[0]
    assert set(first) == {
        "path",
        "frame",
        "sop_instance_uid",
        "label",
        "confidence",
        "model_version",
    }
    assert (first["sop_instance_uid"], first["frame"], first["model_version"]) == (uid, 0, "9")
    assert first["label"] in ("covid", "non_covid") and 0.5 <= first["confidence"] <= 1
    assert out[1]["error"].startswith("truncated") and set(out[1]) == {"path", "error"}
    assert [(o["sop_instance_uid"], o["frame"]) for o in out[2:4]] == [(euid, 0), (euid, 1)]
    assert out[4]["error"].startswith("modality:MR")
    assert out[5]["error"].startswith("not_found")


def test_predict_matches_the_daemon_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same model, same file: the CLI and the pipeline agree (same preprocessing, same window)."""
    from edge_node.config import PreprocessConfig
    from edge_node.ingest.preprocess import PreprocessParams, model_key, prepare
    from edge_node.serve.inference import OnnxModel

    model_path = make_classifier(tmp_path / "m.onnx", window=(-400.0, 1200.0))
    ct = tmp_path / "ct.dcm"
    copy_with_new_uid(sample_path("693_J2KR.dcm"), ct)
    assert main(["predict", str(ct), "--model", str(model_path), "--json"]) == 0
    (cli,) = _lines(capsys.readouterr().out)
    model = OnnxModel(model_path, 1)
    wc, ww, size, _ = model_key(model, PreprocessConfig())
    assert (wc, ww) == (-400.0, 1200.0)
    frames = prepare(ct, PreprocessParams(wc, ww, size)).frames
    pred = model.predict(frames[0][None, None])
    assert cli["confidence"] == pytest.approx(float(pred.confidence[0]), abs=1e-6)


def test_predict_exit_code_3_when_the_model_cannot_be_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct = write_ct(tmp_path / "ct.dcm", rows=32, cols=32)
    assert main(["predict", str(ct), "--model", str(tmp_path / "missing.onnx"), "--json"]) == 3
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    assert main(["predict", str(ct), "--model", str(broken), "--json"]) == 3
    err = capsys.readouterr().err
    assert "fedscan: error:" in err and "Traceback" not in err


def test_node_init_writes_a_loadable_config_and_folders(tmp_path: Path) -> None:
    assert main(["node", "init", str(tmp_path / "n")]) == 0
    cfg = load_config(tmp_path / "n" / "node.toml")
    assert cfg.paths.inbox == (tmp_path / "n" / "inbox").resolve()
    for name in ("inbox", "state", "quarantine", "models"):
        assert (tmp_path / "n" / name).is_dir()
    assert main(["node", "init", str(tmp_path / "n")]) == 2  # refuses to overwrite
    assert main(["node", "init", str(tmp_path / "n"), "--force", "--node-id", "ward_3"]) == 0
    assert load_config(tmp_path / "n" / "node.toml").node_id == "ward_3"


def test_node_run_refuses_an_unloadable_model_with_exit_3(tmp_path: Path) -> None:
    assert main(["node", "init", str(tmp_path / "n")]) == 0
    cmd = [
        sys.executable,
        "-m",
        "fedscan.cli",
        "node",
        "run",
        "--config",
        str(tmp_path / "n" / "node.toml"),
        "--api-port",
        "0",
        "--model",
        str(tmp_path / "missing.onnx"),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "model file not found" in out.stderr


def test_node_run_reports_a_busy_api_port_as_a_config_error(tmp_path: Path) -> None:
    import socket

    assert main(["node", "init", str(tmp_path / "n")]) == 0
    make_classifier(tmp_path / "n" / "models" / "current.onnx")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "fedscan.cli",
            "node",
            "run",
            "--config",
            str(tmp_path / "n" / "node.toml"),
            "--api-port",
            str(port),
        ]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cannot listen" in out.stderr and "Traceback" not in out.stderr
