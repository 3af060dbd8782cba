"""The pretraining run: slices -> two views -> backbone -> projector -> NT-Xent, epoch by epoch.

- Optimiser: AdamW over the backbone and the projection head (the classifier head is not
  trained; a fine-tuning run starts it afresh anyway), learning rate rising linearly over the
  first epoch, then a cosine decay towards 0 (set per step from the step number, so it
  needs no scheduler state).
- Reproducible: ``torch.manual_seed(seed)`` fixes the init, one ``torch.Generator`` the shuffling
  and the views; on CPU with the same thread count the same run gives the same weights.
- Resumable: after every epoch a checkpoint (backbone + projector, optimizer, both RNG states,
  history) goes atomically into the work folder (``edge_node.train.checkpoint``'s format). The
  same command started again continues after the last completed epoch and ends with the same
  weights as an uninterrupted run; a checkpoint of other settings or other images (fingerprint)
  is ignored. The final checkpoint stays, so rerunning a finished command only rewrites the
  outputs.
- Sanity figure (no labels needed): the NT-Xent loss of fixed views of up to 256 slices, before
  the first epoch and after the last, beside the chance level ``log(2B - 1)``.
- Outputs: ``--out`` (the ``FedscanNet`` with the learned backbone, ``export.weights`` format,
  version ``pretrain-<fingerprint[:12]>``) and ``<out>.json`` (schema ``fedscan.pretrain/1``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edge_node.train import checkpoint as train_checkpoint
from export.net import FedscanNet
from export.weights import save_weights
from export.zoo import create_model
from fedscan.pretrain.config import PretrainConfig
from fedscan.pretrain.data import PretrainData, load_images
from fedscan.pretrain.errors import PretrainError
from fedscan.pretrain.objective import Projector, nt_xent
from fedscan.pretrain.views import two_views
from fl_protocol.files import write_atomic

log = logging.getLogger(__name__)

SCHEMA = "fedscan.pretrain/1"
EVAL_IMAGES = 256  # slices in the before/after sanity figure
EVAL_SEED_OFFSET = 1  # the sanity views' generator: seed + this (apart from training draws)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based, completed
    epochs: int
    loss: float  # mean NT-Xent over the epoch's steps
    lr: float  # at the epoch's last step
    images_per_s: float
    seconds: float


Progress = Callable[[EpochStats], None]


def lr_at(step: int, steps_per_epoch: int, total_steps: int, base: float) -> float:
    """Linear warmup over the first epoch, then a cosine from ``base`` towards 0 (reached one
    step after the last)."""
    warmup = steps_per_epoch
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def chunks(order: Tensor, size: int) -> list[Tensor]:
    """``order`` cut into batches of ``size``; a last batch of one image (nothing to contrast it
    with) joins the one before."""
    parts = list(torch.split(order, size))
    if len(parts) > 1 and parts[-1].numel() < 2:
        parts[-2] = torch.cat([parts[-2], parts.pop()])
    return parts


def _batch(images: np.ndarray, index: Tensor) -> Tensor:
    x = torch.from_numpy(images[index.numpy()]).to(torch.float32).div_(255.0)
    return x.unsqueeze(1)


def _contrastive_loss(
    model: FedscanNet, projector: Projector, x: Tensor, generator: torch.Generator, t: float
) -> Tensor:
    v1, v2 = two_views(x, generator)
    return nt_xent(projector(model.embed(v1)), projector(model.embed(v2)), t)


def sanity_loss(
    model: FedscanNet, projector: Projector, data: PretrainData, config: PretrainConfig
) -> tuple[float, float, int]:
    """(NT-Xent on fixed views of up to ``EVAL_IMAGES`` slices, its chance level, slices)."""
    n = len(data)
    index = torch.from_numpy(np.unique(np.linspace(0, n - 1, min(n, EVAL_IMAGES)).round()))
    generator = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
    total = chance = 0.0
    model.eval()
    projector.eval()
    with torch.no_grad():
        for part in chunks(index.to(torch.int64), min(config.batch_size, n)):
            x = _batch(data.images, part)
            b = x.shape[0]
            loss = _contrastive_loss(model, projector, x, generator, config.temperature)
            total += b * float(loss)
            chance += b * math.log(2 * b - 1)
    model.train()
    projector.train()
    k = int(index.numel())
    return total / k, chance / k, k


def run_pretrain(config: PretrainConfig, *, progress: Progress | None = None) -> dict[str, Any]:
    """Pretrain, write ``config.out`` and ``<out>.json``; returns the JSON document."""
    t_start = time.perf_counter()
    config.warn_pointless()
    torch.set_num_threads(config.threads)
    data = load_images(config)
    n = len(data)
    if n < 2:
        raise PretrainError(
            f"no usable images for pretraining: {n} slice(s) from {data.files} file(s), "
            f"{data.skipped} file(s) skipped (not decodable CT DICOM, or missing); "
            "at least 2 slices are needed"
        )
    fingerprint = config.fingerprint(data.digest())
    batch_size = min(config.batch_size, n)

    torch.manual_seed(config.seed)
    model = create_model(config.arch)
    projector = Projector(model.num_features)
    model.train()
    generator = torch.Generator().manual_seed(config.seed)
    params = [*model.backbone.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    work = config.work
    work.mkdir(parents=True, exist_ok=True)
    ckpt = train_checkpoint.load(work, fingerprint)
    info: dict[str, Any]
    if ckpt is not None:
        model.load_state_dict(
            {k.removeprefix("net."): v for k, v in ckpt.model.items() if k.startswith("net.")}
        )
        projector.load_state_dict(
            {k.removeprefix("proj."): v for k, v in ckpt.model.items() if k.startswith("proj.")}
        )
        optimizer.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.torch_rng)
        generator.set_state(ckpt.generator_rng)
        info = ckpt.info
        start = ckpt.epoch
        log.info("pretrain: resuming after epoch %d of %d", start, config.epochs)
    else:
        loss0, chance, k = sanity_loss(model, projector, data, config)
        sanity = {"loss_epoch0": loss0, "chance": chance, "images": k}
        info = {"history": [], "seconds": 0.0, "sanity": sanity}  # seconds: of the epochs
        start = 0

    steps_per_epoch = len(chunks(torch.arange(n), batch_size))
    total_steps = steps_per_epoch * config.epochs
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        losses: list[float] = []
        lr = config.lr
        for i, part in enumerate(chunks(order, batch_size)):
            lr = lr_at(epoch * steps_per_epoch + i, steps_per_epoch, total_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _contrastive_loss(
                model, projector, _batch(data.images, part), generator, config.temperature
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        seconds = time.perf_counter() - t0
        stats = EpochStats(
            epoch + 1, config.epochs, float(np.mean(losses)), lr, n / seconds, seconds
        )
        info["history"].append(
            {"epoch": stats.epoch, "loss": stats.loss, "lr": lr, "images_per_s": n / seconds}
        )
        info["seconds"] = float(info["seconds"]) + seconds
        state = {f"net.{k}": v for k, v in model.state_dict().items()}
        state.update({f"proj.{k}": v for k, v in projector.state_dict().items()})
        train_checkpoint.save(
            work,
            train_checkpoint.CheckpointState(
                fingerprint=fingerprint,
                epoch=epoch + 1,
                model=state,
                best={},
                reference={},
                optimizer=optimizer.state_dict(),
                torch_rng=torch.get_rng_state(),
                generator_rng=generator.get_state(),
                info=info,
            ),
        )
        if progress is not None:
            progress(stats)

    loss_last, _, _ = sanity_loss(model, projector, data, config)
    version = f"pretrain-{fingerprint[:12]}"
    model.init = "simclr-pretrain"  # the weights file's `init` metadata
    save_weights(model, config.out, version=version)
    doc = {
        "schema": SCHEMA,
        "arch": config.arch,
        "weights": config.out.name,
        "version": version,
        "n_images": n,
        "files": data.files,
        "skipped_files": data.skipped,
        "epochs": config.epochs,
        "batch_size": batch_size,
        "resumed_after_epoch": start,
        "history": info["history"],
        "sanity": {**info["sanity"], "loss_last": loss_last},
        "seconds": float(info["seconds"]),
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "config": config.describe(),
    }
    write_atomic(config.report_path, (json.dumps(doc, indent=1) + "\n").encode())
    return doc
