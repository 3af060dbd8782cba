"""Local training of the current model on the node's labels: `train_once` and `evaluate`.

One run: ingest folder labels -> labelled slices (cached preprocessing) -> patient-level split
into train / validation -> start from the incoming weights (global model), or a fresh model ->
epochs of class-weighted cross-entropy (+ FedProx ``mu/2 * ||w - w_global||^2`` over the
trainable tensors) with the paper's augmentation -> early stopping on the validation loss,
keeping the best epoch's weights -> weights (safetensors), optional ONNX, metrics JSON.

- Modes: ``full``, ``last_stage`` and ``head`` (``FedscanNet.set_train_mode``). In ``head`` mode
  the frozen backbone's embeddings of every sample are computed once and cached in
  ``<state_dir>/train/embeddings/`` (keyed by the backbone's weights and the samples), so epochs
  cost only the linear classifier. Trade-off: those embeddings are of the un-augmented slices,
  so augmentation does not apply in ``head`` mode; augmenting would mean running the backbone
  on every sample in every epoch, which is the cost ``head`` mode exists to avoid.
- Reproducible: one seed drives the model init, the shuffling and the augmentation (one
  ``torch.Generator``); on CPU with the same thread count the same job gives the same weights.
- Resumable: after every epoch a checkpoint (model, optimizer, RNG states, early-stopping state)
  is written atomically to ``<state_dir>/train/``; a crashed or killed run that is started again
  with the same job continues after the last completed epoch and ends with the same weights as
  an uninterrupted run.
- Runs in-process here; ``train.job_subprocess`` runs it in a low-priority subprocess with a
  thread cap, which is how the daemon and ``fedscan node train`` call it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edge_node.errors import TrainingError
from edge_node.ingest.preprocess import PreprocessParams
from edge_node.labels import LabelBook
from edge_node.train import checkpoint as train_checkpoint
from edge_node.train.data import LoadReport, SampleSet, load_labelled
from edge_node.train.job import (
    METRICS_FILE,
    ONNX_FILE,
    RESULT_FILE,
    WEIGHTS_FILE,
    TrainJob,
    TrainResult,
)
from edge_node.train.loop import (
    AUGMENT,
    EVAL_BATCH,
    EpochStats,
    class_weights,
    clone_state,
    evaluate,
    predict_logits,
    train_epoch,
    validate,
)
from edge_node.train.split import split_by_patient
from export.net import FedscanNet
from fl_protocol.calibration import OperatingPoint, calibration_stats, fit_operating_point
from fl_protocol.metrics import Metrics
from fl_protocol.schedule import scheduled_lr

log = logging.getLogger(__name__)

__all__ = [
    "EpochStats",
    "LocalData",
    "class_weights",
    "clone_state",
    "evaluate",
    "evaluate_incoming",
    "initial_model",
    "load_split",
    "train_epoch",
    "train_once",
    "validate",
]


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalData:
    train: SampleSet
    val: SampleSet
    report: LoadReport
    n_labels: int


def load_split(job: TrainJob, *, texture: bool) -> LocalData:
    """The node's labelled slices, split by patient into local train and validation."""
    with LabelBook(job.db_path) as book:
        if job.inbox is not None:
            book.ingest_folder(job.inbox)
        records = book.all()
    params = PreprocessParams(
        window_center=job.window_center,
        window_width=job.window_width,
        size=job.size,
        modalities=job.modalities,
    )
    samples, report = load_labelled(records, params, job.train_dir / "cache", texture=texture)
    split = split_by_patient(
        range(len(samples)),
        lambda i: samples.patient_keys[i],
        salt=job.split_salt,
        val_fraction=job.val_fraction,
    )
    return LocalData(
        samples.subset(split.train), samples.subset(split.val), report, n_labels=len(records)
    )


# -- model -------------------------------------------------------------------------------------


def _texture_dim() -> int:
    from edge_node.ingest.texture import TEXTURE_DIM

    return int(TEXTURE_DIM)


