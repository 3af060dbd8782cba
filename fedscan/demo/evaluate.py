"""Score the demo's models on the held-out test set: metrics, ROC curve, confusion matrix.

The test slices are preprocessed by the node's own path (``edge_node.train.data`` over
``edge_node.ingest.preprocess``), the models are the weights files the federation produced (the
coordinator's checkpoints, each hospital's local-only run), the decision is the argmax of the
logits and the ROC score the softmax probability of covid, as in
``edge_node.train.trainer.evaluate``;
calibration (ECE, reliability) and the metrics at each model's operating point fitted on
validation data come with ``score_with_calibration``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.ingest.preprocess import PreprocessParams
from edge_node.train.data import SampleSet, load_labelled
from fedscan.dataset import IndexRow
from fedscan.demo.errors import DemoError
from fedscan.experiment.data import records
from fl_protocol.metrics import Metrics, RocCurve, classification_metrics, roc_curve


def load_test_set(
    rows: Sequence[IndexRow], base: Path, cache_dir: Path, *, texture: bool = False
) -> SampleSet:
    """The slices of ``rows`` as a node preprocesses them (with their texture features when
    ``texture``: the demo's models then take them as their second input)."""
    samples, report = load_labelled(
        records(rows, base), PreprocessParams(), cache_dir, texture=texture
    )
    if not len(samples):
        raise DemoError("the held-out test set has no usable slices")
    if report.missing or report.unusable:
        raise DemoError(f"test set: {report.missing} missing, {report.unusable} unusable files")
    return samples


def covid_logits(weights: Path, samples: SampleSet) -> np.ndarray:
    """``[N, 2]`` logits of the model in ``weights``."""
    from edge_node.train.loop import predict_logits
    from export.weights import load_weights

    model = load_weights(weights)
    if model.texture_dim and samples.texture is None:
        raise DemoError(f"{weights.name} takes texture features; the samples have none")
    return predict_logits(model, samples)


def calibration_figures(
    logits: np.ndarray, labels: np.ndarray, op: Mapping[str, Any] | None
) -> dict[str, Any]:
    """ECE and reliability of P(covid) on the test slices; with an operating point fitted on
    validation (``fl_protocol.calibration.OperatingPoint.to_dict``) also after its temperature,
    the metrics at its threshold and how many slices fall inside its uncertain band."""
    from fedscan.experiment import stats

    z = logits[:, 1] - logits[:, 0]
    p = stats.sigmoid(z)
    out: dict[str, Any] = {
        "ece": stats.ece(labels, p),
        "reliability": stats.reliability(labels, p),
        "operating_point": None if op is None else dict(op),
    }
    if op is not None:
        pt = stats.sigmoid(z / float(op["temperature"]))
        th, band = float(op["threshold"]), float(op["uncertain_band"])
        out["ece_calibrated"] = stats.ece(labels, pt)
        out["reliability_calibrated"] = stats.reliability(labels, pt)
        pred = (pt >= th).astype(np.int64)
        out["calibrated"] = classification_metrics(labels, pred, pt).to_dict()
        out["uncertain"] = int(np.sum(np.abs(pt - th) < band))
    return out


def score_with_calibration(
    weights: Path, samples: SampleSet, op: Mapping[str, Any] | None
) -> tuple[Metrics, RocCurve, dict[str, Any]]:
    """``score`` plus :func:`calibration_figures`."""
    logits = covid_logits(weights, samples)
    probs = 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0])))
    m = classification_metrics(samples.labels, logits.argmax(axis=1), probs)
    return m, roc_curve(samples.labels, probs), calibration_figures(logits, samples.labels, op)


def covid_probabilities(weights: Path, samples: SampleSet) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class ids, covid probabilities) of the model in ``weights``."""
    logits = covid_logits(weights, samples)
    z = (logits[:, 1] - logits[:, 0]).astype(np.float64)
    return logits.argmax(axis=1), 1.0 / (1.0 + np.exp(-z))


def score(weights: Path, samples: SampleSet) -> tuple[Metrics, RocCurve]:
    pred, probs = covid_probabilities(weights, samples)
    return classification_metrics(samples.labels, pred, probs), roc_curve(samples.labels, probs)
