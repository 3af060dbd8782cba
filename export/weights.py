"""FedscanNet weights on disk and on the wire: safetensors (float32) with metadata, never pickle.

The safetensors metadata carries ``arch``, ``texture_dim`` and ``version`` (docs/CONTRACTS.md),
plus ``init`` and ``format``, so a file alone rebuilds its model. Every tensor travels as float32;
integer buffers (BatchNorm ``num_batches_tracked``) are cast back to their dtype on load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from export.errors import WeightsError
from export.net import FedscanNet

FORMAT = "fedscan.weights/1"


def state_to_numpy(model: FedscanNet) -> dict[str, np.ndarray]:
    """Every state_dict entry as a contiguous float32 numpy array (a copy)."""
    return {
        k: v.detach().to("cpu", torch.float32).contiguous().numpy().copy()
        for k, v in model.state_dict().items()
    }


def load_numpy_state(
    model: FedscanNet, arrays: dict[str, np.ndarray], *, strict: bool = True
) -> None:
    """Copy ``arrays`` into ``model`` in place (cast to each entry's dtype).

    ``strict``: the keys must be exactly the model's; otherwise a subset is allowed (e.g. only
    the trainable tensors). Unknown keys, wrong shapes and non-finite values are always refused.
    """
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    missing = sorted(set(state) - set(arrays)) if strict else []
    if unknown or missing:
        raise WeightsError(
            f"{model.arch}: state does not match ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unknown)} unknown, e.g. {unknown[:3]})"
        )
    for key, arr in arrays.items():
        target = state[key]
        if tuple(arr.shape) != tuple(target.shape):
            raise WeightsError(
                f"{model.arch}: {key} has shape {tuple(arr.shape)}, expected {tuple(target.shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"{model.arch}: {key} contains NaN or inf")
    with torch.no_grad():
        for key, arr in arrays.items():
            state[key].copy_(torch.tensor(np.asarray(arr)).to(state[key].dtype))


def save_weights(model: FedscanNet, path: str | os.PathLike[str], *, version: str | int) -> Path:
    """Write the model's state (float32) and metadata to ``path`` atomically."""
    out = Path(path)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    metadata = {
        "format": FORMAT,
        "arch": model.arch,
        "texture_dim": str(model.texture_dim),
        "version": str(version),
        "init": model.init,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of a weights file (``WeightsError`` if unreadable)."""
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {Path(path).name}: {exc}") from exc
    return dict(meta)


def load_weights(path: str | os.PathLike[str]) -> FedscanNet:
    """Rebuild the model named in the file's metadata and load its state (strict).

    ``init`` of the returned model is the file name (what the ONNX metadata records).
    """
    from export.zoo import create_model  # zoo imports the registry builders; avoid a cycle

    src = Path(path)
    meta = read_metadata(src)
    if "arch" not in meta or "texture_dim" not in meta:
        raise WeightsError(f"{src.name}: not a fedscan weights file (no arch/texture_dim metadata)")
    try:
        texture_dim = int(meta["texture_dim"])
    except ValueError:
        raise WeightsError(f"{src.name}: bad texture_dim {meta['texture_dim']!r}") from None
    model = create_model(meta["arch"], texture_dim=texture_dim)
    with safe_open(str(src), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    load_numpy_state(model, arrays)
    model.init = src.name
    return model


def weights_version(path: str | os.PathLike[str]) -> str:
    """The ``version`` recorded in a weights file ("" when absent)."""
    return read_metadata(path).get("version", "")
