"""Part 1: the bytes one node publishes per round, for every codec, on real weight deltas.

A delta is what a node really sends: a random-init model (``export.zoo.create_model``) takes a
few training steps exactly as the node trains (``edge_node.train.trainer.train_epoch``: AdamW,
the paper's augmentation, class-weighted cross-entropy) on real CT slices (the pydicom-data CT
samples in ``$FEDSCAN_SAMPLES``, preprocessed by ``edge_node.ingest.preprocess.prepare``), and
``edge_node.federate.update_sender.compute_delta`` takes local - global. Each codec then goes
through the node's publishing path: ``fl_protocol.codecs.encode`` (all tensors, or only the tensors
``head`` mode trains), ``fl_protocol.chunking.split`` (1 MiB chunks) and a signed
``UpdateManifest``. Counted: the manifest JSON plus every chunk, i.e. the MQTT payloads the
node publishes for its update; ``mqtt_bytes`` adds the MQTT 3.1.1 PUBLISH framing and topics
(``fl_protocol.mqtt_wire.publish``, what goes on the TCP stream). The evaluation report a node
also sends each round is the same for every codec and is given apart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.bench.federation.common import FEDERATION
from fedscan.samples import find_samples

CT_SAMPLES = ("693_UNCR.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm")
CODECS = ("fp32", "fp16", "int8", "int8_channel")
NODE = "hospital-01"
ROUND = 1


def ct_slices(n: int, work: Path) -> tuple[np.ndarray, str]:
    """``n`` real CT frames [n, 1, 224, 224] (repeated when fewer exist) and where from."""
    from edge_node.ingest.preprocess import PreprocessParams, prepare

    files = find_samples(CT_SAMPLES)
    frames = [f for path in files for f in prepare(path, PreprocessParams()).frames]
    source = f"real CT: {', '.join(p.name for p in files)}"
    if not frames:  # no $FEDSCAN_SAMPLES: synthetic CT through the same preprocessor
        from fedscan.dataset import read_index
        from fedscan.synthetic import generate

        index = generate(work / "bytes-synthetic", max(1, n // 2), seed=1)
        frames = [
            prepare(index.parent / r.path, PreprocessParams()).frames[0] for r in read_index(index)
        ]
        source = "synthetic CT (fedscan.synthetic)"
    idx = np.arange(n) % len(frames)
    return np.stack([frames[i] for i in idx])[:, None].astype(np.float32), source


def realistic_delta(
    arch: str, images: np.ndarray, *, batch: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(global weights, local - global, facts) after one pass over ``images`` in ``batch``es."""
    import torch

    from edge_node.federate.update_sender import compute_delta
    from edge_node.train.data import SampleSet
    from edge_node.train.trainer import class_weights, train_epoch
    from export.weights import state_to_numpy
    from export.zoo import create_model

    torch.manual_seed(seed)
    model = create_model(arch)
    base = state_to_numpy(model)
    model.set_train_mode("full")
    labels = (np.arange(len(images)) % 2).astype(np.int64)
    samples = SampleSet(
        images=images,
        labels=labels,
        texture=None,
        patient_keys=tuple(f"p{i}" for i in range(len(images))),
        ids=tuple(str(i) for i in range(len(images))),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    stats = train_epoch(
        model,
        optimizer,
        samples,
        batch_size=batch,
        generator=torch.Generator().manual_seed(seed),
        weight=class_weights(labels),
    )
    delta = compute_delta(state_to_numpy(model), base)
    # counters (BatchNorm num_batches_tracked) are not weights: left out of the delta's size
    floats = [
        v for k, v in delta.items() if v.dtype.kind == "f" and not k.endswith("num_batches_tracked")
    ]
    facts = {
        "params": int(sum(p.numel() for p in model.parameters())),
        "state_tensors": len(base),
        "state_bytes_fp32": int(sum(v.nbytes for v in base.values())),
        "head_keys": sorted(model.trainable_state_keys("head")),
        "train_steps": -(-len(images) // batch),
        "train_batch": batch,
        "train_seconds": time.perf_counter() - t0,
        "train_metrics": stats.metrics,
        "delta_l2": float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in floats))),
        "delta_max_abs": float(max(float(np.max(np.abs(v))) for v in floats if v.size)),
    }
    return base, delta, facts


