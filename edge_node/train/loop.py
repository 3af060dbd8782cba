"""The training primitives: one epoch, validation, evaluation, class weights.

Shared by the node's training run (:mod:`edge_node.train.trainer`) and ``fedscan bench train``, so
the benchmark measures the very step the workstation runs: optional augmentation, class-
weighted cross-entropy, the FedProx proximal term, AdamW (the caller's optimizer).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edge_node.errors import TrainingError
from edge_node.train.augment import AugmentParams, augment_batch
from edge_node.train.data import SampleSet
from export.net import FedscanNet
from fl_protocol.metrics import Metrics, classification_metrics

AUGMENT = AugmentParams()  # the paper's augmentation, default strengths
EVAL_BATCH = 64


def clone_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def class_weights(labels: np.ndarray) -> Tensor:
    """Inverse-frequency weights ``n / (2 * n_c)``; all 1 when a class is absent."""
    n = len(labels)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    if np.any(counts == 0):
        return torch.ones(2, dtype=torch.float32)
    return torch.tensor(n / (2.0 * counts), dtype=torch.float32)


def _tensors(samples: SampleSet) -> tuple[Tensor, Tensor, Tensor | None]:
    tex = None if samples.texture is None else torch.from_numpy(samples.texture)
    return torch.from_numpy(samples.images), torch.from_numpy(samples.labels), tex


def _check_texture(model: FedscanNet, samples: SampleSet) -> None:
    if model.texture_dim and samples.texture is None:
        raise TrainingError(f"{model.arch} needs texture features but the samples have none")


@torch.no_grad()
def _scores(
    model: FedscanNet, samples: SampleSet, features: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(logits, labels) of ``samples`` in eval mode; ``features``: cached embeddings."""
    _check_texture(model, samples)
    images, labels, tex = _tensors(samples)
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(samples), EVAL_BATCH):
            t = None if not model.texture_dim or tex is None else tex[i : i + EVAL_BATCH]
            if features is not None:
                out.append(model.classify(features[i : i + EVAL_BATCH], t))
            else:
                out.append(model(images[i : i + EVAL_BATCH], t))
    finally:
        model.train(was_training)
    logits = torch.cat(out) if out else torch.zeros((0, 2))
    return logits, labels


def _metrics_of(logits: Tensor, labels: Tensor) -> Metrics:
    probs = torch.softmax(logits, dim=1)[:, 1]
    return classification_metrics(
        labels.numpy(), logits.argmax(dim=1).numpy(), probs.double().numpy()
    )


def evaluate(weights_or_model: FedscanNet | Path | str, samples: SampleSet) -> Metrics:
    """The model's metrics on ``samples`` (argmax decision, AUC from the covid probability)."""
    if isinstance(weights_or_model, FedscanNet):
        model = weights_or_model
    else:
        from export.weights import load_weights

        model = load_weights(weights_or_model)
    logits, labels = _scores(model, samples)
    return _metrics_of(logits, labels)


def predict_logits(
    weights_or_model: FedscanNet | Path | str, samples: SampleSet, *, tta: bool = False
) -> np.ndarray:
    """``[N, 2]`` float64 logits of ``samples`` in eval mode (for calibration and statistics);
    ``tta``: the mean of the logits of each slice and of its left-right mirror image (the
    flip the training augmentation uses)."""
    if isinstance(weights_or_model, FedscanNet):
        model = weights_or_model
    else:
        from export.weights import load_weights

        model = load_weights(weights_or_model)
    logits, _ = _scores(model, samples)
    if tta:
        flipped = dataclasses.replace(
            samples, images=np.ascontiguousarray(samples.images[..., ::-1])
        )
        logits = (logits + _scores(model, flipped)[0]) / 2.0
    return logits.double().numpy()


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean training loss (cross-entropy + proximal term)
    metrics: Metrics  # on the training pass (augmented inputs, weights changing)
    seconds: float  # forward + backward + step time
    images: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_epoch(
    model: FedscanNet,
    optimizer: torch.optim.Optimizer,
    samples: SampleSet,
    *,
    batch_size: int,
    generator: torch.Generator,
    augment: AugmentParams | None = AUGMENT,
    weight: Tensor | None = None,
    mu: float = 0.0,
    reference: dict[str, Tensor] | None = None,
    features: Tensor | None = None,
) -> EpochStats:
    """One shuffled pass over ``samples`` (class-weighted CE + ``mu/2 ||w - reference||^2``).

    ``features``: cached embeddings of ``samples`` (head mode: only the classifier runs, and
    no augmentation applies). Shared by the node's training and ``fedscan bench train``.
    """
    if mu > 0 and reference is None:
        raise ValueError("FedProx (mu > 0) needs the reference (global) weights")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    images, labels, tex = _tensors(samples)
    n = len(samples)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=generator)
    total = 0.0
    logits_all: list[Tensor] = []
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        t = tex[idx] if (tex is not None and model.texture_dim) else None
        if features is not None:
            logits = model.classify(features[idx], t)
        else:
            x = images[idx]
            if augment is not None:
                x = augment_batch(x, augment, generator)
            logits = model(x, t)
        loss = F.cross_entropy(logits, labels[idx], weight=weight)
        if mu > 0 and reference is not None:
            prox = sum(((p - reference[name]) ** 2).sum() for name, p in trainable)
            loss = loss + (mu / 2.0) * prox
        if not torch.isfinite(loss):
            raise TrainingError(
                "training diverged (the loss is not finite): lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        logits_all.append(logits.detach())
    seconds = time.perf_counter() - t0
    metrics = (
        _metrics_of(torch.cat(logits_all), labels[perm])
        if n
        else _metrics_of(torch.zeros((0, 2)), labels)
    )
    return EpochStats(total / n if n else 0.0, metrics, seconds, n)


def validate(
    model: FedscanNet,
    samples: SampleSet,
    weight: Tensor | None = None,
    features: Tensor | None = None,
) -> tuple[float, Metrics]:
    """(class-weighted cross-entropy, metrics) of ``samples`` in eval mode."""
    logits, labels = _scores(model, samples, features)
    return float(F.cross_entropy(logits, labels, weight=weight)), _metrics_of(logits, labels)
