"""`fedscan node sync` / `rollback` over a real MQTT socket (the in-process embedded broker).

A coordinator-side PahoTransport publishes global model v3 retained (chunks + signed manifest);
``sync_once`` connects with its own client id, verifies, exports and installs it, publishes
nothing, and exits; ``rollback`` then serves the previous file again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_node.cli.global_model import sync_once
from edge_node.federate.model_sync import rollback
from edge_node.serve.inference import OnnxModel
from fl_protocol import topics
from fl_protocol.broker import EmbeddedBroker
from fl_protocol.chunking import split
from fl_protocol.schemas import GlobalManifest
from fl_protocol.signing import generate_keypair, save_public_key, sign_manifest
from fl_protocol.transport import MqttSettings, PahoTransport
from tests.helpers.federation import cnn2d_weights, node_config, weights_payload

FED = "fedsync"


def publish(t: PahoTransport, version: int, key: Ed25519PrivateKey) -> None:
    payload, chunks = split(weights_payload(cnn2d_weights(version), version), 64 * 1024)
    for i, chunk in enumerate(chunks):
        t.publish(topics.global_chunk(FED, version, i), chunk, retain=True)
    manifest = GlobalManifest(FED, version, "cnn2d", 0, payload)
    signed = sign_manifest(manifest, key, "coordinator")
    t.publish(topics.global_current(FED), signed.to_bytes(), retain=True)


def test_sync_installs_the_current_global_model_and_rollback_restores_the_previous(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    key, pub = generate_keypair()
    save_public_key(pub, tmp_path / "coordinator.pub")
    with EmbeddedBroker() as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        config = node_config(
            tmp_path, federation=FED, broker=url,
            coordinator_public_key=str(tmp_path / "coordinator.pub"),
        )  # fmt: skip
        coordinator = PahoTransport(MqttSettings(port=broker.port, client_id="coordinator"))
        coordinator.connect()
        seen: list[str] = []
        coordinator.subscribe(f"fl/{FED}/#", lambda m: seen.append(m.topic))
        try:
            publish(coordinator, 3, key)
            status = sync_once(config, timeout_s=120)
            assert (status["installed_version"], status["served_version"]) == (3, 3)
            publish(coordinator, 4, key)
            sync_once(config, timeout_s=120)
        finally:
            coordinator.disconnect()
    current = tmp_path / "models" / "current.onnx"
    assert OnnxModel(current, 1).info.model_version == "4"
    assert not any("/node/" in t or "/round/" in t for t in seen)  # sync publishes nothing
    rollback(config)
    assert OnnxModel(current, 1).info.model_version == "3"
