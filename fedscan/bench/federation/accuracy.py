"""Part 2: does the codec change what one FedAvg step produces? Same updates, every codec.

Three simulated hospitals get patient-disjoint shares of the training split (UCSD COVID-CT,
official split, when ``../shared/data/covid-ct-ucsd`` is there; else the synthetic CT set of
``fedscan.synthetic``). From the same global model (random init: no pretrained weights here)
each trains ``local_epochs`` epochs exactly as a node does (``edge_node.train.trainer.train_epoch``:
AdamW, augmentation, class-weighted cross-entropy) and ``compute_delta`` gives its update. The
SAME three deltas are then encoded with each codec (``fl_protocol.codecs.encode``), decoded as
the coordinator decodes them, and folded by the coordinator's ``fedavg`` strategy (weighted by
training samples). Each aggregated model is scored on the official test split: accuracy (and
F1, AUC, ...) and the difference in points to the fp32 aggregate, the share of test slices
whose predicted class equals the fp32 model's, and the relative L2 error of the aggregated
update itself.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.bench.federation.wire_bytes import CODECS

HOSPITALS = 3
EVAL_BATCH = 32


def load_sets(dataset: Path, work: Path, limit: int | None) -> tuple[dict[str, Any], str]:
    """train / val / test SampleSets and a description of where they came from."""
    from fedscan.bench.train import build_sets, discover, limit_items

    if dataset.exists():
        items, kind = discover(dataset)
        source = f"UCSD COVID-CT ({dataset.name}), official patient-disjoint split"
    else:
        from fedscan.synthetic import generate

        n = 16 if limit else 150
        index = generate(work / "synthetic", n, seed=0, n_patients=n)
        items, kind = discover(index.parent)
        source = f"synthetic CT (fedscan.synthetic, {2 * n} slices): no UCSD data at {dataset}"
    if limit:
        items = limit_items(items, limit)
        source += f", at most {limit} slices per split"
    return build_sets(items, kind, texture=False), source


def deal(train: Any, n: int, seed: int = 0) -> list[Any]:
    """Patient-disjoint shares: patients in a seeded hash order, dealt round-robin."""
    keys = sorted(
        {str(k) for k in train.patient_keys},
        key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(),
    )
    owner = {k: i % n for i, k in enumerate(keys)}
    return [
        train.subset([j for j, k in enumerate(train.patient_keys) if owner[str(k)] == h])
        for h in range(n)
    ]


def _model(arch: str, weights: dict[str, np.ndarray]) -> Any:
    from export.weights import load_numpy_state
    from export.zoo import create_model

    model = create_model(arch)
    load_numpy_state(model, weights)
    return model


def local_update(
    arch: str,
    base: dict[str, np.ndarray],
    samples: Any,
    *,
    epochs: int,
    batch: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """(local - global, seconds) after ``epochs`` node-style epochs on ``samples``."""
    import torch

    from edge_node.federate.update_sender import compute_delta
    from edge_node.train.trainer import class_weights, train_epoch
    from export.weights import state_to_numpy

    torch.manual_seed(seed)
    model = _model(arch, base)
    model.set_train_mode("full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    weight = class_weights(samples.labels)
    t0 = time.perf_counter()
    for _ in range(epochs):
        train_epoch(model, optimizer, samples, batch_size=batch, generator=generator, weight=weight)
    return compute_delta(state_to_numpy(model), base), time.perf_counter() - t0


def scores(arch: str, weights: dict[str, np.ndarray], test: Any) -> np.ndarray:
    """covid probability of every test slice."""
    import torch

    model = _model(arch, weights).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(test), EVAL_BATCH):
            logits = model(torch.from_numpy(test.images[i : i + EVAL_BATCH]))
            out.append(torch.softmax(logits, dim=1)[:, 1].double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def fedavg(
    base: dict[str, np.ndarray], payloads: list[bytes], counts: list[int]
) -> dict[str, np.ndarray]:
    """The coordinator's streaming FedAvg over the decoded payloads."""
    from coordinator.strategy import create_strategy
    from fl_protocol.codecs import decode

    strategy = create_strategy("fedavg")
    strategy.begin_round(base)
    for payload, n in zip(payloads, counts, strict=True):
        strategy.accumulate(decode(payload), n)
    return strategy.finish()


