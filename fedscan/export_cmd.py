"""`fedscan export`: a FedscanNet -> one self-contained ONNX file, checked against torch.

    fedscan export --arch {resnet18,efficientnet_b0,cnn2d} [--weights FILE] [--texture]
                   [--pretrained hub|FILE] [--model-version V] --out model.onnx
                   [--parity-slices DIR_OR_FILE ...] [--int8 dynamic|static] [--json]

``--weights`` is a fedscan safetensors file (its metadata gives arch and texture_dim);
without it the model is built fresh (random init, or ``--pretrained`` for the backbone, with a
fresh classifier). After export, the ONNX file is run with onnxruntime on real CT slices
(preprocessed with ``edge_node.ingest.preprocess.prepare``, texture features with
``edge_node.ingest.texture``) at batch 1 and batch 8 and compared to torch eval; the max abs logit
difference of each is printed and a difference beyond tolerance fails the command (exit 13).
Default slices: the real CT samples of ``fedscan.samples`` in ``$FEDSCAN_SAMPLES``.
With fewer than 8 distinct slices, batch 8 adds their mirror images and then repeats.

Torch is imported only when the command runs, so ``fedscan --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from fedscan.samples import CT_SAMPLES, find_samples, missing

log = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = ("cnn2d", "efficientnet_b0", "resnet10_gn", "resnet18")  # = list_archs()
PARITY_BATCHES = (1, 8)


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "export", help="export a model to ONNX and check it against torch on real CT slices"
    )
    p.add_argument("--arch", choices=ARCHS, help="architecture (optional with --weights)")
    p.add_argument("--weights", type=Path, help="fedscan weights (.safetensors) to export")
    p.add_argument(
        "--pretrained",
        help="backbone init without --weights: 'hub' or a local timm checkpoint (default random)",
    )
    p.add_argument("--texture", action="store_true", help="GLCM + LBP texture features input")
    p.add_argument("--model-version", default="0", help="recorded as fedscan.model_version")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument(
        "--parity-slices",
        type=Path,
        nargs="+",
        metavar="DIR_OR_FILE",
        help="DICOM files or folders for the parity check (default: the CT samples in "
        "$FEDSCAN_SAMPLES)",
    )
    p.add_argument("--window-center", type=float, default=-600.0, help="lung window level (HU)")
    p.add_argument("--window-width", type=float, default=1500.0, help="lung window width (HU)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (torchscript exporter)")
    p.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch ONNX exporter (default torchscript)",
    )
    p.add_argument(
        "--int8",
        choices=("dynamic", "static"),
        help="also write OUT with suffix .int8.onnx (measure only; never the default)",
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed for random init")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    p.set_defaults(func=run)


def _build(args: argparse.Namespace) -> Any:
    import torch

    from edge_node.ingest.texture import TEXTURE_DIM
    from export.weights import load_weights
    from export.zoo import create_model

    torch.manual_seed(args.seed)
    if args.weights is not None:
        if args.pretrained:
            raise ExportError("--pretrained and --weights exclude each other")
        model = load_weights(args.weights)
        if args.arch and args.arch != model.arch:
            raise ExportError(f"--arch {args.arch} but {args.weights.name} holds {model.arch}")
        if args.texture and not model.texture_dim:
            raise ExportError(f"--texture but {args.weights.name} has no texture features")
    else:
        if not args.arch:
            raise ExportError("give --arch (or --weights)")
        model = create_model(
            args.arch, texture_dim=TEXTURE_DIM if args.texture else 0, pretrained=args.pretrained
        )
    if model.texture_dim not in (0, TEXTURE_DIM):
        raise ExportError(
            f"model has texture_dim {model.texture_dim}; the edge node computes {TEXTURE_DIM}"
        )
    return model


def _slice_files(paths: list[Path] | None) -> list[Path]:
    if paths:
        files: list[Path] = []
        for p in paths:
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.is_file())
            elif p.is_file():
                files.append(p)
            else:
                raise ExportError(f"--parity-slices: no such file or folder: {p}")
        return files
    found = find_samples(CT_SAMPLES)
    if not found:
        raise ExportError(f"parity check: {missing('--parity-slices', CT_SAMPLES)}")
    return found


def load_parity_slices(
    paths: list[Path] | None, *, window_center: float, window_width: float
) -> np.ndarray:
    """Distinct real preprocessed slices ``[K, 224, 224]`` (unusable files skipped, logged)."""
    from edge_node.errors import InputError
    from edge_node.ingest.preprocess import PreprocessParams, prepare

    params = PreprocessParams(window_center=window_center, window_width=window_width)
    frames: list[np.ndarray] = []
    for path in _slice_files(paths):
        try:
            prepared = prepare(path, params).frames
        except InputError as exc:
            log.info("parity: skipping a file (%s)", exc.reason)
            continue
        # the same image in another transfer syntax adds nothing to the check
        frames += [f for f in prepared if not any(np.array_equal(f, g) for g in frames)]
    if not frames:
        raise ExportError("no usable CT slices for the parity check (see --parity-slices)")
    return np.stack(frames).astype(np.float32)


def parity_batch(slices: np.ndarray, n: int) -> np.ndarray:
    """``n`` slices ``[n, 1, H, W]``: the real ones, then their mirror images, then repeats."""
    pool = np.concatenate([slices, slices[:, :, ::-1]]) if len(slices) < n else slices
    idx = np.arange(n) % len(pool)
    return np.ascontiguousarray(pool[idx][:, None])


def run(args: argparse.Namespace) -> int:
    import torch

    from edge_node.ingest.texture import texture_batch
    from export.onnx_export import export_onnx
    from export.parity import parity_check

    torch.set_num_threads(max(1, args.threads))
    model = _build(args)
    slices = load_parity_slices(
        args.parity_slices, window_center=args.window_center, window_width=args.window_width
    )
    t0 = time.perf_counter()
    out = export_onnx(
        model,
        args.out,
        model_version=args.model_version,
        window_center=args.window_center,
        window_width=args.window_width,
        opset=args.opset,
        exporter=args.exporter,
    )
    export_s = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "out": str(out),
        "arch": model.arch,
        "init": model.init,
        "texture_dim": model.texture_dim,
        "model_version": str(args.model_version),
        "size_mb": round(out.stat().st_size / 1e6, 2),
        "export_s": round(export_s, 3),
        "parity_slices": len(slices),
        "max_abs_logit_diff": {},
    }
    if not args.json:
        print(
            f"exported {model.arch} (init {model.init}, texture_dim {model.texture_dim}, "
            f"version {args.model_version}) -> {out} ({summary['size_mb']} MB) in {export_s:.2f} s"
        )
    batches = {n: parity_batch(slices, n) for n in PARITY_BATCHES}
    for n, images in batches.items():
        texture = texture_batch(images) if model.texture_dim else None
        diff = parity_check(model, out, images, texture, threads=args.threads)
        summary["max_abs_logit_diff"][f"b{n}"] = diff
        if not args.json:
            print(
                f"parity batch {n}: max abs logit diff {diff:.3g} "
                f"(torch vs onnxruntime, {len(slices)} distinct real CT slices)"
            )
    if args.int8:
        summary["int8"] = _int8(args, out, batches[max(PARITY_BATCHES)], model.texture_dim)
    if args.json:
        print(json.dumps(summary))
    return 0


def _int8(
    args: argparse.Namespace, out: Path, images: np.ndarray, texture_dim: int
) -> dict[str, Any]:
    from edge_node.ingest.texture import texture_batch
    from export.parity import ort_session
    from export.quantize import quantize_onnx

    texture = texture_batch(images) if texture_dim else None
    dest = out.with_name(out.stem + ".int8.onnx")
    quantize_onnx(
        out,
        dest,
        mode=args.int8,
        calibration_images=images,
        calibration_texture=texture,
    )
    feeds = {"image": images} | ({} if texture is None else {"texture": texture})
    ref = ort_session(out, threads=args.threads).run(["logits"], feeds)[0]
    got = ort_session(dest, threads=args.threads).run(["logits"], feeds)[0]
    drift = float(np.max(np.abs(got - ref)))
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    if not args.json:
        print(
            f"int8 ({args.int8}) -> {dest}: max abs logit diff vs fp32 {drift:.3g}, "
            f"same class on {agree:.0%} (measure only, not a default)"
        )
    return {"out": str(dest), "mode": args.int8, "max_abs_logit_diff_vs_fp32": drift}
