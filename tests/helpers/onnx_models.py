"""Tiny real ONNX classifiers for tests, built with onnx.helper (no torch).

The graph follows the model contract (docs/CONTRACTS.md): input ``image`` float32
[N, 1, S, S] in [0, 1] (+ optional ``texture`` [N, D]), output ``logits`` [N, 2], fedscan
metadata in ``metadata_props``. It classifies by the mean brightness of the image:

    m = mean(image);  logits = [scale * (threshold - m), scale * (m - threshold)] (+ texture . w)

so a test can predict the label of an input, and two versions of the model can be told apart
by ``fedscan.model_version``. onnxruntime runs it in microseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # understood by every onnxruntime >= 1.15


def make_classifier(
    path: str | Path,
    *,
    version: str = "1",
    arch: str = "tiny_mean",
    size: int = 224,
    threshold: float = 0.5,
    scale: float = 10.0,
    texture_dim: int = 0,
    window: tuple[float, float] | None = (-600.0, 1500.0),
    class_names: tuple[str, ...] = ("non_covid", "covid"),
    metadata: dict[str, str] | None = None,
    fedscan_metadata: bool = True,
) -> Path:
    """Write a mean-brightness classifier to ``path`` (atomically) and return the path."""
    path = Path(path)
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])]
    feat = 1 + texture_dim
    w = np.zeros((feat, 2), np.float32)
    w[0] = [-scale, scale]
    if texture_dim:
        w[1:, 1] = 0.01  # texture nudges toward covid a little: it must reach the model
    b = np.array([scale * threshold, -scale * threshold], np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["mean"], axis=1),
    ]
    gemm_in = "mean"
    if texture_dim:
        inputs.append(
            helper.make_tensor_value_info("texture", TensorProto.FLOAT, ["N", texture_dim])
        )
        nodes.append(helper.make_node("Concat", ["mean", "texture"], ["features"], axis=1))
        gemm_in = "features"
    nodes.append(helper.make_node("Gemm", [gemm_in, "W", "B"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "fedscan_tiny",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(class_names)])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    meta: dict[str, str] = {}
    if fedscan_metadata:
        meta = {
            "fedscan.schema": "1",
            "fedscan.arch": arch,
            "fedscan.model_version": version,
            "fedscan.class_names": json.dumps(list(class_names)),
            "fedscan.input_size": str(size),
            "fedscan.texture": "glcm_lbp" if texture_dim else "none",
            "fedscan.texture_dim": str(texture_dim),
            "fedscan.init": "random",
        }
        if window is not None:
            meta["fedscan.window_center"] = f"{window[0]:g}"
            meta["fedscan.window_width"] = f"{window[1]:g}"
    meta.update(metadata or {})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def expected_label(mean: float, threshold: float = 0.5) -> str:
    """What ``make_classifier`` predicts for an image of this mean brightness (no texture)."""
    return "covid" if mean > threshold else "non_covid"
