"""`fedscan node train`: train once on the node's labels, in the low-priority worker.

    fedscan node train --config node.toml [--epochs N] [--mode full|last_stage|head]
        [--arch A] [--init-weights FILE.safetensors] [--out DIR] [--onnx] [--mu MU]

Starts from ``--init-weights``, else ``<model_dir>/global.safetensors`` when present, else a
fresh ``training.arch`` model (``training.pretrained``). Writes ``weights.safetensors``,
``metrics.json`` (and ``model.onnx`` with ``--onnx``) into ``--out`` (default
``<state_dir>/train/runs/<UTC time>``). An interrupted run started again with the same settings
resumes from its last epoch. This module imports no torch; the worker does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_node.config import load_config
from edge_node.errors import TrainingError
from edge_node.labels import LabelBook
from edge_node.train.job import MODES, TrainJob
from edge_node.train.job_subprocess import run_subprocess


def _run(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    job = TrainJob.from_config(
        config,
        out_dir=Path(args.out).resolve() if args.out else None,
        init_weights=Path(args.init_weights).resolve() if args.init_weights else None,
        epochs=args.epochs,
        mode=args.mode,
        arch=args.arch,
        mu=args.mu,
        export_onnx=args.onnx or None,
        resume=False if args.no_resume else None,
    )
    with LabelBook(config.paths.database) as book:  # fail fast, before torch starts
        book.ingest_folder(config.paths.inbox)
        if not book.counts()["covid"] + book.counts()["non_covid"]:
            raise TrainingError(
                "no labelled slices yet: label some first (fedscan node label, the page, or "
                "<inbox>/labelled/covid|non_covid/)"
            )
    result = run_subprocess(job)
    if args.json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    val = result.val_metrics
    print(f"weights: {result.weights_path}")
    if result.onnx_path:
        print(f"onnx:    {result.onnx_path}")
    print(f"metrics: {result.metrics_path}")
    print(
        f"{result.arch} {result.mode} from {result.init}: {result.num_samples} train / "
        f"{result.n_val} val samples, best epoch {result.best_epoch} of {result.epochs_run}, "
        f"{result.images_per_s:.1f} images/s"
    )
    if val is not None:
        print(
            f"validation: accuracy {val.accuracy:.3f}, sensitivity {val.recall:.3f}, "
            f"specificity {val.specificity:.3f}, F1 {val.f1:.3f}, "
            f"AUC {'-' if val.auc is None else f'{val.auc:.3f}'}"
        )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train once on the local labels (low-priority worker)")
    p.add_argument("--config", required=True, help="node.toml")
    p.add_argument("--epochs", type=int, help="override training.epochs")
    p.add_argument("--mode", choices=MODES, help="override training.mode")
    p.add_argument("--arch", help="architecture of a fresh model (override training.arch)")
    p.add_argument("--init-weights", help="start from these weights (.safetensors)")
    p.add_argument("--out", help="output folder (default <state_dir>/train/runs/<time>)")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx")
    p.add_argument("--mu", type=float, help="FedProx proximal coefficient (default 0)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_run)
