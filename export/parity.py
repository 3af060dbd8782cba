"""Torch vs onnxruntime: the exported file must give the logits the torch model gives."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort
import torch

from export.errors import ParityError
from export.net import FedscanNet

log = logging.getLogger(__name__)

ATOL = 1e-4  # absolute slack on logits
RTOL = 1e-3  # plus this fraction of the largest |logit| (trained models have large logits)


def ort_session(onnx_path: str | os.PathLike[str], *, threads: int = 1) -> ort.InferenceSession:
    """CPU session the way the edge node runs one: explicit intra-op threads, no spinning."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def parity_check(
    model: FedscanNet,
    onnx_path: str | os.PathLike[str],
    images: np.ndarray | torch.Tensor,
    texture: np.ndarray | torch.Tensor | None = None,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    threads: int = 1,
) -> float:
    """Max abs logit difference, torch eval vs onnxruntime, on ``images`` [N,1,H,W] in [0,1].

    Raises ``ParityError`` when it exceeds ``atol + rtol * max|torch logit|``.
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    t = None if texture is None else torch.as_tensor(np.asarray(texture, dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x, t).numpy()
    finally:
        model.train(was_training)
    feeds = {"image": x.numpy()}
    if t is not None:
        feeds["texture"] = t.numpy()
    got = np.asarray(ort_session(onnx_path, threads=threads).run(["logits"], feeds)[0])
    if got.shape != expected.shape:
        raise ParityError(f"{model.arch}: ONNX logits shape {got.shape}, torch {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    limit = atol + rtol * float(np.max(np.abs(expected)))
    log.debug("parity %s batch %d: max abs logit diff %.3g", model.arch, len(x), diff)
    if not np.isfinite(diff) or diff > limit:
        raise ParityError(
            f"{model.arch}: ONNX vs torch max abs logit diff {diff:.3g} > {limit:.3g} "
            f"(batch {len(x)})"
        )
    return diff
