"""A federation node fails closed without the coordinator's key (issue 14): a node with
federation enabled and no ``coordinator_public_key`` used to serve any global model a local user
of the broker published (an unsigned v99, a foreign-signed v100: always non_covid, confidence
1.0), then refused the real v2 as "older". Now such a config does not start, `node init` writes
the key line, and with the key the forged versions never block the real one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_node.cli.daemon import init_node
from edge_node.config import load_config
from edge_node.errors import ConfigError
from fl_protocol.signing import generate_keypair, save_public_key
from fl_protocol.transport import MemoryBroker
from tests.helpers.federation import FakeCoordinator, cnn2d_weights, node_config

REPO = Path(__file__).resolve().parents[3]
FED = "fedtest"


def enable(toml: Path) -> None:
    toml.write_text(toml.read_text().replace("enabled = false", "enabled = true"))


def test_federation_without_the_coordinator_key_does_not_start(tmp_path: Path) -> None:
    """`node init` writes coordinator_public_key; enabling the federation without that file,
    or without the line, is a config error (exit 2, one line, no traceback) from `node run`."""
    toml = init_node(tmp_path / "n")
    text = toml.read_text()
    assert 'coordinator_public_key = "keys/coordinator.pub"' in text
    load_config(toml)  # federation off: the key is not needed yet
    enable(toml)
    with pytest.raises(ConfigError, match=r"coordinator_public_key .* not found"):
        load_config(toml)
    toml.write_text(toml.read_text().replace('coordinator_public_key = "keys/coordinator.pub"', ""))
    with pytest.raises(ConfigError, match="enabled needs coordinator_public_key"):
        load_config(toml)
    run = subprocess.run(
        [sys.executable, "-m", "fedscan.cli", "node", "run", "--config", str(toml)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "coordinator_public_key" in run.stderr and "Traceback" not in run.stderr
    toml.write_text(text)
    enable(toml)
    (toml.parent / "keys").mkdir()
    save_public_key(generate_keypair()[1], toml.parent / "keys" / "coordinator.pub")
    cfg = load_config(toml)
    assert cfg.federation.coordinator_public_key == toml.parent / "keys" / "coordinator.pub"


def test_forged_global_versions_on_the_broker_do_not_block_the_real_one(tmp_path: Path) -> None:
    """Any client of the broker publishes an unsigned v99, then a v100 signed with its own key;
    the node (keyed) installs neither, and the coordinator's real v2 is installed and served
    afterwards (not refused as older)."""
    import torch

    from edge_node.federate.client import FederationClient
    from edge_node.serve.inference import OnnxModel
    from edge_node.train.compute_service import InProcessCompute

    torch.set_num_threads(1)
    key, pub = generate_keypair()
    save_public_key(pub, tmp_path / "coordinator.pub")
    broker = MemoryBroker()
    swaps: list[int] = []
    config = node_config(
        tmp_path, federation=FED, coordinator_public_key=str(tmp_path / "coordinator.pub")
    )
    client = FederationClient(
        config,
        lambda _path, version: swaps.append(version),
        broker.transport("node-n1"),
        compute=InProcessCompute(),
        can_train=True,  # exports the received weights itself
    )
    client.connect()
    try:
        FakeCoordinator(broker, FED, key=None, client_id="local-user").publish_global(
            99, cnn2d_weights(99)
        )
        client.run_until_idle()
        rogue = FakeCoordinator(broker, FED, key=generate_keypair()[0], client_id="rogue")
        rogue.publish_global(100, cnn2d_weights(100))
        client.run_until_idle()
        assert swaps == [] and not (tmp_path / "models" / "current.onnx").exists()
        FakeCoordinator(broker, FED, key=key).publish_global(2, cnn2d_weights(2))
        client.run_until_idle()
        assert swaps == [2]
        served = OnnxModel(tmp_path / "models" / "current.onnx", 1).info.model_version
        assert served == "2"
    finally:
        client.stop()
