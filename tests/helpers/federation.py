"""A scripted coordinator on the in-process MQTT broker, and node configs, for federation tests.

``FakeCoordinator`` speaks the real protocol (``fl_protocol`` schemas, chunking, codecs,
signing) over a ``MemoryBroker``: it publishes global models as retained chunks + a retained
manifest, collects node updates (manifest + chunks, any order, duplicates ignored), decodes
them with the real codec, and answers with acks whose status a test can script. It is the other
side of the protocol written down, not a mock of the node.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save as st_save
from safetensors.numpy import save_file

from edge_node.config import NodeConfig, config_from_dict
from edge_node.federate.update_sender import UpdateSender
from edge_node.train.job import TrainResult
from fl_protocol import topics
from fl_protocol.chunking import Reassembler, split
from fl_protocol.codecs import decode
from fl_protocol.metrics import Metrics, from_confusion
from fl_protocol.schemas import (
    Ack,
    EvalReport,
    GlobalManifest,
    NodeStatus,
    PayloadManifest,
    RoundConfig,
    ServingPoint,
    UpdateManifest,
)
from fl_protocol.signing import save_public_key, sign_manifest
from fl_protocol.transport import MemoryBroker, Message

ARCH = "cnn2d"
# the coordinator key of these tests (a fixed, test-only key): nodes made by node_config trust
# it, FakeCoordinator signs with it unless given another key or key=None (unsigned)
TEST_COORDINATOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_DEFAULT_KEY: Any = object()  # FakeCoordinator(key=...) not given


def cnn2d_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A real cnn2d state (float32 numpy), random init with ``seed``."""
    import torch

    from export.weights import state_to_numpy
    from export.zoo import create_model

    torch.manual_seed(seed)
    return state_to_numpy(create_model(ARCH))


def weights_payload(weights: dict[str, np.ndarray], version: int) -> bytes:
    """What the coordinator's checkpoint looks like on the wire: fp32 safetensors + metadata."""
    meta = {"arch": ARCH, "texture_dim": "0", "version": str(version), "init": "random"}
    return bytes(st_save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata=meta))


def onnx_export(weights: dict[str, np.ndarray], version: int, folder: Path) -> bytes:
    """The coordinator's ONNX export of ``weights`` as global ``version`` (real export + parity)."""
    from coordinator.onnx_artifact import export_global_onnx

    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"global_v{version}.safetensors"
    src.write_bytes(weights_payload(weights, version))
    return export_global_onnx(
        src, folder / f"global_v{version}.onnx", model_version=version
    ).read_bytes()


def round_config(round_: int, *, deadline_in: float = 3600.0, **kw: Any) -> RoundConfig:
    values: dict[str, Any] = {
        "round": round_,
        "deadline_ts": time.time() + deadline_in,
        "codec": "fp32",
        "local_epochs": 1,
        "batch_size": 4,
        "min_labels": 4,
        "seed": 1,
    }
    values.update(kw)
    return RoundConfig(**values)


def node_config(
    root: Path,
    *,
    node_id: str = "n1",
    federation: str = "fedtest",
    training: dict[str, Any] | None = None,
    **fed: Any,
) -> NodeConfig:
    """A node rooted at ``root`` (inbox/, state/, quarantine/, models/), federation enabled."""
    train: dict[str, Any] = {
        "arch": ARCH,
        "epochs": 1,
        "batch_size": 4,
        "val_fraction": 0.35,
        "nice": 0,
        "augment": False,
        "early_stopping_patience": 0,
    }
    train.update(training or {})
    if "coordinator_public_key" not in fed:  # a federation node always has the key (fail closed)
        pub = root / "keys" / "coordinator.pub"
        pub.parent.mkdir(parents=True, exist_ok=True)
        save_public_key(TEST_COORDINATOR_KEY.public_key(), pub)
        fed["coordinator_public_key"] = str(pub)
    raw = {
        "node_id": node_id,
        "paths": {
            "inbox": "inbox",
            "state_dir": "state",
            "quarantine_dir": "quarantine",
            "model_dir": "models",
        },
        "training": train,
        "federation": {"enabled": True, "federation": federation, **fed},
    }
    return config_from_dict(raw, root)


@dataclass
class Upload:
    """One node's update for one round, as the coordinator sees it."""

    manifest: UpdateManifest
    reassembler: Reassembler
    manifests_seen: int = 1
    chunks_seen: int = 0
    acked: list[str] = field(default_factory=list)
    awaiting: set[int] = field(default_factory=set)  # chunks asked for again ("missing")