def initial_model(job: TrainJob) -> FedscanNet:
    """The incoming weights (global model) if given, else a fresh ``job.arch`` model."""
    from export.weights import load_weights
    from export.zoo import create_model

    if job.init_weights is not None:
        if not Path(job.init_weights).is_file():
            raise TrainingError(f"initial weights not found: {job.init_weights}")
        model = load_weights(job.init_weights)
        if model.arch != job.arch:
            log.info(
                "starting from %s weights (the incoming model decides the architecture)", model.arch
            )
        if bool(model.texture_dim) != job.texture_features:
            log.info(
                "the incoming model %s texture features; training follows the model",
                "uses" if model.texture_dim else "does not use",
            )
        return model
    texture_dim = _texture_dim() if job.texture_features else 0
    return create_model(job.arch, texture_dim=texture_dim, pretrained=job.pretrained)


def state_hash(model: torch.nn.Module) -> str:
    """sha256 of every state tensor (names, shapes and bytes), for fingerprints and versions."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- evaluation --------------------------------------------------------------------------------


def evaluate_incoming(job: TrainJob) -> tuple[Metrics | None, int]:
    """The incoming model (``job.init_weights``) on the local validation side: (metrics, n)."""
    model = initial_model(job)
    data = load_split(job, texture=bool(model.texture_dim))
    if not len(data.val):
        return None, 0
    return evaluate(model, data.val), len(data.val)


# -- training ----------------------------------------------------------------------------------


def _optimizer(trainable: Sequence[tuple[str, Tensor]], job: TrainJob) -> torch.optim.AdamW:
    """AdamW with two groups: the classifier ``head`` at ``lr x head_lr_mult``, the rest at
    ``lr``. Adam moves every weight by about the rate per step whatever its gradient, so with
    one rate the head's texture weights (which need to travel far: a logistic regression on
    standardised features) stay near their init through a budget of ~100 steps."""
    head = [p for name, p in trainable if name.startswith("head.")]
    body = [p for name, p in trainable if not name.startswith("head.")]
    groups = [
        {"params": body, "lr": job.lr, "lr_mult": 1.0},
        {"params": head, "lr": job.lr * job.head_lr_mult, "lr_mult": job.head_lr_mult},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=job.lr, weight_decay=job.weight_decay
    )


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError("another training is already running on this node") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@torch.no_grad()
def _embeddings(model: FedscanNet, sets: list[SampleSet], folder: Path, key: str) -> list[Tensor]:
    """Frozen-backbone embeddings of each set, from ``folder/<key>.npz`` when cached."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key[:40]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                loaded = [torch.from_numpy(z[f"set{i}"]) for i in range(len(sets))]
            if all(len(t) == len(s) for t, s in zip(loaded, sets, strict=True)):
                log.info("head mode: backbone embeddings from the cache")
                return loaded
        except (OSError, ValueError, KeyError):
            log.warning("embedding cache unreadable; computing again")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for s in sets:
            images = torch.from_numpy(s.images)
            parts = [model.embed(images[i : i + EVAL_BATCH]) for i in range(0, len(s), EVAL_BATCH)]
            out.append(torch.cat(parts) if parts else torch.zeros((0, model.num_features)))
    finally:
        model.train(was_training)
    for old in folder.glob("*.npz"):
        old.unlink(missing_ok=True)  # one backbone at a time: bound the disk use
    tmp = folder / f".{path.name}.tmp.npz"
    arrays = {f"set{i}": t.numpy() for i, t in enumerate(out)}
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    log.info(
        "head mode: backbone embeddings of %d samples in %.1f s (cached)",
        sum(len(s) for s in sets),
        time.perf_counter() - t0,
    )
    return out


def _fingerprint(job: TrainJob, data: LocalData, incoming: str) -> str:
    relevant = {
        k: v
        for k, v in job.to_dict().items()
        if k not in ("out_dir", "torch_threads", "nice", "resume", "export_onnx", "inbox")
    }
    basis = json.dumps(
        {
            "job": relevant,
            "train": data.train.fingerprint(),
            "val": data.val.fingerprint(),
            "incoming": incoming,
        },
        sort_keys=True,
    )
    return hashlib.sha256(basis.encode()).hexdigest()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def train_once(job: TrainJob) -> TrainResult:
    """Train once on the node's labels and write weights, metrics (and ONNX) to ``job.out_dir``.

    Raises TrainingError when there is nothing to train on, or another training holds the lock.
    """
    with _exclusive(job.train_dir / "lock"):
        return _train(job)


