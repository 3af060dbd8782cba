"""`fedscan export`: the command writes the ONNX file and checks it on real CT slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_node.ingest.texture import TEXTURE_DIM
from export.weights import save_weights
from export.zoo import create_model, list_archs
from fedscan import export_cmd
from fedscan.cli import main
from tests.helpers.dicom_factory import FIXTURES_DIR


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_cli_arch_choices_are_the_registry() -> None:
    """The parser's list (kept torch-free) names exactly the registered architectures."""
    assert sorted(export_cmd.ARCHS) == list_archs()


def test_export_prints_parity_at_batch_1_and_8(tmp_path: Path, capsys) -> None:
    """A fresh cnn2d exports and its parity on the default real CT samples is printed per batch."""
    out = tmp_path / "model.onnx"
    assert main(["export", "--arch", "cnn2d", "--model-version", "7", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity batch 1: max abs logit diff" in text
    assert "parity batch 8: max abs logit diff" in text
    assert _meta(out)["fedscan.model_version"] == "7"
    assert _meta(out)["fedscan.init"] == "random"


def test_export_trained_weights_with_texture_json(tmp_path: Path, capsys) -> None:
    """--weights with texture features: arch/texture from the file, init = file name, JSON out."""
    weights = save_weights(
        create_model("cnn2d", texture_dim=TEXTURE_DIM), tmp_path / "global-4.safetensors", version=4
    )
    out = tmp_path / "tex.onnx"
    argv = ["export", "--weights", str(weights), "--texture", "--model-version", "4"]
    assert main([*argv, "--out", str(out), "--json", "--parity-slices", str(FIXTURES_DIR)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["arch"] == "cnn2d" and summary["texture_dim"] == TEXTURE_DIM
    assert summary["parity_slices"] >= 3  # the CT files among the fixtures; others are skipped
    assert set(summary["max_abs_logit_diff"]) == {"b1", "b8"}
    assert max(summary["max_abs_logit_diff"].values()) < 1e-4
    meta = _meta(out)
    assert meta["fedscan.init"] == "global-4.safetensors"
    assert meta["fedscan.texture"] == "glcm_lbp" and meta["fedscan.texture_dim"] == "22"


def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys) -> None:
    """Wrong arch for the weights, or no CT slice to check against: exit code, no traceback."""
    weights = save_weights(create_model("cnn2d"), tmp_path / "w.safetensors", version=1)
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--arch", "resnet18", "--weights", str(weights), "--out", out]) == 1
    assert "holds cnn2d" in capsys.readouterr().err
    mr_only = FIXTURES_DIR / "emri_small.dcm"
    assert main(["export", "--arch", "cnn2d", "--parity-slices", str(mr_only), "--out", out]) == 1
    assert "no usable CT slices" in capsys.readouterr().err
    assert not Path(out).exists()
    with pytest.raises(SystemExit):
        main(["export", "--arch", "resnet19", "--out", out])


def test_parity_batch_pads_with_mirror_images() -> None:
    """With fewer than 8 slices, batch 8 uses the slices, then their mirror images, then repeats."""
    slices = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    batch = export_cmd.parity_batch(slices, 8)
    assert batch.shape == (8, 1, 4, 4)
    assert np.array_equal(batch[3, 0], slices[0, :, ::-1])
    assert np.array_equal(batch[6, 0], slices[0])
    assert export_cmd.parity_batch(slices, 1).shape == (1, 1, 4, 4)
