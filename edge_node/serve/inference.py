"""ONNX inference: one model file, its fedscan metadata, and an atomic holder for hot swaps.

The model file carries its own preprocessing parameters and class names in ``metadata_props``
(see docs/CONTRACTS.md), so the node predicts with whatever window the model was trained on.
onnxruntime is configured for a shared workstation: explicit intra-op threads, one inter-op
thread, sequential execution and no spinning (idle threads must not burn the viewer's CPU).
Torch is never imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_node.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("non_covid", "covid")
TEXTURE_KINDS: tuple[str, ...] = ("none", "glcm_lbp")
# Without a fitted band, P(covid) within 0.10 of the threshold is shown as "uncertain".
DEFAULT_UNCERTAIN_BAND = 0.10
UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class ModelInfo:
    """What the node knows about a loaded model, parsed from its ONNX metadata."""

    path: Path
    sha256: str
    model_version: str  # fedscan.model_version, or "sha256-<8 hex>" when absent
    arch: str  # fedscan.arch ("unknown" when absent)
    class_names: tuple[str, ...]  # index order of the logits
    input_size: int  # side of the square input image
    window_center: float | None  # lung window the model was trained with (HU), if stated
    window_width: float | None
    texture: str  # "none" | "glcm_lbp"
    texture_dim: int  # width of the optional `texture` input (0 = no texture input)
    init: str  # "random", "hub", a weights file name, or "unknown"
    image_input: str  # name of the image input
    texture_input: str | None  # name of the texture input, when the model has one
    # Operating point (fedscan.temperature / fedscan.threshold / fedscan.uncertain_band),
    # fitted on validation data; the defaults are an uncalibrated model's.
    temperature: float = 1.0  # logits are divided by this before the softmax
    threshold: float = 0.5  # P(covid) >= threshold -> "covid"
    uncertain_band: float = DEFAULT_UNCERTAIN_BAND  # |P(covid) - threshold| < band -> uncertain
    calibrated: bool = False  # True when the model file states a fitted threshold

    @property
    def needs_texture(self) -> bool:
        return self.texture != "none"

    @property
    def untrained(self) -> bool:
        """A model from random init that no training has touched (shown as such)."""
        return self.init == "random" and self.model_version in ("0", "")


@dataclass(frozen=True)
class Predictions:
    """Result of one ``OnnxModel.predict`` call, one entry per input image."""

    labels: list[str]
    probs: np.ndarray  # float32 [N, n_classes], softmax of the logits
    confidence: np.ndarray  # float32 [N], probability of the predicted class
    prob_covid: np.ndarray  # float32 [N], probability of "covid" (NaN if the model lacks it)
    model_version: str
    # Per image: the label, or "uncertain" when P(covid) lies inside the model's band.
    verdicts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Session options for a CPU shared with a radiologist's viewer."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _float_or_none(meta: dict[str, str], key: str) -> float | None:
    raw = meta.get(key)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise ModelError(f"model metadata {key}={raw!r} is not a number") from exc


def parse_info(path: Path, sha256: str, session: ort.InferenceSession) -> ModelInfo:
    """Read and check the fedscan metadata and the input/output signature of a session."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    schema = meta.get("fedscan.schema")
    if schema is not None and schema != "1":
        raise ModelError(f"{path.name}: unsupported fedscan.schema {schema!r} (expected '1')")
    if schema is None:
        log.warning("model %s has no fedscan metadata; using contract defaults", path.name)
    try:
        raw_names = meta.get("fedscan.class_names")
        class_names = tuple(json.loads(raw_names)) if raw_names else DEFAULT_CLASS_NAMES
        input_size = int(meta.get("fedscan.input_size", "224"))
        texture_dim = int(meta.get("fedscan.texture_dim", "0"))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path.name}: malformed fedscan metadata: {exc}") from exc
    if len(class_names) < 2 or not all(isinstance(c, str) for c in class_names):
        raise ModelError(f"{path.name}: fedscan.class_names must list >= 2 names")
    texture = meta.get("fedscan.texture", "none")
    if texture not in TEXTURE_KINDS:
        raise ModelError(f"{path.name}: fedscan.texture {texture!r} not in {TEXTURE_KINDS}")
    inputs = {i.name: i for i in session.get_inputs()}
    image_input = "image" if "image" in inputs else session.get_inputs()[0].name
    if len(inputs[image_input].shape) != 4:
        raise ModelError(f"{path.name}: image input must be [N, 1, H, W]")
    others = [n for n in inputs if n != image_input]
    texture_input = "texture" if "texture" in others else (others[0] if others else None)
    if texture != "none" and (texture_input is None or texture_dim <= 0):
        raise ModelError(f"{path.name}: fedscan.texture={texture} but no texture input/dim")
    if texture == "none" and texture_input is not None:
        raise ModelError(f"{path.name}: has a second input but fedscan.texture is 'none'")
    temperature, threshold, band = _operating_point(path, meta)
    out_shape = session.get_outputs()[0].shape
    if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != len(class_names)):
        raise ModelError(
            f"{path.name}: output {out_shape} does not match {len(class_names)} classes"
        )
    return ModelInfo(
        path=path,
        sha256=sha256,
        model_version=meta.get("fedscan.model_version") or f"sha256-{sha256[:8]}",
        arch=meta.get("fedscan.arch", "unknown"),
        class_names=class_names,
        input_size=input_size,
        window_center=_float_or_none(meta, "fedscan.window_center"),
        window_width=_float_or_none(meta, "fedscan.window_width"),
        texture=texture,
        texture_dim=texture_dim if texture != "none" else 0,
        init=meta.get("fedscan.init", "unknown"),
        image_input=image_input,
        texture_input=texture_input,
        temperature=temperature,
        threshold=threshold,
        uncertain_band=band,
        calibrated=meta.get("fedscan.threshold") not in (None, ""),
    )


