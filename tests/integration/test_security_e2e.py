"""End to end over TLS with the kits `fedscan provision` makes: a real Mosquitto running the
provisioned production config, `fedscan coordinator run --config kits/coordinator/...` and three
`fedscan node run --config kits/<n>/node.toml` processes (only test-local settings changed:
a small labelled inbox, cnn2d, one epoch, API port 0; the [federation] sections are the
kits' own: mqtts, client certificates, Ed25519 keys).

One federation, one broker and one run per module, in this order:

1. Before node a has started, an attacker holding a's leaked TLS certificate (but not its
   signing key) sends a round-1 update for a signed with a fresh key: rejected (signature),
   nothing counted.
2. The genuine a then starts; while the coordinator is paused its stored round-1 update is
   captured (as a network observer would record it). Round 1 completes: a, b and c counted.
3. With round 1 closed and round 2 open, the captured update is replayed on round 1 (stale)
   and, edited to claim round 2, keeping a's signature (rejected: signature). Round 2 counts
   nothing from a. The coordinator is stopped, so no version 2 exists.
4. Every node serves global version 1. An attacker with the coordinator's TLS certificate (but
   not its signing key) publishes a retained version-2 manifest signed with a fresh key, and
   the real version-1 manifest edited to version 2 with its original signature: every node
   refuses both and keeps predicting with version 1.

Tampered global chunks are refused at the MemoryTransport level in
tests/edge_node/federate/test_model_sync.py; here the attacker has no valid manifest to attach
them to.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import load_config
from coordinator.model_init import ensure_initial_version, torch_model_source
from coordinator.state import State
from edge_node.config import minimal_toml
from fedscan.brokers.mosquitto import Mosquitto, free_port
from fedscan.provision import BROKER, provision
from fl_protocol import topics
from fl_protocol.chunking import split
from fl_protocol.codecs import encode
from fl_protocol.schemas import Ack, GlobalManifest, UpdateManifest
from fl_protocol.signing import generate_keypair, sign_manifest
from tests.helpers.dicom_factory import CT_SAMPLE, copy_with_new_uid, sample_path
from tests.helpers.wait import wait_for
from tests.integration.federation_harness import (
    FEDERATION,
    NODE_LOCAL,
    Coordinator,
    FedNode,
)
from tests.integration.tls_broker import start_broker
from tests.integration.tls_peers import Peer, connect, is_accepted, tls_context

pytestmark = pytest.mark.integration

TIMEOUT = 240.0
NODES = ("a", "b", "c")
F = FEDERATION  # the labelled inboxes split patients with this federation's salt


ROUNDS = {
    "num_rounds": 2,  # round 2 is only opened (for the replay checks), never completed
    "min_nodes": 3,
    "round_timeout_s": 180.0,
    "chunk_timeout_s": 2.0,
    "codec": "fp16",
    "local_epochs": 1,
    "batch_size": 4,
    "min_labels": 4,
    "eval_wait_s": 0.0,
}


def kit_node(kits: Path, node: str) -> FedNode:
    """The kit's node.toml: its [federation] section verbatim, test-local settings above it."""
    kit = kits / node
    federation = (kit / "node.toml").read_text().partition("\n[federation]\n")[2]
    assert "mqtts://" in federation and "cert_file" in federation
    fed = FedNode(kit, node, "unused")  # writes the labelled inbox (and a node.toml we replace)
    local = minimal_toml(node, **NODE_LOCAL)
    (kit / "node.toml").write_text(local + "\n[federation]\n" + federation)
    return fed


def kit_coordinator(kits: Path) -> Coordinator:
    """The kit's coordinator.toml with the test's [rounds] (its last section) and version 0."""
    path = kits / "coordinator" / "coordinator.toml"
    head, sep, _ = path.read_text().partition("\n[rounds]\n")
    assert sep and "mqtts://" in head
    rounds = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ROUNDS.items())
    expected = ", ".join(f'"{n}"' for n in NODES)
    path.write_text(f'{head}\n[model]\narch = "cnn2d"\n[rounds]\n{rounds}\n'
                    f"expected_nodes = [{expected}]\n")  # fmt: skip
    cfg = load_config(path)
    state = State(cfg.state_dir)
    try:
        ensure_initial_version(state, cfg.model, torch_model_source)
    finally:
        state.close()
    return Coordinator(path)


