"""Optional INT8 quantisation of an exported model (onnxruntime.quantization). Measure, not default.

* ``dynamic``: weights to uint8 ahead of time, activations quantised per batch at run time
  (``ConvInteger`` / ``MatMulInteger``); needs no calibration data.
* ``static``: QDQ format, int8 per-channel weights and uint8 activations with ranges calibrated
  (min/max) on real preprocessed slices.

INT8 is not automatically faster on this CPU (see ARCHITECTURE.md): ``fedscan export`` does not
quantise unless asked, and the benchmark reports both. The fedscan metadata is copied over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from export.errors import ExportError

QuantMode = Literal["dynamic", "static"]


class SliceReader(CalibrationDataReader):
    """Feeds calibration slices (``image`` and optionally ``texture``) one at a time."""

    def __init__(self, images: np.ndarray, texture: np.ndarray | None = None) -> None:
        self._images = np.asarray(images, np.float32)
        self._texture = None if texture is None else np.asarray(texture, np.float32)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = self._next
        if i >= len(self._images):
            return None
        self._next += 1
        feed = {"image": self._images[i : i + 1]}
        if self._texture is not None:
            feed["texture"] = self._texture[i : i + 1]
        return feed

    def rewind(self) -> None:
        self._next = 0


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs one INFO line per tensor on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: QuantMode = "dynamic",
    calibration_images: np.ndarray | None = None,
    calibration_texture: np.ndarray | None = None,
) -> Path:
    """Write an INT8 copy of ``src`` to ``dst`` (static mode needs calibration slices)."""
    source, dest = Path(src), Path(dst)
    meta = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    if mode == "static" and (calibration_images is None or len(calibration_images) == 0):
        raise ExportError("static quantisation needs calibration slices")
    if mode not in ("dynamic", "static"):
        raise ExportError(f"unknown quantisation mode {mode!r}; choose dynamic or static")
    with tempfile.TemporaryDirectory(prefix="fedscan-quant-") as tmp, _quiet_root_logger():
        prepped = Path(tmp) / "prepped.onnx"
        raw = Path(tmp) / "int8.onnx"
        quant_pre_process(str(source), str(prepped), skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(str(prepped), str(raw), weight_type=QuantType.QUInt8)
        else:
            assert calibration_images is not None  # checked above; narrows for mypy
            quantize_static(
                str(prepped),
                str(raw),
                SliceReader(calibration_images, calibration_texture),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        model = onnx.load(str(raw))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_out = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp_out)
        os.replace(tmp_out, dest)
    except BaseException:
        Path(tmp_out).unlink(missing_ok=True)
        raise
    return dest
