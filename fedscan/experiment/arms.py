"""The three arms, each with the same model, the same initial weights and the same budget.

- local-only: each hospital trains alone for ``rounds x local_epochs`` epochs;
- FedAvg: ``rounds`` rounds; in each, every hospital trains ``local_epochs`` epochs from the
  global weights, and the coordinator's ``fedavg`` strategy (``coordinator.strategy`` registry,
  weighted by training samples) folds the deltas into the next global model. Simulated in
  process: no MQTT, no chunking, no codec (fp32 deltas); the MQTT path is what ``fedscan demo``
  and the integration tests run;
- centralized: one model on the pooled data of all hospitals for ``rounds x local_epochs``.

Every training is ``edge_node.train.trainer.train_once`` on a label book, exactly as a node trains:
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
from edge_node.train.data import SampleSet
from edge_node.train.job import TrainJob, TrainResult
from edge_node.train.loop import predict_logits
from edge_node.train.trainer import evaluate, evaluate_incoming, load_split, train_once
from export.net import FedscanNet
from export.weights import load_numpy_state, load_weights, save_weights, state_to_numpy
from fedscan.experiment.config import ExperimentConfig
from fl_protocol.calibration import CalibrationStats, calibration_stats, combine
from fl_protocol.metrics import Metrics
from fl_protocol.schedule import scheduled_lr

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
class ModelScores:
    """One trained model's per-slice test logits and its validation summary."""

    test_logits: np.ndarray  # [N_test, 2], in the order of ``SeedContext.test``
    val_stats: CalibrationStats | None  # its own validation side (the calibration data)
    val_accuracy: float | None  # on every hospital's validation patients (model selection)

    def to_dict(self) -> dict[str, object]:
        return {
            "test_logits": [[round(float(a), 5), round(float(b), 5)] for a, b in self.test_logits],
            "val_stats": None if self.val_stats is None else self.val_stats.to_dict(),
            "val_accuracy": self.val_accuracy,
        }


def validation_sets(ctx: SeedContext, books: dict[str, Path]) -> dict[str, SampleSet]:
    """Each hospital's local validation patients, split exactly as its trainer splits."""
    out: dict[str, SampleSet] = {}
    for name, db in books.items():
        job = _job(ctx, db, ctx.work / "val" / name, 1, ctx.seed, ctx.init_weights)
        out[name] = load_split(job, texture=ctx.config.texture).val
    return out


def _stats(model: FedscanNet, samples: SampleSet, tta: bool = False) -> CalibrationStats | None:
    if not len(samples):
        return None
    return calibration_stats(predict_logits(model, samples, tta=tta), samples.labels)


def scores(
    weights: Path | FedscanNet,
    ctx: SeedContext,
    vals: dict[str, SampleSet],
    own: tuple[str, ...] | None = None,
) -> ModelScores:
    """Test logits; calibration statistics summed over the validation sides of ``own``
    hospitals (None: all of them, as the coordinator sums the nodes' reports); accuracy on
    every hospital's validation patients."""
    model = weights if isinstance(weights, FedscanNet) else load_weights(weights)
    tta = ctx.config.tta
    per = {n: _stats(model, v, tta) for n, v in vals.items()}
    chosen = [s for n, s in per.items() if s is not None and (own is None or n in own)]
    correct = total = 0
    for v in vals.values():
        if len(v):
            pred = predict_logits(model, v, tta=tta).argmax(axis=1)
            correct += int((pred == v.labels).sum())
            total += len(v)
    return ModelScores(
        test_logits=predict_logits(model, ctx.test, tta=tta),
        val_stats=combine(chosen),
        val_accuracy=correct / total if total else None,
    )


@dataclass(frozen=True)
class FedAvgOutcome:
    metrics: Metrics  # the selected global version on the test set (see ``fedavg``)
    last_metrics: Metrics  # the final round's global model on the test set
    selected_path: Path  # weights of the selected version
    last_path: Path
    selected_version: int
    per_round: tuple[float, ...]  # test accuracy of global v0..vR
    val_accuracy: tuple[float | None, ...]  # hospitals' weighted local-validation accuracy
    seconds: float


def initial_weights(
    arch: str, seed: int, path: Path, *, texture: bool = False, pretrained: Path | None = None
) -> Path:
    """Version 0: a randomly initialised ``arch``, seeded (the backbone from ``pretrained``
    when given: a local weights file, e.g. `fedscan pretrain`'s); with the texture-feature
    input when ``texture``. The classifier head is always fresh."""
    import torch

    from edge_node.ingest.texture import TEXTURE_DIM
    from export.zoo import create_model

    torch.manual_seed(seed)
    model = create_model(arch, texture_dim=TEXTURE_DIM if texture else 0, pretrained=pretrained)
    return save_weights(model, path, version=0)


def _job(
    ctx: SeedContext,
    db: Path,
    out_dir: Path,
    epochs: int,
    seed: int,
    init: Path,
    *,
    round_lr: float | None = None,
) -> TrainJob:
    """A trainer job; ``round_lr``: a FedAvg round's rate (constant within the round), else the
    run decays by the configured schedule over its own epochs."""
    c = ctx.config
    return TrainJob(
        db_path=db,
        state_dir=ctx.state_dir,
        out_dir=out_dir,
        arch=c.arch,
        epochs=epochs,
        batch_size=c.batch_size,
        lr=c.lr if round_lr is None else round_lr,
        lr_schedule=c.lr_schedule if round_lr is None else "constant",
        head_lr_mult=c.head_lr_mult,
        seed=seed,
        val_fraction=c.val_fraction,
        split_salt=f"experiment-{ctx.seed}",
        patience=0,
        augment=c.augment,
        texture_features=c.texture,
        torch_threads=c.threads,
        init_weights=init,
        resume=False,
    )


