"""One unit of work of the experiment: one arm of one seed, runnable in a worker process.

The three arms of a seed are independent once the partition, the label books and the initial
weights exist, so ``--jobs N`` runs N of them at a time (each torch run with its own thread
cap; on two cores two single-thread trainings do about twice the work of one two-thread run).
Each task gets its own trainer state folder (the trainer holds a lock there), whose
preprocessing cache is hard-linked from one warmed shared cache, so no slice is decoded twice.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedscan.dataset import IndexRow
from fedscan.experiment import arms
from fedscan.experiment.config import ExperimentConfig
from fedscan.experiment.data import eval_samples

ARMS: tuple[str, ...] = ("local_only", "fedavg", "centralized")


@dataclass(frozen=True)
class Task:
    seed: int
    arm: str  # one of ARMS
    config: ExperimentConfig
    work: Path  # the seed's folder
    books: tuple[tuple[str, Path], ...]  # (hospital, label book)
    pooled_book: Path
    init_weights: Path
    pool_cache: Path  # warmed preprocessing cache of the pool
    eval_cache: Path  # warmed cache of the test slices
    test_rows: tuple[IndexRow, ...]
    base: Path  # index paths are relative to this
    fold: int = 0  # cross-validation fold (0 with the official split)


def link_cache(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) every cached entry of ``src`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if target.exists() or not f.is_file():
            continue
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)


def run_task(task: Task) -> dict[str, Any]:
    """Run one arm; JSON-ready results (metrics as ``Metrics.to_dict``)."""
    import torch

    torch.set_num_threads(task.config.threads)
    t0 = time.perf_counter()
    state_dir = task.work / f"state-{task.arm}"
    link_cache(task.pool_cache, state_dir / "train" / "cache")
    test = eval_samples(task.test_rows, task.base, task.eval_cache, texture=task.config.texture)
    ctx = arms.SeedContext(task.config, task.seed, task.work, state_dir, task.init_weights, test)
    books = dict(task.books)
    out: dict[str, Any] = {"seed": task.seed, "fold": task.fold, "arm": task.arm}
    out["test_ids"] = list(test.ids)
    out["test_labels"] = [int(v) for v in test.labels]
    out["test_patients"] = [str(p) for p in test.patient_keys]
    if task.arm == "local_only":
        metrics, per = arms.local_only(ctx, books)
        out["hospitals"] = {n: m.to_dict() for n, m in metrics.items()}
        out["scores"] = {n: s.to_dict() for n, s in per.items()}
    elif task.arm == "fedavg":
        fed = arms.fedavg(ctx, books)
        out["metrics"] = fed.metrics.to_dict()
        out["last_metrics"] = fed.last_metrics.to_dict()
        out["selected_version"] = fed.selected_version
        out["strategy"] = task.config.strategy
        out["per_round"] = list(fed.per_round)
        out["val_accuracy"] = list(fed.val_accuracy)
        # calibration from the hospitals' validation statistics, summed (what nodes report)
        vals = arms.validation_sets(ctx, books)
        out["scores"] = {
            "fedavg": arms.scores(fed.selected_path, ctx, vals).to_dict(),
            "fedavg_last": arms.scores(fed.last_path, ctx, vals).to_dict(),
        }
    elif task.arm == "centralized":
        metrics_c, sc = arms.centralized(ctx, task.pooled_book, books)
        out["metrics"] = metrics_c.to_dict()
        out["scores"] = {"centralized": sc.to_dict()}
    else:
        raise ValueError(f"unknown arm {task.arm!r}")
    out["seconds"] = time.perf_counter() - t0
    return out
