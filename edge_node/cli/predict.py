"""`fedscan predict PATH... --model M.onnx [--json] [--threads N]`: predict files, no daemon.

One line per slice/frame: with ``--json`` a JSON object
``{"path", "frame", "sop_instance_uid", "label", "confidence", "model_version"}``, or
``{"path", "error"}`` for an input that cannot be used. Folders are walked recursively.
Exit 0 when every input was predicted, 9 when any input could not be used (each one has its
error line; a count goes to stderr), 3 when the model cannot be loaded. Torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.errors import SOME_INPUTS_FAILED, InputError

BATCH = 16


@dataclass
class _Entry:
    path: str
    error: str | None = None
    frame: int = 0
    sop: str = ""
    image: np.ndarray | None = None
    texture: np.ndarray | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _emit(entry: _Entry, as_json: bool) -> None:
    if entry.error is not None:
        obj: dict[str, Any] = {"path": entry.path, "error": entry.error}
        line = json.dumps(obj) if as_json else f"{entry.path}: ERROR {entry.error}"
    else:
        obj = {
            "path": entry.path,
            "frame": entry.frame,
            "sop_instance_uid": entry.sop,
            **entry.result,
        }
        r = entry.result
        line = (
            json.dumps(obj)
            if as_json
            else f"{entry.path}[{entry.frame}]: {r['label']} {100 * r['confidence']:.1f}% "
            f"(model {r['model_version']})"
        )
    sys.stdout.write(line + "\n")


def run(args: argparse.Namespace) -> int:
    from edge_node.config import PreprocessConfig
    from edge_node.ingest.preprocess import PreprocessParams, model_key, prepare
    from edge_node.ingest.watcher import iter_candidates
    from edge_node.serve.inference import OnnxModel

    model = OnnxModel(Path(args.model), intra_op_threads=args.threads)  # ModelError -> exit 3
    wc, ww, size, _tex = model_key(model, PreprocessConfig())
    params = PreprocessParams(wc, ww, size, tuple(args.modalities))
    texture_fn = None
    if model.info.needs_texture:
        from edge_node.ingest.texture import texture_features

        texture_fn = texture_features

    entries: list[_Entry] = []
    counts = {"inputs": 0, "failed": 0}

    def flush() -> None:
        todo = [e for e in entries if e.image is not None]
        if todo:
            images = np.stack([e.image for e in todo])[:, None]  # type: ignore[misc]
            texture = np.stack([e.texture for e in todo]) if texture_fn else None  # type: ignore[misc]
            pred = model.predict(images, texture)
            for i, e in enumerate(todo):
                e.result = {
                    "label": pred.labels[i],
                    "confidence": round(float(pred.confidence[i]), 6),
                    "model_version": pred.model_version,
                }
        for e in entries:
            _emit(e, args.json)
            counts["failed"] += e.error is not None
        sys.stdout.flush()
        entries.clear()

    for path in iter_candidates([Path(p) for p in args.paths]):
        name = str(path)
        counts["inputs"] += 1
        if not path.is_file():
            entries.append(_Entry(name, error="not_found: no such file"))
            continue
        try:
            pf = prepare(path, params)
        except FileNotFoundError:
            entries.append(_Entry(name, error="not_found: no such file"))
        except InputError as exc:
            entries.append(_Entry(name, error=f"{exc.reason}: {exc}"))
        except OSError as exc:
            entries.append(_Entry(name, error=f"unreadable: {exc.strerror}"))
        else:
            for i, frame in enumerate(pf.frames):
                tex = texture_fn(frame) if texture_fn else None
                entries.append(
                    _Entry(name, frame=i, sop=pf.meta.sop_instance_uid, image=frame, texture=tex)
                )
        if sum(e.image is not None for e in entries) >= BATCH:
            flush()
    flush()
    if counts["failed"]:
        print(
            f"fedscan predict: {counts['failed']} of {counts['inputs']} inputs could not be used",
            file=sys.stderr,
        )
        return SOME_INPUTS_FAILED
    return 0


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "predict", help="predict DICOM files with an ONNX model (no daemon, no torch)"
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders")
    p.add_argument("--model", required=True, help="ONNX model file")
    p.add_argument("--json", action="store_true", help="one JSON object per slice/frame")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--modalities", nargs="+", default=["CT"], help="allowed modalities (* = any)")
    p.set_defaults(func=run)