def _train(job: TrainJob) -> TrainResult:
    t_start = time.perf_counter()
    torch.manual_seed(job.seed)
    model = initial_model(job)
    init_desc = model.init
    data = load_split(job, texture=bool(model.texture_dim))
    if not len(data.train):
        raise TrainingError(
            f"no labelled slices to train on ({data.n_labels} labels, {len(data.val)} "
            f"validation samples, {data.report.missing} missing, "
            f"{data.report.unusable} unusable files)"
        )
    n_train, n_val = len(data.train), len(data.val)
    log.info(
        "training %s (%s, init %s) on %d samples (covid %d), validating on %d; %d file(s) "
        "decoded, the rest cached",
        model.arch,
        job.mode,
        init_desc,
        n_train,
        data.train.class_counts()[1],
        n_val,
        data.report.decoded,
    )
    if not n_val:
        log.warning("no validation samples (too few patients): no early stopping")
    incoming = state_hash(model)
    fingerprint = _fingerprint(job, data, incoming)
    model.set_train_mode(job.mode)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, job)
    generator = torch.Generator().manual_seed(job.seed)
    weight = class_weights(data.train.labels) if job.class_weighting else None
    head = job.mode == "head"
    if head and job.augment:
        log.info("head mode: cached embeddings of un-augmented slices, no augmentation")

    ckpt = train_checkpoint.load(job.train_dir, fingerprint) if job.resume else None
    info: dict[str, Any]
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.torch_rng)
        generator.set_state(ckpt.generator_rng)
        reference = ckpt.reference
        best_state = ckpt.best
        info = ckpt.info
        start = ckpt.epoch
        log.info("resuming from the checkpoint after epoch %d", start)
    else:
        train_checkpoint.clear(job.train_dir)
        reference = {name: p.detach().clone() for name, p in trainable}
        best_state = clone_state(model)
        init_val = evaluate(model, data.val).to_dict() if n_val else None
        init_cal = (
            calibration_stats(predict_logits(model, data.val), data.val.labels).to_dict()
            if n_val
            else None
        )
        info = {
            "history": [],
            "best_epoch": 0,
            "best_val_loss": None,
            "bad_epochs": 0,
            "stopped": False,
            "init_val": init_val,
            "init_val_calibration": init_cal,
            "train_images": 0,
            "train_seconds": 0.0,
        }
        start = 0
    resumed_from = start

    features: list[Tensor] | None = None
    if head:
        key = hashlib.sha256(
            f"{incoming}|{data.train.fingerprint()}|{data.val.fingerprint()}".encode()
        ).hexdigest()
        features = _embeddings(model, [data.train, data.val], job.train_dir / "embeddings", key)

    epoch = start
    while epoch < job.epochs and not info["stopped"]:
        rate = scheduled_lr(job.lr, job.lr_schedule, epoch, job.epochs)
        for group in optimizer.param_groups:
            group["lr"] = rate * group["lr_mult"]
        stats = train_epoch(
            model,
            optimizer,
            data.train,
            batch_size=job.batch_size,
            generator=generator,
            augment=AUGMENT if job.augment and not head else None,
            weight=weight,
            mu=job.mu,
            reference=reference,
            features=features[0] if features is not None else None,
        )
        info["train_images"] += stats.images
        info["train_seconds"] += stats.seconds
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": stats.loss,
            "train": stats.metrics.to_dict(),
            "images_per_s": stats.images_per_s,
            "seconds": stats.seconds,
            "lr": rate,
        }
        if n_val:
            val_loss, val_m = validate(
                model, data.val, weight, features[1] if features is not None else None
            )
            entry["val_loss"] = val_loss
            entry["val"] = val_m.to_dict()
            best = info["best_val_loss"]
            if best is None or val_loss < best:
                info["best_val_loss"] = val_loss
                info["best_epoch"] = epoch + 1
                info["bad_epochs"] = 0
                best_state = clone_state(model)
            else:
                info["bad_epochs"] += 1
            if job.patience > 0 and info["bad_epochs"] >= job.patience:
                info["stopped"] = True
        else:
            info["best_epoch"] = epoch + 1
            best_state = clone_state(model)
        info["history"].append(entry)
        log.info(
            "epoch %d/%d: loss %.4f, train acc %.3f, val loss %s, val acc %s, %.1f images/s",
            epoch + 1,
            job.epochs,
            entry["loss"],
            stats.metrics.accuracy,
            f"{entry['val_loss']:.4f}" if n_val else "-",
            f"{entry['val']['accuracy']:.3f}" if n_val else "-",
            stats.images_per_s,
        )
        epoch += 1
        train_checkpoint.save(
            job.train_dir,
            train_checkpoint.CheckpointState(
                fingerprint=fingerprint,
                epoch=epoch,
                model=clone_state(model),
                best=best_state,
                reference=reference,
                optimizer=optimizer.state_dict(),
                torch_rng=torch.get_rng_state(),
                generator_rng=generator.get_state(),
                info=info,
            ),
        )
        if info["stopped"]:
            log.info(
                "early stopping after epoch %d: no better validation loss for %d epoch(s)",
                epoch,
                job.patience,
            )
    return _finish(job, model, best_state, info, data, init_desc, resumed_from, t_start)


