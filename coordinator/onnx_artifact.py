"""The ONNX export the coordinator publishes beside each global version's weights.

A predict-only workstation (the base install: onnxruntime, no torch) cannot turn the global
safetensors into ONNX, so the coordinator, which has torch, does it once per version:
``export_global_onnx`` rebuilds the model from the checkpoint, exports it with
``export.onnx_export.export_onnx`` (metadata ``fedscan.model_version = V`` and the configured lung
window), checks torch vs onnxruntime logits with ``export.parity.parity_check`` and only then
renames the file into place. ``OnnxArtifacts`` keeps the result as
``checkpoints/global_v{N}.onnx`` next to ``global_v{N}.safetensors``, so a restarted coordinator
publishes the same bytes again without torch. The publisher chunks, hashes and signs it like the
weights (``GlobalManifest.onnx``).

A version whose export fails (no torch here, parity off) is published without ONNX: training
nodes export it themselves, predict-only nodes keep serving what they have and say why.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from coordinator.state import State
from fl_protocol.schemas import ServingPoint

log = logging.getLogger(__name__)

PARITY_BATCH = 4  # random [0, 1] images compared torch vs onnxruntime

# (weights file, out, model_version, window center, window width, extra metadata) -> out
OnnxExporter = Callable[[Path, Path, int, float, float, Mapping[str, str] | None], Path]


def export_global_onnx(
    weights: Path,
    out: Path,
    *,
    model_version: int | str,
    window_center: float = -600.0,
    window_width: float = 1500.0,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export the weights file ``weights`` to ``out`` after a parity check (imports torch).

    ``extra_metadata`` adds ``metadata_props`` (e.g. a fitted ``fedscan.temperature`` /
    ``fedscan.threshold``); it may not replace the keys the export itself writes. Raises
    ``export.errors.ExportError`` (``ParityError`` included) and leaves nothing at ``out``
    on failure.
    """
    import numpy as np
    import onnx

    from export.errors import ExportError
    from export.onnx_export import export_onnx
    from export.parity import parity_check
    from export.weights import load_weights

    model = load_weights(weights)
    model.init = f"global-{model_version}.safetensors"  # what a training node's export records
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(
            model,
            tmp,
            model_version=model_version,
            window_center=window_center,
            window_width=window_width,
        )
        if extra_metadata:
            proto = onnx.load(str(tmp))
            written = {p.key for p in proto.metadata_props}
            clash = sorted(written & set(extra_metadata))
            if clash:
                raise ExportError(f"extra ONNX metadata may not replace {clash}")
            for key, value in sorted(extra_metadata.items()):
                proto.metadata_props.add(key=str(key), value=str(value))
            onnx.save(proto, str(tmp))
        rng = np.random.default_rng(0)
        images = rng.random((PARITY_BATCH, 1, 224, 224), dtype=np.float32)
        texture = None
        if model.texture_dim:
            texture = rng.random((PARITY_BATCH, model.texture_dim), dtype=np.float32)
        diff = parity_check(model, tmp, images, texture)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("global v%s exported to ONNX (parity: max abs logit diff %.2g)", model_version, diff)
    return out


def torch_onnx_exporter(
    weights: Path,
    out: Path,
    version: int,
    center: float,
    width: float,
    extra: Mapping[str, str] | None,
) -> Path:
    """``export_global_onnx`` with positional arguments (the ``OnnxExporter`` shape)."""
    return export_global_onnx(
        weights,
        out,
        model_version=version,
        window_center=center,
        window_width=width,
        extra_metadata=extra,
    )


class OnnxArtifacts:
    """``checkpoints/global_v{N}.onnx``: made once per version, reused after a restart."""

    def __init__(
        self,
        state: State,
        *,
        window_center: float = -600.0,
        window_width: float = 1500.0,
        metadata_for: Callable[[int], Mapping[str, str] | None] | None = None,
        exporter: OnnxExporter = torch_onnx_exporter,
    ) -> None:
        """``metadata_for(version)``: extra ONNX metadata for that version (e.g. its fitted
        temperature / threshold), or None; default: the operating point fitted from the
        nodes' calibration statistics (``coordinator.calibration.CalibrationBook``)."""
        from coordinator.calibration import CalibrationBook

        self.state = state
        self.window_center = window_center
        self.window_width = window_width
        self.metadata_for = metadata_for or CalibrationBook(state.dir).metadata_for
        self.exporter = exporter
        self._failed: set[int] = set()  # versions whose export failed in this process

    def path(self, version: int) -> Path:
        return self.state.checkpoints / f"global_v{version}.onnx"

    def serving_point(self, version: int) -> ServingPoint | None:
        """The operating point in the metadata of ``version``'s ONNX file (what the manifest
        repeats for training nodes), or None (no file, or no point in it)."""
        path = self.path(version)
        if not path.is_file():
            return None
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            return ServingPoint.from_metadata({p.key: p.value for p in model.metadata_props})
        except Exception as exc:  # not ONNX, unreadable metadata, onnx not installed
            log.warning("global v%d: operating point of the ONNX file not readable (%s: %s)",
                        version, type(exc).__name__, exc)  # fmt: skip
            return None

    def ensure(self, version: int) -> Path | None:
        """The ONNX file of ``version`` (exported now if needed), or None if it cannot be made."""
        path = self.path(version)
        if path.is_file():
            return path
        if version in self._failed:
            return None
        try:
            return self.exporter(
                self.state.checkpoint_path(version),
                path,
                version,
                self.window_center,
                self.window_width,
                self.metadata_for(version) if self.metadata_for is not None else None,
            )
        except ImportError as exc:
            reason = f"torch / onnx are not installed (the 'train' extra): {exc}"
        except Exception as exc:  # ExportError, ParityError, OSError, a torch error
            reason = f"{type(exc).__name__}: {exc}"
        self._failed.add(version)
        log.error(
            "global v%d: no ONNX export (%s); published without it: training nodes export it "
            "themselves, predict-only nodes keep serving their current model",
            version,
            reason,
        )
        return None