def published(
    delta: dict[str, np.ndarray],
    codec: str,
    keys: list[str] | None,
    train_metrics: Any,
    num_samples: int,
    signing_key: Any,
) -> dict[str, Any]:
    """Encode, chunk and sign like ``edge_node.federate.update_sender.UpdateSender.build`` and
    ``send``."""
    from edge_node.federate.update_sender import metric_values
    from fl_protocol import topics
    from fl_protocol.chunking import split
    from fl_protocol.codecs import decode, encode
    from fl_protocol.mqtt_wire import publish
    from fl_protocol.schemas import UpdateManifest
    from fl_protocol.signing import sign_manifest

    t0 = time.perf_counter()
    payload = encode(delta, codec, keys)
    encode_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    decoded = decode(payload)
    decode_ms = (time.perf_counter() - t0) * 1000
    payload_manifest, chunks = split(payload)
    metrics = metric_values(train_metrics)
    metrics["epochs"] = 1.0
    manifest = UpdateManifest(
        federation=FEDERATION,
        round=ROUND,
        node=NODE,
        base_version=0,
        codec=codec,
        num_samples=num_samples,
        payload=payload_manifest,
        train_metrics=metrics,
    )
    manifest_bytes = sign_manifest(manifest, signing_key, NODE).to_bytes()
    messages = [(topics.update_manifest(FEDERATION, ROUND, NODE), manifest_bytes)]
    messages += [(topics.update_chunk(FEDERATION, ROUND, NODE, i), c) for i, c in enumerate(chunks)]
    mqtt = sum(len(publish(t, p, 1, False, i + 1, False)) for i, (t, p) in enumerate(messages))
    num = den = 0.0
    for name, x in decoded.items():
        if x.dtype.kind == "f":
            ref = delta[name].astype(np.float64)
            num += float(np.sum((x.astype(np.float64) - ref) ** 2))
            den += float(np.sum(ref**2))
    return {
        "codec": codec,
        "trainable_only": keys is not None,
        "tensors": len(decoded),
        "payload_bytes": len(payload),
        "manifest_bytes": len(manifest_bytes),
        "chunks": len(chunks),
        "bytes": len(manifest_bytes) + sum(len(c) for c in chunks),
        "mqtt_bytes": mqtt,
        "encode_ms": encode_ms,
        "decode_ms": decode_ms,
        "relative_l2_error": float(np.sqrt(num / den)) if den > 0 else 0.0,
    }


def eval_report_bytes(train_metrics: Any) -> int:
    """Size of the per-round evaluation report (same for every codec)."""
    from edge_node.federate.update_sender import eval_report

    return len(eval_report(ROUND, NODE, 0, train_metrics).to_bytes())


Deltas = dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


def measure_bytes(
    archs: list[str], images: np.ndarray, batch: int, keep: Deltas | None = None
) -> dict[str, Any]:
    """Per architecture: the delta's facts and one row per codec variant; ``keep`` receives
    each architecture's (global weights, delta) for the aggregation part."""
    from fl_protocol.signing import generate_keypair

    key, _public = generate_keypair()
    out: dict[str, Any] = {}
    for arch in archs:
        base, delta, facts = realistic_delta(arch, images, batch=batch)
        if keep is not None:
            keep[arch] = (base, delta)
        metrics = facts.pop("train_metrics")
        head = facts.pop("head_keys")
        rows: dict[str, Any] = {}
        for codec in CODECS:
            rows[codec] = published(delta, codec, None, metrics, len(images), key)
        for codec in CODECS:
            rows[f"{codec}_head"] = published(delta, codec, head, metrics, len(images), key)
        fp32 = rows["fp32"]["bytes"]
        for row in rows.values():
            row["fp32_over_this"] = fp32 / row["bytes"]
        facts["head_tensors"] = len(head)
        facts["eval_report_bytes"] = eval_report_bytes(metrics)
        out[arch] = {"delta": facts, "codecs": rows}
        print(
            f"  {arch}: fp32 {fp32 / 1e6:.2f} MB, fp16 {rows['fp16']['bytes'] / 1e6:.2f} MB, "
            f"int8 {rows['int8']['bytes'] / 1e6:.2f} MB (x{rows['int8']['fp32_over_this']:.2f}), "
            f"head-only int8 {rows['int8_head']['bytes'] / 1e3:.1f} kB",
            flush=True,
        )
    return out