@dataclass
class Run:
    prov: Path
    broker: Mosquitto
    coord: Coordinator
    nodes: dict[str, FedNode]
    forged_acks: list[Ack]
    captured: Path  # a's genuine round-1 update, as stored in its outbox
    replay_acks: list[Ack]

    @property
    def logs(self) -> tuple[Path, ...]:
        return (self.coord.log, *(n.log for n in self.nodes.values()), self.broker.log_path)

    def attacker(self, who: str) -> Peer:
        ca = self.prov / "broker" / BROKER.ca
        peer = connect(self.broker.port, tls_context(ca, self.prov / "kits" / who))
        assert is_accepted(peer), f"{who}: {peer.error or peer.connack}"
        return peer


def acks_after(peer: Peer, count: int, what: str) -> list[Ack]:
    assert peer.wait_for(lambda: len(peer.messages) >= count, timeout=60), f"no ack: {what}"
    return [Ack.from_bytes(payload) for _, payload in peer.messages]


def publish_update(peer: Peer, manifest: UpdateManifest, chunks: list[bytes]) -> None:
    base = topics.update_manifest(F, manifest.round, manifest.node)
    peer.publish(base, manifest.to_bytes())
    for i, chunk in enumerate(chunks):
        peer.publish(topics.update_chunk(F, manifest.round, manifest.node, i), chunk)


def forged_update(round_: int) -> tuple[UpdateManifest, list[bytes]]:
    """A well-formed fp16 update for node a, signed with a key nobody trusts."""
    import numpy as np

    payload, chunks = split(encode({"w": np.zeros((4,), np.float32)}, "fp16"), 1024 * 1024)
    manifest = UpdateManifest(
        federation=F, round=round_, node="a", base_version=0, codec="fp16",
        num_samples=6, payload=payload,
    )  # fmt: skip
    key, _ = generate_keypair()
    return sign_manifest(manifest, key, "a"), list(chunks)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("secure")
    port = free_port()
    prov = root / "prov"
    provision(prov, F, list(NODES), broker_host="127.0.0.1", broker_port=port)
    kits = prov / "kits"
    broker = start_broker(prov, root / "broker", port=port)
    coord = kit_coordinator(kits)
    nodes = {n: kit_node(kits, n) for n in NODES}
    started: list[Any] = []
    try:
        started.append(coord.start())
        for n in ("b", "c"):
            started.append(nodes[n].start())
        logs = (coord.log, broker.log_path)
        wait_for(lambda: coord.round_status(1) == "collecting", TIMEOUT, "round 1", logs)

        # 1. a forged round-1 update for a (a's TLS identity, a fresh signing key)
        thief = Run(prov, broker, coord, nodes, [], root, []).attacker("a")
        thief.subscribe(topics.ack(F, 1, "a"))
        manifest, chunks = forged_update(1)
        publish_update(thief, manifest, chunks)
        forged_acks = acks_after(thief, 1, "forged update")
        thief.close()

        # 2. the genuine a; its stored update is captured while no ack can settle it
        coord.signal(signal.SIGSTOP)
        a = nodes["a"]
        started.append(a.start())
        wait_for(lambda: a.outbox_rounds() == ["round-1"], TIMEOUT, "a's update", (a.log,))
        captured = root / "captured"
        wait_for(lambda: (a.folder / "state/federation/outbox/round-1/manifest.json").exists(),
                 30, "a's manifest", (a.log,))  # fmt: skip
        shutil.copytree(a.folder / "state" / "federation" / "outbox" / "round-1", captured)
        coord.signal(signal.SIGCONT)
        r = Run(prov, broker, coord, nodes, forged_acks, captured, [])
        wait_for(lambda: coord.round_status(2) is not None, TIMEOUT, "round 1 closed", r.logs)

        # 3. replays of the captured update once round 1 is closed; a's daemon is paused so the
        # thief's connection (same certificate, same client id) is not fought over
        a.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            thief = r.attacker("a")
            thief.subscribe(f"fl/{F}/round/+/ack/a")
            genuine = UpdateManifest.from_bytes((captured / "manifest.json").read_bytes())
            chunks = [(captured / f"{i}.chunk").read_bytes()
                      for i in range(genuine.payload.num_chunks)]  # fmt: skip
            publish_update(thief, genuine, chunks)  # the very same bytes, round 1
            r.replay_acks = acks_after(thief, 1, "replay on round 1")
            moved = dataclasses.replace(genuine, round=2, base_version=1)  # a's signature kept
            publish_update(thief, moved, chunks)
            r.replay_acks = acks_after(thief, 2, "replay on round 2")
            thief.close()
        finally:
            a.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        coord.stop()  # round 2 never completes: version 1 stays the newest
        yield r
    finally:
        for thing in reversed(started):
            if isinstance(thing, Coordinator):
                thing.stop()
            else:
                thing.kill()
        broker.stop()