class FakeCoordinator:
    """The coordinator side of the protocol over a MemoryBroker (see the module docstring)."""

    def __init__(
        self,
        broker: MemoryBroker,
        federation: str,
        *,
        key: Ed25519PrivateKey | None = _DEFAULT_KEY,  # None: publish unsigned
        chunk_size: int = 64 * 1024,
        client_id: str = "coordinator",
    ) -> None:
        self.broker = broker
        self.federation = federation
        self.key = TEST_COORDINATOR_KEY if key is _DEFAULT_KEY else key
        self.chunk_size = chunk_size
        self.t = broker.transport(client_id)
        self.uploads: dict[tuple[int, str], Upload] = {}
        self.counted: dict[tuple[int, str], list[str]] = {}  # accepted nonces
        self.eval_reports: list[EvalReport] = []
        self.statuses: list[NodeStatus] = []
        # (manifest, upload) -> status to answer once complete; default "complete"
        self.policy: Callable[[UpdateManifest, Upload], str] = lambda m, u: "complete"
        self.open_round: int | None = None
        self.t.subscribe(topics.updates_filter(federation), self._on_update)
        self.t.subscribe(topics.eval_reports_filter(federation), self._on_eval)
        self.t.subscribe(topics.node_status_filter(federation), self._on_status)
        self.t.connect()

    # -- global model ------------------------------------------------------------------------

    def publish_global(
        self,
        version: int,
        weights: dict[str, np.ndarray],
        round_cfg: RoundConfig | None = None,
        *,
        sign: bool = True,
        chunks: bool = True,
        mutate: Callable[[GlobalManifest], GlobalManifest] | None = None,
        chunk_filter: Callable[[int, bytes], bytes | None] | None = None,
        onnx: bytes | None = None,
        operating_point: ServingPoint | None = None,
    ) -> GlobalManifest:
        """Retained chunks, then the retained manifest (signed when a key is set); with
        ``onnx``, that file's chunks too, described in the manifest (schema version 2), and
        ``operating_point`` in it when given."""
        payload, parts = split(weights_payload(weights, version), self.chunk_size)
        onnx_payload = None
        if onnx is not None:
            onnx_payload, onnx_parts = split(onnx, self.chunk_size)
            for i, part in enumerate(onnx_parts):
                topic = topics.global_onnx_chunk(self.federation, version, i)
                self.t.publish(topic, part, qos=1, retain=True)
        if chunks:
            for i, part in enumerate(parts):
                data = chunk_filter(i, part) if chunk_filter else part
                if data is None:
                    continue
                self.t.publish(
                    topics.global_chunk(self.federation, version, i), data, qos=1, retain=True
                )
        manifest = GlobalManifest(
            federation=self.federation,
            version=version,
            arch=ARCH,
            texture_dim=0,
            payload=payload,
            round=round_cfg,
            onnx=onnx_payload,
            operating_point=operating_point,
        )
        if sign and self.key is not None:
            manifest = sign_manifest(manifest, self.key, "coordinator")
        if mutate is not None:
            manifest = mutate(manifest)
        self.open_round = round_cfg.round if round_cfg else None
        self.publish_manifest(manifest)
        return manifest

    def publish_manifest(self, manifest: GlobalManifest) -> None:
        self.t.publish(topics.global_current(self.federation), manifest.to_bytes(), retain=True)

    def publish_chunk(self, version: int, index: int, data: bytes) -> None:
        self.t.publish(topics.global_chunk(self.federation, version, index), data, retain=True)

    def with_round(self, manifest: GlobalManifest, round_cfg: RoundConfig | None) -> None:
        """Re-publish the same model with another round config (re-signed)."""
        m = dataclasses.replace(manifest, round=round_cfg, signature=None, key_id=None)
        if self.key is not None:
            m = sign_manifest(m, self.key, "coordinator")
        self.open_round = round_cfg.round if round_cfg else None
        self.publish_manifest(m)

    # -- updates -----------------------------------------------------------------------------

    def _on_update(self, msg: Message) -> None:
        info = topics.parse_topic(msg.topic)
        assert info.round is not None and info.node is not None
        key = (info.round, info.node)
        if info.kind == "update_manifest":
            manifest = UpdateManifest.from_bytes(msg.payload)
            if manifest.nonce in self.counted.get(key, []):
                self.ack(*key, "complete")  # already counted: tell it again, count once
                return
            up = self.uploads.get(key)
            if up is None or up.manifest.nonce != manifest.nonce:
                up = Upload(manifest, Reassembler(manifest.payload))
                self.uploads[key] = up
            else:
                up.manifests_seen += 1
            if up.reassembler.complete and not up.awaiting:
                self._finish(key)
        elif info.kind == "update_chunk" and key in self.uploads:
            up = self.uploads[key]
            up.chunks_seen += 1
            index = info.index or 0
            new = up.reassembler.add(index, msg.payload)
            asked = index in up.awaiting
            up.awaiting.discard(index)
            if up.reassembler.complete and (new or (asked and not up.awaiting)):
                self._finish(key)

    def _finish(self, key: tuple[int, str]) -> None:
        up = self.uploads[key]
        round_, node = key
        status = "stale" if round_ != self.open_round else self.policy(up.manifest, up)
        missing: tuple[int, ...] = ()
        if status.startswith("missing:"):
            missing = tuple(int(i) for i in status.split(":", 1)[1].split(","))
            up.awaiting.update(missing)
            status = "missing"
        if status == "complete":
            nonces = self.counted.setdefault(key, [])
            if up.manifest.nonce not in nonces:
                nonces.append(up.manifest.nonce)
        up.acked.append(status)
        self.ack(round_, node, status, missing)

    def ack(self, round_: int, node: str, status: str, missing: tuple[int, ...] = ()) -> None:
        a = Ack(round=round_, node=node, status=status, missing=missing, reason="test")
        self.t.publish(topics.ack(self.federation, round_, node), a.to_bytes())

    def delta(self, round_: int, node: str) -> dict[str, np.ndarray]:
        return decode(self.uploads[(round_, node)].reassembler.result())

    # -- reports -----------------------------------------------------------------------------

    def _on_eval(self, msg: Message) -> None:
        self.eval_reports.append(EvalReport.from_bytes(msg.payload))

    def _on_status(self, msg: Message) -> None:
        if msg.payload:
            self.statuses.append(NodeStatus.from_bytes(msg.payload))


