"""The three arms, each with the same model, the same initial weights and the same budget.

- local-only: each hospital trains alone for ``rounds x local_epochs`` epochs;
- FedAvg: ``rounds`` rounds; in each, every hospital trains ``local_epochs`` epochs from the
  global weights, and the coordinator's ``fedavg`` strategy (``coordinator.strategy`` registry,
  weighted by training samples) folds the deltas into the next global model. Simulated in
  process: no MQTT, no chunking, no codec (fp32 deltas); the MQTT path is what ``fedscan demo``
  and the integration tests run;
- centralized: one model on the pooled data of all hospitals for ``rounds x local_epochs``.

Every training is ``edge_node.trainer.train_once`` on a label book, exactly as a node trains:
patient-level local validation split (``val_fraction``, salted by the seed), class weighting,
the paper's augmentation, AdamW, and the best epoch on local validation loss is kept (early
stopping off, so every arm runs its whole budget).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.strategy import create_strategy
from edge_node.train_data import SampleSet
from edge_node.train_job import TrainJob, TrainResult
from edge_node.trainer import evaluate, train_once
from export.weights import load_numpy_state, load_weights, save_weights, state_to_numpy
from fedscan.experiment.config import ExperimentConfig
from fl_protocol.metrics import Metrics

log = logging.getLogger(__name__)

STRATEGY = "fedavg"


@dataclass(frozen=True)
class SeedContext:
    """What every arm of one seed shares."""

    config: ExperimentConfig
    seed: int
    work: Path  # this seed's folder (label books, weights)
    state_dir: Path  # the trainer's state (its preprocessing cache is shared by all runs)
    init_weights: Path  # the initial global model of this seed (every arm starts here)
    test: SampleSet


@dataclass(frozen=True)
class FedAvgOutcome:
    metrics: Metrics  # final global model on the test set
    per_round: tuple[float, ...]  # test accuracy of global v0..vR
    seconds: float


def initial_weights(arch: str, seed: int, path: Path) -> Path:
    """Version 0: a randomly initialised ``arch`` (no pretrained weights), seeded."""
    import torch

    from export.zoo import create_model

    torch.manual_seed(seed)
    return save_weights(create_model(arch), path, version=0)


def _job(ctx: SeedContext, db: Path, out_dir: Path, epochs: int, seed: int, init: Path) -> TrainJob:
    c = ctx.config
    return TrainJob(
        db_path=db,
        state_dir=ctx.state_dir,
        out_dir=out_dir,
        arch=c.arch,
        epochs=epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        seed=seed,
        val_fraction=c.val_fraction,
        split_salt=f"experiment-{ctx.seed}",
        patience=0,
        augment=c.augment,
        torch_threads=c.threads,
        init_weights=init,
        resume=False,
    )


def _train(job: TrainJob) -> TrainResult:
    result = train_once(job)
    log.info("trained %s: %d samples, best epoch %d", job.out_dir.name, result.num_samples,
             result.best_epoch)  # fmt: skip
    return result


def local_only(ctx: SeedContext, books: dict[str, Path]) -> dict[str, Metrics]:
    """Each hospital alone for the whole budget; metrics per hospital on the test set."""
    out: dict[str, Metrics] = {}
    for name, db in books.items():
        job = _job(ctx, db, ctx.work / "local" / name, ctx.config.total_epochs, ctx.seed,
                   ctx.init_weights)  # fmt: skip
        result = _train(job)
        out[name] = evaluate(result.weights_path, ctx.test)
    return out


def centralized(ctx: SeedContext, pooled_book: Path) -> Metrics:
    job = _job(ctx, pooled_book, ctx.work / "centralized", ctx.config.total_epochs, ctx.seed,
               ctx.init_weights)  # fmt: skip
    return evaluate(_train(job).weights_path, ctx.test)


def fedavg(ctx: SeedContext, books: dict[str, Path]) -> FedAvgOutcome:
    """``rounds`` rounds of local training + the coordinator's FedAvg aggregation."""
    t0 = time.perf_counter()
    strategy = create_strategy(STRATEGY)
    global_path = ctx.init_weights
    model = load_weights(global_path)
    per_round = [evaluate(model, ctx.test).accuracy]
    for rnd in range(1, ctx.config.rounds + 1):
        global_weights = state_to_numpy(model)
        strategy.begin_round(global_weights)
        for name, db in books.items():
            out_dir = ctx.work / "fedavg" / f"round-{rnd}" / name
            # the round's seed as a coordinator would send it (base seed + round id)
            job = _job(ctx, db, out_dir, ctx.config.local_epochs, ctx.seed * 1000 + rnd,
                       global_path)  # fmt: skip
            result = _train(job)
            local = state_to_numpy(load_weights(result.weights_path))
            delta = {k: local[k] - global_weights[k] for k in global_weights}
            strategy.accumulate(delta, result.num_samples)
        new_weights = strategy.finish()
        load_numpy_state(model, {k: np.asarray(v) for k, v in new_weights.items()})
        global_path = save_weights(
            model, ctx.work / "fedavg" / f"global_v{rnd}.safetensors", version=rnd
        )
        per_round.append(evaluate(model, ctx.test).accuracy)
        log.info("fedavg round %d: test accuracy %.3f", rnd, per_round[-1])
    return FedAvgOutcome(
        metrics=evaluate(model, ctx.test),
        per_round=tuple(per_round),
        seconds=time.perf_counter() - t0,
    )
