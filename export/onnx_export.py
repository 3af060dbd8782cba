"""FedscanNet -> one self-contained ONNX file with the metadata the edge node reads.

Exporter: torch's TorchScript-based exporter (``dynamo=False``), still shipped by torch 2.13 and
deprecated there. It traces timm's resnet18 / efficientnet_b0 and cnn2d in well under a second
at opset 17 with parity ~1e-7, where the torch.export-based exporter takes ~5 s for resnet18,
cannot down-convert to opset 17 (it writes 18) and defaults to external data. ``exporter="dynamo"``
is kept as the way forward for when the TorchScript exporter goes away.

The file is written atomically (temp file in the same folder, then rename), always with every
weight inside the ``.onnx`` (no external data), a dynamic batch axis named ``N``, inputs
``image`` [N, 1, 224, 224] (+ ``texture`` [N, D] when the model has texture features) and
output ``logits`` [N, 2]. ``metadata_props`` follow docs/CONTRACTS.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Protocol

import onnx
import torch

from export.errors import ExportError
from export.net import CLASS_NAMES, FedscanNet

log = logging.getLogger(__name__)

METADATA_SCHEMA = "1"
INPUT_SIZE = 224
TEXTURE_KIND = "glcm_lbp"  # edge_node.ingest.texture: GLCM + uniform LBP
DEFAULT_OPSET = 17
Exporter = Literal["torchscript", "dynamo"]


class OperatingPointLike(Protocol):
    """``fl_protocol.calibration.OperatingPoint``: ``metadata()`` -> ``fedscan.*`` strings."""

    def metadata(self) -> Mapping[str, str]: ...


def _number(value: float) -> str:
    """-600.0 -> "-600"; 0.5 -> "0.5" (metadata values are strings)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def onnx_metadata(
    model: FedscanNet, *, model_version: str | int, window_center: float, window_width: float
) -> dict[str, str]:
    """The ``fedscan.*`` metadata_props for ``model`` (docs/CONTRACTS.md)."""
    return {
        "fedscan.schema": METADATA_SCHEMA,
        "fedscan.arch": model.arch,
        "fedscan.model_version": str(model_version),
        "fedscan.class_names": json.dumps(list(CLASS_NAMES)),
        "fedscan.input_size": str(INPUT_SIZE),
        "fedscan.window_center": _number(window_center),
        "fedscan.window_width": _number(window_width),
        "fedscan.texture": TEXTURE_KIND if model.texture_dim else "none",
        "fedscan.texture_dim": str(model.texture_dim),
        "fedscan.init": model.init,
    }


def export_onnx(
    model: FedscanNet,
    out: str | os.PathLike[str],
    *,
    model_version: str | int,
    window_center: float = -600,
    window_width: float = 1500,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "torchscript",
    calibration: OperatingPointLike | None = None,
) -> Path:
    """Export ``model`` (in eval mode; its train/eval state is restored) to ``out``.

    ``calibration``: an operating point fitted on validation data
    (``fl_protocol.calibration.OperatingPoint``, or anything with a ``metadata()`` of
    ``fedscan.*`` strings): its ``fedscan.temperature`` / ``fedscan.threshold`` /
    ``fedscan.uncertain_band`` join the metadata, which the node reads
    (``edge_node.serve.inference``). Without it the node uses T = 1, threshold 0.5.
    """
    if window_width <= 0:
        raise ExportError("window_width must be > 0")
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    args: tuple[torch.Tensor, ...] = (torch.rand(1, 1, INPUT_SIZE, INPUT_SIZE, generator=gen),)
    names = ["image"]
    if model.texture_dim:
        args = (*args, torch.rand(1, model.texture_dim, generator=gen))
        names.append("texture")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        if exporter == "torchscript":
            proto = _torchscript(model, args, names, opset)
        elif exporter == "dynamo":
            proto = _dynamo(model, args, names, opset)
        else:
            raise ExportError(f"unknown exporter {exporter!r}; choose torchscript or dynamo")
    finally:
        model.train(was_training)
    meta = onnx_metadata(
        model, model_version=model_version, window_center=window_center, window_width=window_width
    )
    if calibration is not None:
        extra = dict(calibration.metadata())
        clash = sorted(set(extra) & set(meta))
        bad = sorted(k for k in extra if not k.startswith("fedscan."))
        if clash or bad:
            raise ExportError(f"calibration metadata may not set {clash or bad}")
        meta.update(extra)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{model.arch}: exported graph is invalid: {exc}") from exc
    _write_atomic(proto, dest)
    log.info(
        "exported %s (texture_dim=%d, version %s) in %.2f s, %.1f MB",
        model.arch,
        model.texture_dim,
        model_version,
        time.perf_counter() - start,
        dest.stat().st_size / 1e6,
    )
    return dest


def _torchscript(
    model: FedscanNet, args: tuple[torch.Tensor, ...], names: list[str], opset: int
) -> onnx.ModelProto:
    buf = io.BytesIO()
    dynamic = {n: {0: "N"} for n in [*names, "logits"]}
    with warnings.catch_warnings():
        # the deprecation notice of this exporter and tracer notes on timm's shape asserts
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            buf,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(buf.getvalue())


def _dynamo(
    model: FedscanNet, args: tuple[torch.Tensor, ...], names: list[str], opset: int
) -> onnx.ModelProto:
    batch = torch.export.Dim("N", min=1, max=4096)
    shapes = {n: {0: batch} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=shapes,
            opset_version=max(opset, 18),  # the torch.export-based exporter starts at 18
            external_data=False,
            verbose=False,
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


def _write_atomic(proto: onnx.ModelProto, dest: Path) -> None:
    """Serialise with every tensor inline, to a temp file beside ``dest``, then rename."""
    data = proto.SerializeToString()  # raises past 2 GB: our models are < 100 MB
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