def _operating_point(model: FedscanNet, val: SampleSet) -> OperatingPoint | None:
    """Temperature, threshold and uncertain band of ``model`` fitted on the local validation
    side (``fl_protocol.calibration``); None without validation slices of both classes."""
    if not len(val):
        return None
    return fit_operating_point(calibration_stats(predict_logits(model, val), val.labels))


def _finish(
    job: TrainJob,
    model: FedscanNet,
    best_state: dict[str, Tensor],
    info: dict[str, Any],
    data: LocalData,
    init_desc: str,
    resumed_from: int,
    t_start: float,
) -> TrainResult:
    from export.weights import save_weights

    model.load_state_dict(best_state)
    model.init = init_desc
    version = job.model_version or f"local-{state_hash(model)[:8]}"
    job.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = save_weights(model, job.out_dir / WEIGHTS_FILE, version=version)
    operating_point = _operating_point(model, data.val)
    onnx_path: Path | None = None
    if job.export_onnx:
        from export.onnx_export import export_onnx

        model.eval()
        onnx_path = export_onnx(
            model,
            job.out_dir / ONNX_FILE,
            model_version=version,
            window_center=job.window_center,
            window_width=job.window_width,
            calibration=operating_point,
        )
    history = info["history"]
    best = history[info["best_epoch"] - 1]
    images_per_s = info["train_images"] / info["train_seconds"] if info["train_seconds"] else 0.0
    init_val = info.get("init_val")
    result = TrainResult(
        weights_path=weights_path,
        onnx_path=onnx_path,
        metrics_path=job.out_dir / METRICS_FILE,
        num_samples=len(data.train),
        n_val=len(data.val),
        train_metrics=Metrics.from_dict(best["train"]),
        val_metrics=Metrics.from_dict(best["val"]) if "val" in best else None,
        init_val_metrics=Metrics.from_dict(init_val) if init_val else None,
        best_epoch=int(info["best_epoch"]),
        epochs_run=len(history),
        images_per_s=images_per_s,
        init=init_desc,
        model_version=version,
        arch=model.arch,
        mode=job.mode,
        trainable_keys=tuple(sorted(model.trainable_state_keys(job.mode))),
        resumed_from_epoch=resumed_from,
        seconds=time.perf_counter() - t_start,
        init_val_calibration=info.get("init_val_calibration"),
        operating_point=None if operating_point is None else operating_point.to_dict(),
    )
    summary = result.to_dict()
    _write_json(
        result.metrics_path,
        {
            "schema": "fedscan.train_metrics/1",
            **{k: summary[k] for k in summary if k not in ("trainable_keys",)},
            "texture_features": bool(model.texture_dim),
            "n_train": result.num_samples,
            "class_counts_train": list(data.train.class_counts()),
            "class_counts_val": list(data.val.class_counts()),
            "stopped_early": bool(info["stopped"]),
            "epochs": history,
            "job": {k: v for k, v in job.to_dict().items() if k not in ("db_path", "inbox")},
        },
    )
    _write_json(job.out_dir / RESULT_FILE, summary)
    train_checkpoint.clear(job.train_dir)
    log.info(
        "training done: best epoch %d of %d, val acc %s, %.1f images/s, %.1f s",
        result.best_epoch,
        result.epochs_run,
        f"{result.val_metrics.accuracy:.3f}" if result.val_metrics else "-",
        result.images_per_s,
        result.seconds,
    )
    return result