def _operating_point(path: Path, meta: dict[str, str]) -> tuple[float, float, float]:
    """Temperature, threshold and uncertain band from the metadata, checked for sanity."""
    temperature = _float_or_none(meta, "fedscan.temperature")
    threshold = _float_or_none(meta, "fedscan.threshold")
    band = _float_or_none(meta, "fedscan.uncertain_band")
    t = 1.0 if temperature is None else temperature
    th = 0.5 if threshold is None else threshold
    b = DEFAULT_UNCERTAIN_BAND if band is None else band
    if not (np.isfinite(t) and 0.01 <= t <= 100.0):
        raise ModelError(f"{path.name}: fedscan.temperature {t} outside [0.01, 100]")
    if not (np.isfinite(th) and 0.0 < th < 1.0):
        raise ModelError(f"{path.name}: fedscan.threshold {th} outside (0, 1)")
    if not (np.isfinite(b) and 0.0 <= b < 0.5):
        raise ModelError(f"{path.name}: fedscan.uncertain_band {b} outside [0, 0.5)")
    return t, th, b


def verdict_of(prob_covid: float, threshold: float, band: float) -> str:
    """The call for one P(covid): "covid", "non_covid" or "uncertain" inside the band."""
    if not np.isfinite(prob_covid):
        return UNCERTAIN
    if abs(prob_covid - threshold) < band:
        return UNCERTAIN
    return "covid" if prob_covid >= threshold else "non_covid"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxModel:
    """One loaded ONNX model; ``predict`` is thread-safe (onnxruntime sessions are)."""

    def __init__(self, path: Path | str, intra_op_threads: int = 2) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        try:
            # Read the bytes once: hash and session come from the same content even if the
            # file is replaced while we load it.
            data = self.path.read_bytes()
            self.session = ort.InferenceSession(
                data,
                sess_options=session_options(intra_op_threads),
                providers=["CPUExecutionProvider"],
            )
        except ModelError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelError(f"cannot load model {self.path.name}: {exc}") from exc
        self.info = parse_info(self.path, hashlib.sha256(data).hexdigest(), self.session)
        self._output = self.session.get_outputs()[0].name
        self._covid = (
            self.info.class_names.index("covid") if "covid" in self.info.class_names else None
        )

    def warmup(self) -> None:
        """One prediction on a blank image: the first run allocates; do it before serving."""
        s, d = self.info.input_size, self.info.texture_dim
        self.predict(
            np.zeros((1, 1, s, s), np.float32), np.zeros((1, d), np.float32) if d else None
        )

    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name}, version={self.info.model_version})"

    def predict(self, images: np.ndarray, texture: np.ndarray | None = None) -> Predictions:
        """Classify ``images`` float32 [N, 1, S, S] in [0, 1] (+ ``texture`` [N, D])."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        s = self.info.input_size
        if images.ndim != 4 or images.shape[1:] != (1, s, s):
            raise ModelError(f"images must be [N, 1, {s}, {s}], got {list(images.shape)}")
        feeds: dict[str, np.ndarray] = {self.info.image_input: images}
        if self.info.texture_input is not None:
            if texture is None:
                raise ModelError(f"model {self.info.model_version} needs texture features")
            feeds[self.info.texture_input] = np.ascontiguousarray(texture, dtype=np.float32)
        if len(images) == 0:
            empty = np.zeros((0, len(self.info.class_names)), np.float32)
            return Predictions([], empty, empty[:, 0], empty[:, 0], self.info.model_version)
        (logits,) = self.session.run([self._output], feeds)
        info = self.info
        probs = softmax(np.asarray(logits, dtype=np.float32) / np.float32(info.temperature))
        idx = probs.argmax(axis=1)
        names = info.class_names
        if self._covid is not None:
            prob_covid = probs[:, self._covid]
            # The calibrated threshold, not argmax, decides between the two classes.
            if len(names) == 2:
                other = 1 - self._covid
                idx = np.where(prob_covid >= info.threshold, self._covid, other)
            verdicts = [
                verdict_of(float(p), info.threshold, info.uncertain_band) for p in prob_covid
            ]
        else:
            prob_covid = np.full(len(idx), np.nan)
            verdicts = [names[i] for i in idx]
        return Predictions(
            labels=[names[i] for i in idx],
            probs=probs,
            confidence=probs[np.arange(len(idx)), idx].astype(np.float32),
            prob_covid=prob_covid.astype(np.float32),
            model_version=info.model_version,
            verdicts=verdicts,
        )


SwapListener = Callable[[OnnxModel], None]


class ModelHolder:
    """The current model, swapped atomically.

    ``current()`` hands out a reference; a batch keeps using the model it was given while a
    swap installs the next one, so in-flight work is never dropped or mixed. A new model is
    fully loaded and checked before it replaces the old one; a broken file leaves the old
    model serving.
    """

    def __init__(self, intra_op_threads: int = 2) -> None:
        self.intra_op_threads = intra_op_threads
        self._lock = threading.Lock()
        self._model: OnnxModel | None = None
        self._ready = threading.Event()
        self._listeners: list[SwapListener] = []
        self.swaps = 0

    def current(self) -> OnnxModel | None:
        return self._model

    def wait(self, timeout: float | None = None) -> OnnxModel | None:
        """The current model, waiting up to ``timeout`` s for the first one."""
        self._ready.wait(timeout)
        return self._model

    def on_swap(self, listener: SwapListener) -> None:
        self._listeners.append(listener)

    def swap(self, path: Path | str) -> ModelInfo:
        """Load ``path`` and make it current; raises ``ModelError`` and keeps the old model."""
        model = OnnxModel(path, self.intra_op_threads)
        try:
            model.warmup()
        except Exception as exc:  # runs but cannot predict: never install it
            raise ModelError(
                f"model {model.info.model_version} fails on a blank image: {exc}"
            ) from exc
        return self.install(model)

    def install(self, model: OnnxModel) -> ModelInfo:
        with self._lock:
            old = self._model
            self._model = model
            self.swaps += 1
        self._ready.set()
        info = model.info
        log.info(
            "model %s: version=%s arch=%s window=%s/%s texture=%s (was %s)",
            "loaded" if old is None else "swapped",
            info.model_version,
            info.arch,
            info.window_center,
            info.window_width,
            info.texture,
            old.info.model_version if old else None,
        )
        for listener in list(self._listeners):
            try:
                listener(model)
            except Exception:
                log.exception("model swap listener failed")
        return info
