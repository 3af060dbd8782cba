"""Score the demo's models on the held-out test set: metrics, ROC curve, confusion matrix.

The test slices are preprocessed by the node's own path (``edge_node.train_data`` over
``edge_node.preprocess``), the models are the weights files the federation produced (the
coordinator's checkpoints, each hospital's local-only run), the decision is the argmax of the
logits and the ROC score the softmax probability of covid, as in ``edge_node.trainer.evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_node.preprocess import PreprocessParams
from edge_node.train_data import SampleSet, load_labelled
from fedscan.dataset import IndexRow
from fedscan.demo.errors import DemoError
from fedscan.experiment.data import records
from fl_protocol.metrics import Metrics, RocCurve, classification_metrics, roc_curve

BATCH = 64


def load_test_set(rows: Sequence[IndexRow], base: Path, cache_dir: Path) -> SampleSet:
    samples, report = load_labelled(records(rows, base), PreprocessParams(), cache_dir)
    if not len(samples):
        raise DemoError("the held-out test set has no usable slices")
    if report.missing or report.unusable:
        raise DemoError(f"test set: {report.missing} missing, {report.unusable} unusable files")
    return samples


def covid_probabilities(weights: Path, samples: SampleSet) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class ids, covid probabilities) of the model in ``weights``."""
    import torch

    from export.weights import load_weights

    model = load_weights(weights)
    if model.texture_dim:
        raise DemoError(f"{weights.name}: texture models are not scored by the demo")
    model.eval()
    logits = []
    with torch.no_grad():
        images = torch.from_numpy(samples.images)
        for i in range(0, len(samples), BATCH):
            logits.append(model(images[i : i + BATCH]))
    out = torch.cat(logits)
    probs = torch.softmax(out, dim=1)[:, 1].double().numpy()
    return out.argmax(dim=1).numpy(), probs


def score(weights: Path, samples: SampleSet) -> tuple[Metrics, RocCurve]:
    pred, probs = covid_probabilities(weights, samples)
    return classification_metrics(samples.labels, pred, probs), roc_curve(samples.labels, probs)