def _train(job: TrainJob) -> TrainResult:
    result = train_once(job)
    log.info("trained %s: %d samples, best epoch %d", job.out_dir.name, result.num_samples,
             result.best_epoch)  # fmt: skip
    return result


def local_only(
    ctx: SeedContext, books: dict[str, Path]
) -> tuple[dict[str, Metrics], dict[str, ModelScores]]:
    """Each hospital alone for the whole budget: test metrics and scores per hospital (each
    calibrated on its own validation side)."""
    out: dict[str, Metrics] = {}
    per: dict[str, ModelScores] = {}
    vals = validation_sets(ctx, books)
    for name, db in books.items():
        job = _job(ctx, db, ctx.work / "local" / name, ctx.config.total_epochs, ctx.seed,
                   ctx.init_weights)  # fmt: skip
        result = _train(job)
        out[name] = evaluate(result.weights_path, ctx.test)
        per[name] = scores(result.weights_path, ctx, vals, own=(name,))
    return out, per


def centralized(
    ctx: SeedContext, pooled_book: Path, books: dict[str, Path]
) -> tuple[Metrics, ModelScores]:
    job = _job(ctx, pooled_book, ctx.work / "centralized", ctx.config.total_epochs, ctx.seed,
               ctx.init_weights)  # fmt: skip
    weights = _train(job).weights_path
    # the pooled book's validation patients are the union of the hospitals' (same salt)
    return evaluate(weights, ctx.test), scores(weights, ctx, validation_sets(ctx, books))


def _weighted_accuracy(results: list[tuple[Metrics | None, int]]) -> float | None:
    """Validation accuracy over hospitals, weighted by their validation sizes."""
    n = sum(k for m, k in results if m is not None)
    if not n:
        return None
    return sum(m.accuracy * k for m, k in results if m is not None) / n


def fedavg(ctx: SeedContext, books: dict[str, Path]) -> FedAvgOutcome:
    """``rounds`` rounds of local training + the coordinator's FedAvg aggregation.

    Model selection matches the other arms, whose trainer keeps the epoch with the best local
    validation loss: every hospital evaluates each incoming global model on its local
    validation patients (what a node reports to the coordinator each round), and the global
    version after round 1 or later with the best weighted validation accuracy is the arm's
    result (ties: the later).
    The final round's model is reported too.
    """
    t0 = time.perf_counter()
    strategy = create_strategy(ctx.config.strategy, **dict(ctx.config.strategy_args))
    global_path = ctx.init_weights
    model = load_weights(global_path)
    paths = [global_path]
    per_round = [evaluate(model, ctx.test).accuracy]
    val: list[float | None] = []
    for rnd in range(1, ctx.config.rounds + 1):
        global_weights = state_to_numpy(model)
        strategy.begin_round(global_weights)
        reports: list[tuple[Metrics | None, int]] = []
        for name, db in books.items():
            out_dir = ctx.work / "fedavg" / f"round-{rnd}" / name
            # the round's seed as a coordinator would send it (base seed + round id)
            lr = scheduled_lr(ctx.config.lr, ctx.config.lr_schedule, rnd - 1, ctx.config.rounds)
            job = _job(ctx, db, out_dir, ctx.config.local_epochs, ctx.seed * 1000 + rnd,
                       global_path, round_lr=lr)  # fmt: skip
            result = _train(job)
            reports.append((result.init_val_metrics, result.n_val))
            local = state_to_numpy(load_weights(result.weights_path))
            delta = {k: local[k] - global_weights[k] for k in global_weights}
            strategy.accumulate(delta, result.num_samples)
        val.append(_weighted_accuracy(reports))  # of the round's incoming model
        new_weights = strategy.finish()
        load_numpy_state(model, {k: np.asarray(v) for k, v in new_weights.items()})
        global_path = save_weights(
            model, ctx.work / "fedavg" / f"global_v{rnd}.safetensors", version=rnd
        )
        paths.append(global_path)
        per_round.append(evaluate(model, ctx.test).accuracy)
        log.info("fedavg round %d: test accuracy %.3f", rnd, per_round[-1])
    final_reports = [
        evaluate_incoming(
            _job(ctx, db, ctx.work / "fedavg" / "final-eval" / name, 1, ctx.seed, global_path)
        )
        for name, db in books.items()
    ]
    val.append(_weighted_accuracy(final_reports))
    # v0 is the untrained initial model: on a few dozen validation slices a constant answer can
    # look good, but it is never what the federation serves as its result (as in the demo)
    candidates = [(acc, v) for v, acc in enumerate(val) if acc is not None and v > 0]
    selected = max(candidates)[1] if candidates else len(paths) - 1
    last = evaluate(model, ctx.test)
    return FedAvgOutcome(
        metrics=last if selected == len(paths) - 1 else evaluate(paths[selected], ctx.test),
        last_metrics=last,
        selected_path=paths[selected],
        last_path=paths[-1],
        selected_version=selected,
        per_round=tuple(per_round),
        val_accuracy=tuple(val),
        seconds=time.perf_counter() - t0,
    )
