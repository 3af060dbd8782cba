"""Federated rounds with real processes: `fedscan coordinator run` and `fedscan node run` daemons
with ``[federation] enabled``, each with a small labelled inbox of real CT DICOM, over a real
broker (Mosquitto, then the embedded one).

- Three nodes complete two rounds of cnn2d (one local epoch): each installs v0, v1 and v2 from
  the broker (export to ONNX, atomic swap), evaluates, trains and sends its delta; a new slice
  dropped into each inbox afterwards is predicted by global model v2 (node SQLite + API).
- A node SIGKILLed while its round-1 update is not yet acknowledged (the coordinator is paused
  with SIGSTOP so no ack can come) resends the stored update after its restart, without
  training again, and is counted once.
- On the embedded broker, a node that was offline for both rounds catches up with v2 when it
  comes back.

The coordinator's version 0 is made here with the real cnn2d (so its process needs no torch);
the nodes export and train in their low-priority compute worker.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.service import read_broker_port
from fedscan.brokers.mosquitto import Mosquitto
from fl_protocol.signing import generate_keypair, save_private_key, save_public_key
from tests.helpers.dicom_factory import CT_SAMPLE, copy_with_new_uid, sample_path
from tests.helpers.wait import wait_for
from tests.integration.federation_harness import (
    TIMEOUT,
    Coordinator,
    FedNode,
    write_coordinator,
)

pytestmark = pytest.mark.integration


# -- coordinator ---------------------------------------------------------------------------------


def make_keys(keys: Path, nodes: str) -> None:
    """Ed25519 keys as a provisioning kit lays them out: the coordinator's pair, each node's
    pair, and the coordinator's trusted ``nodes/<id>.pub``."""
    (keys / "nodes").mkdir(parents=True, exist_ok=True)
    for name in ("coordinator", *nodes):
        private, public = generate_keypair()
        save_private_key(private, keys / f"{name}.key")
        save_public_key(public, keys / f"{name}.pub")
        if name != "coordinator":
            save_public_key(public, keys / "nodes" / f"{name}.pub")


# -- nodes ---------------------------------------------------------------------------------------


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Everything started by a test is stopped, even when it fails."""
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        if isinstance(thing, Coordinator):
            thing.stop()
        else:
            thing.kill()


def logs_of(coord: Coordinator, nodes: dict[str, FedNode]) -> tuple[Path, ...]:
    return (coord.log, *(n.log for n in nodes.values()))


def check_rounds(coord: Coordinator, nodes: str) -> dict[str, Any]:
    doc = coord.status()
    assert doc["global_version"] == 2
    rounds = doc["rounds"]
    assert [(r["round"], r["outcome"], r["version_out"]) for r in rounds] == [
        (1, "aggregated", 1),
        (2, "aggregated", 2),
    ]
    for r in rounds:
        assert r["accepted"] == sorted(nodes) and r["counted"] == sorted(nodes)
        assert r["rejected"] == {}
        assert sorted(r["metrics"]) == sorted(nodes)  # every node evaluated the global model
    return doc


def check_serves_v2(node: FedNode, first_version: str = "0") -> None:
    """A slice dropped into the inbox now is predicted by global model v2; the labelled slices
    were predicted by the first model the node received."""
    uid = copy_with_new_uid(sample_path(CT_SAMPLE), node.inbox / "new" / "after.dcm")
    wait_for(lambda: node.predicted_version(uid), 60, f"{node.node_id} prediction", (node.log,))
    assert node.predicted_version(uid) == "2"
    assert node.predicted_version(node.uids[0]) == first_version


def test_three_nodes_complete_two_rounds_on_mosquitto_and_a_killed_node_counts_once(
    tmp_path: Path, mosquitto: Mosquitto, cleanup: list[Any]
) -> None:
    """Signed both ways: the coordinator signs global manifests (nodes verify them), each node
    signs its updates (the coordinator trusts only the nodes' provisioned keys)."""
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    keys = tmp_path / "keys"
    make_keys(keys, "abc")
    coord = Coordinator(write_coordinator(tmp_path / "coordinator", url, "abc", keys))
    nodes = {n: FedNode(tmp_path / n, n, url, keys) for n in "abc"}
    logs = logs_of(coord, nodes)
    cleanup.append(coord.start())
    for node in nodes.values():
        cleanup.append(node.start())

    # Round 1 is published: pause the coordinator so no update can be acknowledged, and kill
    # node b as soon as its update is stored (it may or may not have published it yet).
    wait_for(lambda: coord.round_status(1) == "collecting", TIMEOUT, "round 1", logs)
    coord.signal(signal.SIGSTOP)
    b = nodes["b"]
    wait_for(lambda: b.outbox_rounds() == ["round-1"], TIMEOUT, "b's round-1 update", logs)
    b.kill()
    coord.signal(signal.SIGCONT)
    b.start()

    for node in nodes.values():
        wait_for(lambda n=node: n.served() == "2", TIMEOUT, f"{node.node_id} on v2", logs)  # type: ignore[misc]
    assert coord.proc is not None
    assert coord.proc.wait(60) == 0
    check_rounds(coord, "abc")
    log_b = b.log.read_text(errors="replace")
    assert log_b.count("round 1: training from global model 0") == 1  # not trained again
    assert b.outbox_rounds() == []
    for node in nodes.values():
        check_serves_v2(node)
        assert "accepted without checking their signature" not in node.log.read_text()
        assert node.terminate() == 0


def test_two_rounds_on_the_embedded_broker_and_an_offline_node_catches_up(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    coord = Coordinator(write_coordinator(tmp_path / "coordinator", None, "ab", eval_wait_s=120))
    cleanup.append(coord.start())
    port = wait_for(lambda: read_broker_port(coord.state_dir), 60, "embedded broker",
                    (coord.log,))  # fmt: skip
    url = f"mqtt://127.0.0.1:{port}"
    nodes = {n: FedNode(tmp_path / n, n, url) for n in "abc"}
    logs = logs_of(coord, nodes)
    for name in "ab":
        cleanup.append(nodes[name].start())
    for name in "ab":
        node = nodes[name]
        wait_for(lambda n=node: n.served() == "2", TIMEOUT, f"{name} on v2", logs)  # type: ignore[misc]
    check_rounds(coord, "ab")

    late = nodes["c"]  # offline for both rounds; comes back to global model v2
    cleanup.append(late.start())
    wait_for(lambda: late.served() == "2", TIMEOUT, "c catching up with v2", logs)
    assert late.outbox_rounds() == []  # no round open: nothing trained, nothing sent
    for name, node in nodes.items():
        check_serves_v2(node, "2" if name == "c" else "0")
        assert node.terminate() == 0
