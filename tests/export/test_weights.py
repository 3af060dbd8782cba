"""FedscanNet weights as safetensors with metadata, and as numpy dicts for the wire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from export.errors import WeightsError
from export.weights import (
    load_numpy_state,
    load_weights,
    read_metadata,
    save_weights,
    state_to_numpy,
)
from export.zoo import create_model


def test_save_load_roundtrip_rebuilds_model_from_metadata(tmp_path: Path) -> None:
    """A saved file alone rebuilds the same model: arch and texture_dim come from its metadata."""
    torch.manual_seed(0)
    model = create_model("cnn2d", texture_dim=22)
    path = save_weights(model, tmp_path / "global-3.safetensors", version=3)
    assert [p.name for p in tmp_path.iterdir()] == ["global-3.safetensors"]  # no temp left over
    meta = read_metadata(path)
    assert meta["arch"] == "cnn2d" and meta["texture_dim"] == "22" and meta["version"] == "3"
    with safe_open(str(path), framework="np") as f:
        assert all(f.get_tensor(k).dtype == np.float32 for k in f.keys())  # noqa: SIM118
    loaded = load_weights(path)
    assert (loaded.arch, loaded.texture_dim, loaded.init) == ("cnn2d", 22, "global-3.safetensors")
    x, t = torch.rand(2, 1, 224, 224), torch.rand(2, 22)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t), loaded.eval()(x, t))


def test_batchnorm_counters_keep_their_dtype(tmp_path: Path) -> None:
    """Integer buffers travel as float32 and come back as int64 with the same value."""
    model = create_model("resnet18")
    model.train()
    model(torch.rand(2, 1, 224, 224))
    loaded = load_weights(save_weights(model, tmp_path / "w.safetensors", version="local-ab12"))
    counter = loaded.state_dict()["backbone.bn1.num_batches_tracked"]
    assert counter.dtype == torch.int64 and int(counter) == 1


def test_numpy_state_roundtrip_and_partial_load() -> None:
    """state_to_numpy gives float32 copies; load_numpy_state loads all or (non-strict) a subset."""
    src, dst = create_model("cnn2d"), create_model("cnn2d")
    arrays = state_to_numpy(src)
    assert all(a.dtype == np.float32 for a in arrays.values())
    arrays["head.bias"][:] = 7.0  # a copy: the model is untouched
    assert not torch.all(src.head.bias == 7.0)
    load_numpy_state(dst, {"head.bias": arrays["head.bias"]}, strict=False)
    assert torch.all(dst.head.bias == 7.0)
    load_numpy_state(dst, state_to_numpy(src))
    assert all(
        torch.equal(a, b)
        for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.pop("head.bias"), "1 missing"),
        (lambda a: a.update(extra=np.zeros(1, np.float32)), "1 unknown"),
        (lambda a: a.update({"head.bias": np.zeros(3, np.float32)}), "shape"),
        (lambda a: a["head.weight"].__setitem__((0, 0), np.nan), "NaN"),
    ],
)
def test_bad_state_is_refused(change, match: str) -> None:
    """Wrong keys, shapes or non-finite values never reach the model."""
    model = create_model("cnn2d")
    arrays = state_to_numpy(model)
    change(arrays)
    with pytest.raises(WeightsError, match=match):
        load_numpy_state(model, arrays)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    """A file without fedscan metadata (or not safetensors at all) is a WeightsError."""
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="not a fedscan weights file"):
        load_weights(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(WeightsError):
        load_weights(tmp_path / "junk.safetensors")
