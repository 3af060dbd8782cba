"""Simulated nodes and helpers for the coordinator tests.

A ``FakeNode`` speaks the real protocol through any ``Transport``: it reads the retained global
manifest and chunks, encodes its delta with ``fl_protocol.codecs``, chunks it with
``fl_protocol.chunking`` and publishes manifest and chunks, records the acks it gets, and can
misbehave on purpose (drop, duplicate or reorder chunks). No training: deltas are given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load as st_load

from coordinator.config import ModelConfig
from coordinator.rounds import ArchInfo
from fl_protocol import codecs, topics
from fl_protocol.chunking import Reassembler, split
from fl_protocol.schemas import Ack, EvalReport, GlobalManifest, UpdateManifest
from fl_protocol.transport import Message, Transport

FEDERATION = "test"


def tiny_weights() -> dict[str, np.ndarray]:
    """A FedscanNet-shaped state (float32 everywhere, as export.weights stores it)."""
    rng = np.random.default_rng(42)
    return {
        "backbone.conv.weight": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
        "backbone.bn.weight": np.ones(8, np.float32),
        "backbone.bn.running_mean": np.zeros(8, np.float32),
        "backbone.bn.num_batches_tracked": np.array(0.0, np.float32),
        "head.weight": rng.normal(size=(2, 8)).astype(np.float32),
        "head.bias": np.zeros(2, np.float32),
    }


HEAD_KEYS = frozenset({"head.weight", "head.bias"})


def tiny_source(
    _cfg: ModelConfig, need_weights: bool
) -> tuple[ArchInfo, dict[str, np.ndarray] | None]:
    """A ``ModelSource`` without torch."""
    weights = tiny_weights()
    keys = {
        "full": frozenset(weights),
        "last_stage": frozenset(weights),
        "head": HEAD_KEYS,
    }
    info = ArchInfo(arch="cnn2d", texture_dim=0, init="random", trainable_keys=keys)
    return info, (weights if need_weights else None)


def make_delta(
    seed: int, scale: float = 0.01, keys: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tiny_weights().items():
        if keys is not None and k not in keys:
            continue
        if k.endswith("num_batches_tracked"):
            out[k] = np.array(float(seed + 3), np.float32)
        else:
            out[k] = (scale * rng.normal(size=v.shape)).astype(np.float32)
    return out


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Pending:
    manifest: UpdateManifest
    chunks: list[bytes]
    acks: list[Ack] = field(default_factory=list)


class FakeNode:
    def __init__(self, transport: Transport, node_id: str, federation: str = FEDERATION) -> None:
        self.t = transport
        self.node = node_id
        self.federation = federation
        self.acks: list[Ack] = []
        self.manifests: list[GlobalManifest] = []
        self.pending: dict[int, Pending] = {}
        self._chunks: dict[tuple[int, int], bytes] = {}
        self._lock = threading.Lock()
        self.signer: Callable[[UpdateManifest], UpdateManifest] | None = None
        self.t.subscribe(topics.global_filter(federation), self._on_global)
        self.t.subscribe(topics.acks_filter(federation, node_id), self._on_ack)

    def connect(self) -> FakeNode:
        self.t.connect()
        return self

    def _on_global(self, msg: Message) -> None:
        info = topics.parse_topic(msg.topic)
        with self._lock:
            if info.kind == "global_current":
                self.manifests.append(GlobalManifest.from_bytes(msg.payload))
            elif info.kind == "global_chunk" and msg.payload:
                assert info.version is not None and info.index is not None
                self._chunks[(info.version, info.index)] = msg.payload

    def _on_ack(self, msg: Message) -> None:
        ack = Ack.from_bytes(msg.payload)
        with self._lock:
            self.acks.append(ack)
            if ack.round in self.pending:
                self.pending[ack.round].acks.append(ack)

    @property
    def manifest(self) -> GlobalManifest:
        with self._lock:
            return self.manifests[-1]

    def global_weights(self) -> dict[str, np.ndarray]:
        """Reassemble and verify the current global model from the retained chunks."""
        m = self.manifest
        r = Reassembler(m.payload)
        with self._lock:
            for i in range(m.payload.num_chunks):
                r.add(i, self._chunks[(m.version, i)])
        return dict(st_load(r.result()))

    def last_ack(self, round_id: int) -> Ack | None:
        with self._lock:
            acks = [a for a in self.acks if a.round == round_id]
        return acks[-1] if acks else None

    def send_update(
        self,
        delta: dict[str, np.ndarray],
        num_samples: int,
        *,
        round_id: int | None = None,
        base_version: int | None = None,
        codec: str | None = None,  # None: what the round config asks for
        chunk_size: int = 256,
        payload: bytes | None = None,
        skip: Sequence[int] = (),
        order: Sequence[int] | None = None,
        manifest_last: bool = False,
    ) -> UpdateManifest:
        m = self.manifest
        rnd = round_id if round_id is not None else (m.round.round if m.round else 0)
        codec = codec or (m.round.codec if m.round else "fp32")
        data = payload if payload is not None else codecs.encode(delta, codec)
        payload_manifest, chunks = split(data, chunk_size)
        manifest = UpdateManifest(
            federation=self.federation,
            round=rnd,
            node=self.node,
            base_version=m.version if base_version is None else base_version,
            codec=codec,
            num_samples=num_samples,
            payload=payload_manifest,
        )
        if self.signer is not None:
            manifest = self.signer(manifest)
        self.pending[rnd] = Pending(manifest, chunks)
        indices = list(order) if order is not None else list(range(len(chunks)))
        if not manifest_last:
            self.t.publish(
                topics.update_manifest(self.federation, rnd, self.node), manifest.to_bytes()
            )
        for i in indices:
            if i not in skip:
                self.send_chunk(rnd, i)
        if manifest_last:
            self.t.publish(
                topics.update_manifest(self.federation, rnd, self.node), manifest.to_bytes()
            )
        return manifest

    def send_chunk(self, round_id: int, index: int) -> None:
        chunk = self.pending[round_id].chunks[index]
        self.t.publish(topics.update_chunk(self.federation, round_id, self.node, index), chunk)

    def resend(self, round_id: int) -> None:
        """What a real node does after a restart: manifest and every chunk again."""
        p = self.pending[round_id]
        self.t.publish(
            topics.update_manifest(self.federation, round_id, self.node), p.manifest.to_bytes()
        )
        for i in range(len(p.chunks)):
            self.send_chunk(round_id, i)

    def send_eval(
        self, round_id: int, model_version: int, tn: int, fp: int, fn: int, tp: int
    ) -> None:
        n = tn + fp + fn + tp
        report = EvalReport(
            round=round_id,
            node=self.node,
            model_version=model_version,
            n_val=n,
            metrics={"accuracy": (tp + tn) / n, "auc": 0.9},
            confusion=((tn, fp), (fn, tp)),
        )
        self.t.publish(topics.eval_report(self.federation, round_id, self.node), report.to_bytes())


class NodeThread(threading.Thread):
    """A simulated node on a real broker (PahoTransport): for every open round it fetches the
    global model, sends a small random delta of the right shapes, and resends its update until
    acknowledged; it stops once it sees ``final_version`` with no round open."""

    def __init__(
        self,
        node: FakeNode,
        num_samples: int,
        final_version: int,
        *,
        codec: str = "fp16",
        chunk_size: int = 16 * 1024,
        resend_after_s: float = 3.0,
        make_update: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ) -> None:
        super().__init__(name=f"node-{node.node}", daemon=True)
        # (round, global weights) -> the delta to send; None: a small random one (honest)
        self.make_update = make_update
        self.node = node
        self.num_samples = num_samples
        self.final_version = final_version
        self.codec = codec
        self.chunk_size = chunk_size
        self.resend_after_s = resend_after_s
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def _loop(self) -> None:
        import time

        last_send: dict[int, float] = {}
        while not self.stop.is_set():
            time.sleep(0.05)
            if not self.node.manifests:
                continue
            m = self.node.manifest
            if m.round is None:
                if m.version >= self.final_version:
                    self.finished.set()
                    return
                continue
            rnd = m.round.round
            ack = self.node.last_ack(rnd)
            if ack is not None and ack.status in ("complete", "duplicate", "stale", "rejected"):
                continue
            if rnd not in self.node.pending:
                try:
                    weights = self.node.global_weights()
                except KeyError:
                    continue  # chunks still arriving
                rng = np.random.default_rng(abs(hash((self.node.node, rnd))) % 2**32)
                delta = {
                    k: (
                        np.array(3.0, np.float32)
                        if k.endswith("num_batches_tracked")
                        else (0.001 * rng.normal(size=v.shape)).astype(np.float32)
                    )
                    for k, v in weights.items()
                }
                if self.make_update is not None:
                    delta = self.make_update(rnd, weights)
                self.sent[rnd] = delta
                self.node.send_update(
                    delta, self.num_samples, codec=self.codec, chunk_size=self.chunk_size
                )
                last_send[rnd] = time.monotonic()
            elif ack is not None and ack.status == "missing":
                for i in ack.missing:
                    self.node.send_chunk(rnd, i)
                last_send[rnd] = time.monotonic()
                with self.node._lock:
                    self.node.acks.remove(ack)
            elif time.monotonic() - last_send.get(rnd, 0.0) > self.resend_after_s:
                self.node.resend(rnd)  # no answer: the coordinator may have restarted
                last_send[rnd] = time.monotonic()