def published_by(broker: MemoryBroker, client_id: str) -> list[Message]:
    return [m for c, m in broker.published if c == client_id]


FED = "fedtest"


ROUND = 3


BASE_VERSION = 2


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def metrics() -> Metrics:
    return from_confusion(3, 1, 0, 4, auc=0.9)


def train_result(folder: Path, local: dict[str, np.ndarray], keys: tuple[str, ...]) -> TrainResult:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    save_file(local, str(weights), metadata={"arch": "cnn2d", "texture_dim": "0"})
    return TrainResult(
        weights_path=weights,
        onnx_path=None,
        metrics_path=folder / "metrics.json",
        num_samples=12,
        n_val=8,
        train_metrics=metrics(),
        val_metrics=metrics(),
        init_val_metrics=metrics(),
        best_epoch=1,
        epochs_run=1,
        images_per_s=10.0,
        init="global.safetensors",
        model_version="local-test",
        arch="cnn2d",
        mode="full",
        trainable_keys=keys,
        resumed_from_epoch=0,
        seconds=1.0,
    )


class Setup:
    """A node folder with global weights on disk and a local result that differs from them."""

    def __init__(self, root: Path, *, codec: str = "fp32", trainable_only: bool = False,
                 **fed: Any) -> None:  # fmt: skip
        self.root = root
        self.config: NodeConfig = node_config(root, **fed)
        self.base = cnn2d_weights(0)
        rng = np.random.default_rng(0)
        self.local = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32)
                      for k, v in self.base.items()}  # fmt: skip
        self.global_path = root / "models" / "global.safetensors"
        self.global_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.base, str(self.global_path), metadata={"arch": "cnn2d"})
        self.result = train_result(root / "run", self.local, ("head.weight", "head.bias"))
        self.manifest = GlobalManifest(
            federation=FED,
            version=BASE_VERSION,
            arch="cnn2d",
            texture_dim=0,
            payload=PayloadManifest(
                total_size=1, sha256="0" * 64, chunk_size=1, chunk_sha256=("0" * 64,)
            ),
            round=round_config(ROUND, codec=codec, trainable_only=trainable_only),
        )


def connect(
    broker: MemoryBroker, setup: Setup, clock: Clock, chunk_size: int = 1024 * 1024
) -> UpdateSender:
    t = broker.transport("node-n1")
    sender = UpdateSender(setup.config, t, clock=clock, ack_timeout_s=30.0, chunk_size=chunk_size)
    t.subscribe("fl/fedtest/round/+/ack/n1", lambda m: sender.on_ack(_ack(m.payload)))
    t.connect()
    return sender


def _ack(payload: bytes) -> Ack:
    return Ack.from_bytes(payload)
