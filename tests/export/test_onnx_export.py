"""Every registered model exports to one ONNX file that onnxruntime runs with torch's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.errors import ParityError
from export.onnx_export import export_onnx
from export.parity import ort_session, parity_check
from export.zoo import create_model, list_archs

TEXTURE_DIM = 22


@pytest.mark.parametrize("arch", list_archs())
def test_export_and_parity_batch_1_and_8(arch: str, tmp_path: Path) -> None:
    """A random-init model exports once and matches torch at batch 1 and 8 (dynamic batch)."""
    torch.manual_seed(0)
    model = create_model(arch)
    out = export_onnx(model, tmp_path / "model.onnx", model_version=0)
    images = np.random.default_rng(0).random((8, 1, 224, 224), dtype=np.float32)
    assert parity_check(model, out, images[:1]) < 1e-4
    assert parity_check(model, out, images) < 1e-4
    session = ort_session(out)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["N", 1, 224, 224]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert session.run(None, {"image": images[:3]})[0].shape == (3, 2)


def test_metadata_is_exactly_the_contract(tmp_path: Path) -> None:
    """metadata_props carry what the edge node reads: classes, window, texture, version, init."""
    model = create_model("cnn2d")
    out = export_onnx(
        model,
        tmp_path / "m.onnx",
        model_version="local-0a1b2c3d",
        window_center=-500,
        window_width=1400.5,
    )
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta == {
        "fedscan.schema": "1",
        "fedscan.arch": "cnn2d",
        "fedscan.model_version": "local-0a1b2c3d",
        "fedscan.class_names": '["non_covid", "covid"]',
        "fedscan.input_size": "224",
        "fedscan.window_center": "-500",
        "fedscan.window_width": "1400.5",
        "fedscan.texture": "none",
        "fedscan.texture_dim": "0",
        "fedscan.init": "random",
    }
    assert json.loads(meta["fedscan.class_names"]) == ["non_covid", "covid"]


def test_file_is_self_contained(tmp_path: Path) -> None:
    """One file, every weight inside: nothing else in the folder, no external-data tensors."""
    out = export_onnx(create_model("resnet18"), tmp_path / "model.onnx", model_version=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    proto = onnx.load(str(out), load_external_data=False)
    assert proto.graph.initializer
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    moved = tmp_path / "elsewhere" / "copy.onnx"  # the file alone, away from its folder, runs
    moved.parent.mkdir()
    moved.write_bytes(out.read_bytes())
    image = np.zeros((1, 1, 224, 224), np.float32)
    assert ort_session(moved).run(None, {"image": image})[0].shape == (1, 2)


def test_texture_model_takes_a_second_input(tmp_path: Path) -> None:
    """With texture features the ONNX model has inputs image and texture [N, D]."""
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", texture_dim=TEXTURE_DIM)
    out = export_onnx(model, tmp_path / "tex.onnx", model_version=1)
    session = ort_session(out)
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs == {"image": ["N", 1, 224, 224], "texture": ["N", TEXTURE_DIM]}
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fedscan.texture"] == "glcm_lbp" and meta["fedscan.texture_dim"] == "22"
    rng = np.random.default_rng(1)
    images = rng.random((8, 1, 224, 224), dtype=np.float32)
    texture = rng.random((8, TEXTURE_DIM), dtype=np.float32)
    assert parity_check(model, out, images[:1], texture[:1]) < 1e-4
    assert parity_check(model, out, images, texture) < 1e-4
    shifted = session.run(None, {"image": images, "texture": texture + 1.0})[0]
    assert not np.allclose(shifted, session.run(None, {"image": images, "texture": texture})[0])


def test_export_keeps_training_state_and_overwrites_atomically(tmp_path: Path) -> None:
    """Exporting a training model leaves it training; a re-export replaces the file in place."""
    model = create_model("cnn2d")
    model.set_train_mode("head")
    model.train()
    out = tmp_path / "current.onnx"
    export_onnx(model, out, model_version=1)
    assert model.training and not model.backbone.training
    with torch.no_grad():
        model.head.bias.add_(1.0)
    export_onnx(model, out, model_version=2)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fedscan.model_version"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.onnx"]


def test_parity_error_when_model_and_file_differ(tmp_path: Path) -> None:
    """A file that no longer matches the torch weights fails the parity check loudly."""
    model = create_model("cnn2d")
    out = export_onnx(model, tmp_path / "m.onnx", model_version=0)
    with torch.no_grad():
        model.head.bias.add_(0.5)
    with pytest.raises(ParityError, match="max abs logit diff"):
        parity_check(model, out, np.random.default_rng(0).random((2, 1, 224, 224), np.float32))


def test_dynamo_exporter_also_works(tmp_path: Path) -> None:
    """The torch.export-based exporter (opset 18) is a working fallback, also self-contained."""
    model = create_model("cnn2d", texture_dim=TEXTURE_DIM)
    out = export_onnx(model, tmp_path / "d.onnx", model_version=0, exporter="dynamo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]
    rng = np.random.default_rng(2)
    images = rng.random((8, 1, 224, 224), dtype=np.float32)
    texture = rng.random((8, TEXTURE_DIM), dtype=np.float32)
    assert parity_check(model, out, images, texture) < 1e-4


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_quantisation_runs_and_keeps_metadata(mode: str, tmp_path: Path) -> None:
    """An INT8 copy runs in onnxruntime, keeps the fedscan metadata and stays near fp32 logits."""
    from export.quantize import quantize_onnx

    torch.manual_seed(0)
    model = create_model("cnn2d")
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", model_version=5)
    images = np.random.default_rng(3).random((4, 1, 224, 224), dtype=np.float32)
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", mode=mode, calibration_images=images)
    meta = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert meta == {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    ref = ort_session(fp32).run(None, {"image": images})[0]
    got = ort_session(int8).run(None, {"image": images})[0]
    assert got.shape == (4, 2)
    assert np.abs(got - ref).max() < 0.1 * max(1.0, float(np.abs(ref).max()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]


def test_operating_point_travels_in_the_metadata_to_the_node(tmp_path: Path) -> None:
    """An operating point fitted on validation statistics is written as fedscan.temperature /
    threshold / uncertain_band, and the node's OnnxModel reads and applies it."""
    from edge_node.serve.inference import OnnxModel
    from fl_protocol.calibration import calibration_stats, fit_operating_point

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=200)
    z = np.where(y == 1, 2.0, -4.0) + rng.normal(0, 1.0, size=200)
    op = fit_operating_point(calibration_stats(np.stack([np.zeros(200), z], axis=1), y))
    assert op is not None
    torch.manual_seed(0)
    out = export_onnx(create_model("cnn2d"), tmp_path / "m.onnx", model_version=3, calibration=op)
    info = OnnxModel(out, intra_op_threads=1).info
    assert info.calibrated
    assert info.temperature == pytest.approx(op.temperature, rel=1e-5)
    assert info.threshold == pytest.approx(op.threshold, rel=1e-5)
    assert info.uncertain_band == pytest.approx(op.uncertain_band, rel=1e-5)
    plain = OnnxModel(export_onnx(create_model("cnn2d"), tmp_path / "p.onnx", model_version=3))
    assert not plain.info.calibrated and plain.info.threshold == 0.5