def test_forged_update_is_rejected_and_not_counted(run: Run) -> None:
    [ack] = run.forged_acks
    assert (ack.round, ack.node, ack.status) == (1, "a", "rejected")
    assert "signature" in ack.reason
    assert "update of node a rejected: signature" in run.coord.log.read_text()


def test_three_node_round_completes_over_tls_with_the_kits(run: Run) -> None:
    doc = run.coord.status()
    assert doc["global_version"] == 1
    first = doc["rounds"][0]
    assert (first["round"], first["outcome"], first["version_out"]) == (1, "aggregated", 1)
    assert first["accepted"] == list(NODES) and first["counted"] == list(NODES)
    # the counted update of a is the genuine one (its nonce), once
    rows = run.coord.query("SELECT nonce, accepted FROM updates WHERE round = 1 AND node = 'a'")
    genuine = UpdateManifest.from_bytes((run.captured / "manifest.json").read_bytes())
    assert rows == [(genuine.nonce, 1)]
    for node in run.nodes.values():
        wait_for(lambda n=node: n.served() == "1", TIMEOUT, f"{node.node_id} on v1", run.logs)  # type: ignore[misc]
        log = node.log.read_text(errors="replace")
        assert "accepted without checking their signature" not in log
        assert "mqtts" in (node.folder / "node.toml").read_text()


def test_replayed_update_is_stale_or_rejected_and_not_counted(run: Run) -> None:
    stale, moved = run.replay_acks
    assert (stale.round, stale.status) == (1, "stale")
    assert (moved.round, moved.status) == (2, "rejected") and "signature" in moved.reason
    accepted = run.coord.query("SELECT round FROM updates WHERE node = 'a' AND accepted = 1")
    assert accepted == [(1,)]


def test_wrongly_signed_or_edited_global_manifest_is_refused_by_every_node(run: Run) -> None:
    for node in run.nodes.values():
        wait_for(lambda n=node: n.served() == "1", TIMEOUT, f"{node.node_id} on v1", run.logs)  # type: ignore[misc]
    spy = run.attacker("coordinator")  # the real coordinator has stopped: no session fight
    spy.subscribe(topics.global_current(F))
    assert spy.wait_for(lambda: bool(spy.messages), timeout=30)
    real = GlobalManifest.from_bytes(spy.messages[0][1])
    assert real.version == 1 and real.signature is not None
    key, _ = generate_keypair()
    forged = sign_manifest(dataclasses.replace(real, version=2), key, "coordinator")
    edited = dataclasses.replace(real, version=3)  # the coordinator's signature of version 1
    for count, manifest in enumerate((forged, edited), start=1):
        spy.publish(topics.global_current(F), manifest.to_bytes(), retain=True)
        for node in run.nodes.values():
            wait_for(lambda n=node, k=count: refusals(n) >= k, 60,  # type: ignore[misc]
                     f"{node.node_id} refusing v{manifest.version}", run.logs)  # fmt: skip
    spy.close()
    for node in run.nodes.values():
        assert node.served() == "1"
        uid = copy_with_new_uid(sample_path(CT_SAMPLE), node.inbox / "new" / "after.dcm")
        wait_for(lambda n=node, u=uid: n.predicted_version(u), 60, "prediction", run.logs)  # type: ignore[misc]
        assert node.predicted_version(uid) == "1"


def refusals(node: FedNode) -> int:
    return node.log.read_text(errors="replace").count("refused a global manifest")
