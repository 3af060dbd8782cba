"""`fedscan pretrain`: self-supervised (SimCLR) pretraining of a backbone on unlabelled CT slices.

    fedscan pretrain (--dataset DIR | --inbox DIR) --out FILE.safetensors [--splits train,val]
        [--arch resnet10_gn] [--epochs 30] [--batch-size 64] [--lr 1e-3] [--temperature 0.2]
        [--threads 2] [--seed 0] [--work-dir DIR]

``--dataset DIR``: a folder with an ``index.csv`` (``fedscan dataset import`` / ``synthetic``);
only rows of ``--splits`` are used, so by default the test split is never seen. ``--inbox DIR``:
any folder of DICOM files, searched recursively; files that do not decode are skipped and
counted. Each file goes through the node's own preprocessing; every frame is one slice.

Each slice is seen as two random views (crop, rotation, flip, brightness / contrast, noise); the
backbone and a projection head learn to tell the two views of a slice apart from the other
slices of the batch (NT-Xent loss). The output is the backbone as a fedscan weights file, the
start of a node's training with ``[training] pretrained = "FILE.safetensors"`` (same
``arch``); ``FILE.safetensors.json`` beside it holds the loss per epoch and the loss of fixed
views before and after training. An interrupted run started again with the same command
resumes after its last completed epoch (checkpoint in the work folder, default
``<out stem>-work/`` beside ``--out``).
"""
# Imports stay light here: torch is imported when the pretraining runs.

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedscan.pretrain.config import DEFAULT_SPLITS, PretrainConfig


def _splits(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        out=Path(args.out),
        dataset=Path(args.dataset) if args.dataset else None,
        inbox=Path(args.inbox) if args.inbox else None,
        splits=_splits(args.splits),
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        threads=args.threads,
        seed=args.seed,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # settings errors before torch is imported
    from fedscan.pretrain.runner import EpochStats, run_pretrain

    def progress(s: EpochStats) -> None:
        print(
            f"epoch {s.epoch}/{s.epochs}  loss {s.loss:.4f}  lr {s.lr:.2e}  "
            f"{s.images_per_s:.1f} images/s",
            flush=True,
        )

    print(
        f"pretrain: {config.arch}, {config.epochs} epoch(s), batch {config.batch_size}, "
        f"temperature {config.temperature}, seed {config.seed}",
        flush=True,
    )
    doc = run_pretrain(config, progress=progress)
    sanity = doc["sanity"]
    print(
        f"{doc['n_images']} slices ({doc['skipped_files']} file(s) skipped); NT-Xent on fixed "
        f"views {sanity['loss_epoch0']:.4f} before -> {sanity['loss_last']:.4f} after "
        f"(chance {sanity['chance']:.4f})"
    )
    print(f"weights: {config.out} ({doc['version']}); report: {config.report_path}")
    return 0


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "pretrain",
        help="self-supervised (SimCLR) pretraining of a backbone on unlabelled CT slices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="folder with an index.csv (rows of --splits are used)")
    source.add_argument("--inbox", help="folder of DICOM files (recursive; unlabelled)")
    p.add_argument("--out", required=True, help="backbone weights to write (.safetensors)")
    p.add_argument(
        "--splits", default=",".join(DEFAULT_SPLITS),
        help="index splits to use with --dataset (default train,val: test is never seen)",
    )  # fmt: skip
    p.add_argument("--arch", default="resnet10_gn", help="model architecture (export.zoo)")
    p.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (1e-3)")
    p.add_argument(
        "--temperature", type=float, default=0.2, help="NT-Xent temperature (default 0.2)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, shuffling, views")
    p.add_argument("--work-dir", help="frame cache and checkpoint (default <out stem>-work)")
    p.set_defaults(func=_run)
