"""The protocol pieces together over the in-memory broker: a signed global model published as
a retained manifest + chunks reaches a node that connects later; a node's update goes up in
chunks, the coordinator asks for what is missing, and the node resends from its outbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_protocol import codecs, topics
from fl_protocol.chunking import Outbox, Reassembler, split
from fl_protocol.schemas import Ack, GlobalManifest, RoundConfig, UpdateManifest
from fl_protocol.signing import ReplayGuard, generate_keypair, sign_manifest, verify_manifest
from fl_protocol.transport import MemoryBroker, Message

F = "demo"


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(64, 300)).astype(np.float32), "b": np.zeros(64, np.float32)}


def test_global_model_reaches_a_late_node_verified(tmp_path: Path) -> None:
    broker = MemoryBroker()
    key, pub = generate_keypair()
    coord = broker.transport("coordinator")
    coord.connect()
    payload, chunks = split(codecs.encode(weights(), "fp32"), chunk_size=16 * 1024)
    manifest = sign_manifest(
        GlobalManifest(
            federation=F,
            version=1,
            arch="cnn2d",
            texture_dim=0,
            payload=payload,
            round=RoundConfig(round=1, deadline_ts=0),
        ),
        key,
        "coordinator",
    )
    for i, c in enumerate(chunks):
        coord.publish(topics.global_chunk(F, 1, i), c, retain=True)
    coord.publish(topics.global_current(F), manifest.to_bytes(), retain=True)

    node = broker.transport("node-a")
    guard = ReplayGuard(tmp_path / "replay.sqlite")
    state: dict[str, Reassembler] = {}
    got: list[dict[str, np.ndarray]] = []

    def on_global(msg: Message) -> None:
        info = topics.parse_topic(msg.topic)
        if info.kind == "global_current":
            m = GlobalManifest.from_bytes(msg.payload)
            verify_manifest(m, pub)
            if guard.check_global(m.version):
                state["r"] = Reassembler(m.payload, tmp_path / f"spool-{m.version}")
                state["v"] = m  # type: ignore[assignment]
                node.subscribe(topics.global_chunks_filter(F, m.version), on_global)
        elif info.kind == "global_chunk" and "r" in state:
            r = state["r"]
            r.add(info.index or 0, msg.payload)
            if r.complete and not got:
                got.append(codecs.decode(r.result()))
                guard.accept_global(info.version or 0)

    node.subscribe(topics.global_current(F), on_global)
    node.connect()
    assert broker.handler_errors == []
    assert len(got) == 1 and np.array_equal(got[0]["w"], weights()["w"])
    assert guard.highest_global == 1


def test_update_upload_with_lost_chunks_is_completed_from_the_outbox(tmp_path: Path) -> None:
    broker = MemoryBroker()
    key, pub = generate_keypair()
    coord, node = broker.transport("coordinator"), broker.transport("node-a")
    received: dict[int, Reassembler] = {}
    acks: list[Ack] = []
    drop = {1, 3}  # chunks the link loses on the first attempt

    def on_update(msg: Message) -> None:
        info = topics.parse_topic(msg.topic)
        if info.kind == "update_manifest":
            m = UpdateManifest.from_bytes(msg.payload)
            verify_manifest(m, pub)
            received[m.round] = Reassembler(m.payload)
        elif info.kind == "update_chunk":
            received[info.round or 0].add(info.index or 0, msg.payload)

    def on_ack(msg: Message) -> None:
        acks.append(Ack.from_bytes(msg.payload))

    coord.subscribe(topics.updates_filter(F), on_update)
    node.subscribe(topics.acks_filter(F, "node-a"), on_ack)
    coord.connect()
    node.connect()

    payload, chunks = split(codecs.encode(weights(), "int8"), chunk_size=4096)
    manifest = sign_manifest(
        UpdateManifest(
            federation=F,
            round=1,
            node="node-a",
            base_version=0,
            codec="int8",
            num_samples=12,
            payload=payload,
        ),
        key,
        "node-a",
    )
    Outbox(tmp_path).put(manifest, chunks)
    pending = Outbox(tmp_path).pending()[0]  # as after a restart
    node.publish(topics.update_manifest(F, 1, "node-a"), pending.manifest.to_bytes())
    for i, c in pending.chunks():
        if i not in drop:
            node.publish(topics.update_chunk(F, 1, "node-a", i), c)
    missing = received[1].missing()
    assert missing == sorted(drop)
    coord.publish(topics.ack(F, 1, "node-a"), Ack(1, "node-a", "missing", missing).to_bytes())
    for i in acks[-1].missing:
        node.publish(topics.update_chunk(F, 1, "node-a", i), pending.chunk(i))
    assert received[1].complete
    delta = codecs.decode(received[1].result())
    assert np.max(np.abs(delta["w"] - weights()["w"])) < 0.05
    coord.publish(topics.ack(F, 1, "node-a"), Ack(1, "node-a", "complete").to_bytes())
    assert acks[-1].status == "complete" and Outbox(tmp_path).ack(1)
    assert Outbox(tmp_path).pending() == [] and broker.handler_errors == []
