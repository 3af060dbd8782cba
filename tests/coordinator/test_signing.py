"""Signatures: the coordinator signs global manifests; with trusted node keys configured, only
updates signed by the node's own, unrevoked key count."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.errors import ConfigError
from coordinator.service import CoordinatorService
from coordinator.trust import key_fingerprint
from fl_protocol.signing import (
    generate_keypair,
    save_private_key,
    save_public_key,
    sign_manifest,
    verify_manifest,
)
from fl_protocol.transport import MemoryBroker
from tests.coordinator.fakes import FakeClock, FakeNode, make_delta, tiny_source
from tests.coordinator.world import make_cfg


def test_signed_manifests_and_trusted_node_keys(tmp_path: Path) -> None:
    """a signs with its key (accepted), b is revoked, c signs with a key that is not its
    trusted one, d has no trusted key and does not sign: three refusals, reason signature."""
    keys = tmp_path / "keys"
    (keys / "nodes").mkdir(parents=True)
    coord_key, coord_pub = generate_keypair()
    save_private_key(coord_key, keys / "signing.key")
    node_keys = {}
    for name in "abc":
        private, public = generate_keypair()
        node_keys[name] = private
        save_public_key(public, keys / "nodes" / f"{name}.pub")
    impostor, _ = generate_keypair()
    revoked = {"nodes": {"b": {"signing_key_sha256": key_fingerprint(keys / "nodes" / "b.pub")}}}
    (keys / "revoked.json").write_text(json.dumps(revoked))
    cfg = dataclasses.replace(
        make_cfg(tmp_path, expected_nodes=(), num_rounds=1),
        signing_key=keys / "signing.key",
        node_keys_dir=keys / "nodes",
        revoked_file=keys / "revoked.json",
    )
    broker = MemoryBroker()
    nodes = {n: FakeNode(broker.transport(f"node-{n}"), n).connect() for n in "abcd"}
    service = CoordinatorService(
        cfg, broker.transport("coordinator"), model_source=tiny_source, clock=FakeClock()
    )
    service.start()
    manifest = nodes["a"].manifest
    verify_manifest(manifest, coord_pub)
    assert manifest.key_id == "coordinator"

    nodes["a"].signer = lambda m: sign_manifest(m, node_keys["a"], "a")
    nodes["b"].signer = lambda m: sign_manifest(m, node_keys["b"], "b")
    nodes["c"].signer = lambda m: sign_manifest(m, impostor, "c")
    for i, node in enumerate(nodes.values()):
        node.send_update(make_delta(i), 5)
    for _ in range(3):
        service.step()
    assert nodes["a"].last_ack(1).status == "complete"  # type: ignore[union-attr]
    for name, why in (("b", "revoked"), ("c", "does not verify"), ("d", "no trusted")):
        ack = nodes[name].last_ack(1)
        assert ack is not None and ack.status == "rejected"
        assert ack.reason.startswith("signature") and why in ack.reason
    assert [u.node for u in service.state.updates(1, accepted=True)] == ["a"]


def test_revoked_file_needs_node_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node_keys_dir"):
        CoordinatorConfig(state_dir=tmp_path, revoked_file=tmp_path / "r.json")