def _metrics(labels: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    from fl_protocol.metrics import classification_metrics

    m = classification_metrics(labels, (prob >= 0.5).astype(np.int64), prob)
    return {
        "accuracy": m.accuracy,
        "f1": m.f1,
        "sensitivity": m.recall,
        "specificity": m.specificity,
        "auc": m.auc,
        "confusion": [list(r) for r in m.confusion],
    }


def _update_error(
    new: dict[str, np.ndarray], ref: dict[str, np.ndarray], base: dict[str, np.ndarray]
) -> float:
    """||(new - base) - (ref - base)|| / ||ref - base|| over the float tensors."""
    num = den = 0.0
    for k, b in base.items():
        if k.endswith("num_batches_tracked"):
            continue
        d_ref = ref[k].astype(np.float64) - b
        num += float(np.sum((new[k].astype(np.float64) - ref[k]) ** 2))
        den += float(np.sum(d_ref**2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def codec_accuracy(
    arch: str, sets: dict[str, Any], *, epochs: int, batch: int, seed: int = 0
) -> dict[str, Any]:
    """One FedAvg step of ``HOSPITALS`` hospitals, aggregated through every codec."""
    import torch

    from export.weights import state_to_numpy
    from export.zoo import create_model
    from fl_protocol.codecs import encode

    torch.manual_seed(seed)
    base = state_to_numpy(create_model(arch))
    shares = deal(sets["train"], HOSPITALS, seed)
    deltas, counts, seconds = [], [], []
    for h, share in enumerate(shares):
        delta, s = local_update(arch, base, share, epochs=epochs, batch=batch, seed=seed + h)
        deltas.append(delta)
        counts.append(len(share))
        seconds.append(s)
        print(f"  {arch}: hospital {h + 1} trained on {len(share)} slices in {s:.0f} s", flush=True)
    test = sets["test"]
    labels = test.labels
    t0 = time.perf_counter()
    global_prob = scores(arch, base, test)
    per_codec: dict[str, Any] = {}
    reference: dict[str, np.ndarray] | None = None
    ref_prob = np.zeros(0)
    for codec in CODECS:
        payloads = [encode(d, codec) for d in deltas]
        new = fedavg(base, payloads, counts)
        prob = scores(arch, new, test)
        if reference is None:
            reference, ref_prob = new, prob
        row = _metrics(labels, prob)
        row["payload_bytes_per_node"] = [len(p) for p in payloads]
        row["accuracy_diff_points_vs_fp32"] = 100.0 * (
            row["accuracy"] - per_codec.get("fp32", row)["accuracy"]
        )
        row["agreement_with_fp32"] = float(np.mean((prob >= 0.5) == (ref_prob >= 0.5)))
        row["max_abs_prob_diff_vs_fp32"] = float(np.max(np.abs(prob - ref_prob)))
        row["update_relative_l2_error_vs_fp32"] = _update_error(new, reference, base)
        per_codec[codec] = row
        print(
            f"  {arch} {codec}: test accuracy {row['accuracy']:.4f} "
            f"({row['accuracy_diff_points_vs_fp32']:+.2f} points vs fp32), agreement "
            f"{row['agreement_with_fp32']:.4f}",
            flush=True,
        )
    return {
        "arch": arch,
        "init": "random",
        "hospitals": [
            {"slices": c, "covid": int(s.labels.sum()), "train_seconds": t}
            for c, s, t in zip(counts, shares, seconds, strict=True)
        ],
        "local_epochs": epochs,
        "batch_size": batch,
        "optimizer": "AdamW lr 1e-3, weight decay 1e-4 (the node's)",
        "n_test": len(test),
        "one_test_slice_in_points": 100.0 / max(len(test), 1),
        "global_before_step": _metrics(labels, global_prob),
        "eval_seconds": time.perf_counter() - t0,
        "codecs": per_codec,
    }
