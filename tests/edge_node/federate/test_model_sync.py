"""Receiving global models: fetch, verify (hash, signature, no rollback), export, gate, swap.

Every test runs the real federation client over the in-process MQTT broker against a scripted
coordinator that publishes real cnn2d weights; the ONNX export is the real one and the served
file is loaded with the node's real onnxruntime model class.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_node.federate.client import FederationClient
from edge_node.federate.model_sync import rollback
from edge_node.ingest.preprocess import patient_key
from edge_node.serve.inference import OnnxModel
from edge_node.train.compute_service import InProcessCompute
from edge_node.train.split import VAL, side_of
from export.weights import weights_version
from fl_protocol import topics
from fl_protocol.schemas import NodeStatus
from fl_protocol.signing import generate_keypair, save_public_key
from fl_protocol.transport import MemoryBroker
from tests.helpers.federation import FakeCoordinator, cnn2d_weights, node_config
from tests.helpers.training import LabelledNode, make_labelled_node

FED = "fedtest"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Swaps(list[tuple[Path, int]]):
    def __call__(self, path: Path, version: int) -> None:
        self.append((path, version))


def make_client(root: Path, broker: MemoryBroker, swaps: Swaps, **fed: Any) -> FederationClient:
    config = node_config(root, federation=str(fed.pop("federation", FED)), **fed)
    client = FederationClient(
        config, swaps, broker.transport("node-n1"), compute=InProcessCompute(), can_train=True
    )
    client.connect()
    client.run_until_idle()
    return client


def served_version(root: Path) -> str:
    return OnnxModel(root / "models" / "current.onnx", 1).info.model_version


def test_a_training_node_serves_the_operating_point_named_in_the_manifest(
    tmp_path: Path,
) -> None:
    """A training node exports the global weights itself; the coordinator's fitted operating
    point from the manifest goes into that export, so it serves the same calibrated verdicts
    as a predict-only node (v0 has none: served at T = 1, threshold 0.5)."""
    from fl_protocol.schemas import ServingPoint

    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.publish_global(0, cnn2d_weights(0))
    make_client(tmp_path, broker, Swaps())
    info = OnnxModel(tmp_path / "models" / "current.onnx", 1).info
    assert (info.calibrated, info.temperature, info.threshold) == (False, 1.0, 0.5)

    point = ServingPoint(
        temperature=2.5, threshold=0.37, uncertain_band=0.12, n_val=64, calibration_version=0
    )
    client = make_client(tmp_path / "b", broker, Swaps())
    coord.publish_global(1, cnn2d_weights(1), operating_point=point)
    client.run_until_idle()
    info = OnnxModel(tmp_path / "b" / "models" / "current.onnx", 1).info
    assert info.model_version == "1" and info.calibrated
    assert (info.temperature, info.threshold, info.uncertain_band) == (2.5, 0.37, 0.12)


def test_a_newer_global_model_is_exported_and_swapped_in_keeping_the_previous(
    tmp_path: Path,
) -> None:
    """The coordinator publishes v0, then v1; the node serves each, keeps the previous file."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.publish_global(0, cnn2d_weights(0))
    swaps = Swaps()
    client = make_client(tmp_path, broker, swaps)
    current = tmp_path / "models" / "current.onnx"
    assert swaps == [(current, 0)]
    assert served_version(tmp_path) == "0"
    assert weights_version(tmp_path / "models" / "global.safetensors") == "0"
    status = NodeStatus.from_bytes(broker.retained[topics.node_status(FED, "n1")].payload)
    assert (status.state, status.model_version) == ("online", 0)

    coord.publish_global(1, cnn2d_weights(1))
    client.run_until_idle()
    assert swaps == [(current, 0), (current, 1)]
    assert served_version(tmp_path) == "1"
    previous = OnnxModel(tmp_path / "models" / "previous.onnx", 1).info.model_version
    assert previous == "0"
    status = NodeStatus.from_bytes(broker.retained[topics.node_status(FED, "n1")].payload)
    assert status.model_version == 1

    rollback(client.config)
    assert served_version(tmp_path) == "0"
    client.stop()


def test_an_older_version_is_refused_even_after_a_restart(tmp_path: Path) -> None:
    """A rolled-back manifest (v1 after v2) is ignored, by this process and the next one."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.publish_global(2, cnn2d_weights(2))
    swaps = Swaps()
    client = make_client(tmp_path, broker, swaps)
    coord.publish_global(1, cnn2d_weights(1))
    client.run_until_idle()
    assert [v for _, v in swaps] == [2]
    client.stop()

    again = Swaps()
    restarted = make_client(tmp_path, broker, again)  # the retained manifest is v1
    assert again == [] and served_version(tmp_path) == "2"
    restarted.stop()


def test_only_models_signed_by_the_coordinator_key_are_used(tmp_path: Path) -> None:
    """With a coordinator key configured: unsigned, foreign-signed and altered manifests are
    refused and the served model stays; a properly signed one is accepted."""
    key, pub = generate_keypair()
    other, _ = generate_keypair()
    save_public_key(pub, tmp_path / "coordinator.pub")
    broker = MemoryBroker()
    swaps = Swaps()
    client = make_client(
        tmp_path, broker, swaps, coordinator_public_key=str(tmp_path / "coordinator.pub")
    )
    signed_ok = FakeCoordinator(broker, FED, key=key)
    signed_ok.publish_global(0, cnn2d_weights(0))
    client.run_until_idle()
    assert [v for _, v in swaps] == [0]

    FakeCoordinator(broker, FED, key=None, client_id="x1").publish_global(1, cnn2d_weights(1))
    client.run_until_idle()
    forged = FakeCoordinator(broker, FED, key=other, client_id="x2")
    forged.publish_global(2, cnn2d_weights(2))  # signed with another key
    client.run_until_idle()
    signed_ok.publish_global(  # signed, then its version changed in transit
        3, cnn2d_weights(3), mutate=lambda m: dataclasses.replace(m, version=4)
    )
    client.run_until_idle()
    assert [v for _, v in swaps] == [0]
    assert served_version(tmp_path) == "0"

    signed_ok.publish_global(5, cnn2d_weights(5))
    client.run_until_idle()
    assert [v for _, v in swaps] == [0, 5]
    client.stop()


def test_a_tampered_chunk_is_refused_until_the_genuine_one_arrives(tmp_path: Path) -> None:
    """A chunk that does not match its manifest hash is dropped; the model stays unchanged."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    weights = cnn2d_weights(7)
    genuine: dict[int, bytes] = {}

    def corrupt(i: int, data: bytes) -> bytes:
        genuine[i] = data
        return data if i != 1 else data[:-1] + bytes([data[-1] ^ 0xFF])

    manifest = coord.publish_global(0, weights, chunk_filter=corrupt)
    assert manifest.payload.num_chunks >= 2
    swaps = Swaps()
    client = make_client(tmp_path, broker, swaps)
    assert swaps == [] and not (tmp_path / "models" / "current.onnx").exists()
    assert client.sync.missing_chunks() == [1]

    coord.publish_chunk(0, 1, genuine[1])
    client.run_until_idle()
    assert [v for _, v in swaps] == [0]
    client.stop()


def test_a_download_resumes_from_the_spool_after_a_restart(tmp_path: Path) -> None:
    """Chunks received before a restart are not fetched again: the broker no longer has them
    and the model still completes with the one chunk sent after the restart."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    weights = cnn2d_weights(3)
    last: dict[int, bytes] = {}

    def hold_back_last(i: int, data: bytes) -> bytes | None:
        last[i] = data
        return None if i == 2 else data

    manifest = coord.publish_global(0, weights, chunk_filter=hold_back_last)
    assert manifest.payload.num_chunks == 3
    swaps = Swaps()
    client = make_client(tmp_path, broker, swaps)
    assert client.sync.missing_chunks() == [2]
    client.stop()
    spool = tmp_path / "state" / "federation" / "global-spool"
    assert sorted(p.name for p in spool.glob("*.chunk")) == ["0.chunk", "1.chunk"]

    for i in (0, 1):  # gone from the broker
        coord.publish_chunk(0, i, b"")
    coord.publish_chunk(0, 2, last[2])
    restarted = make_client(tmp_path, broker, swaps)
    assert [v for _, v in swaps] == [0]
    assert served_version(tmp_path) == "0"
    restarted.stop()


def test_weights_that_do_not_fit_the_architecture_are_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A verified payload with wrong shapes fails at export: logged, old model kept."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.publish_global(0, cnn2d_weights(0))
    swaps = Swaps()
    client = make_client(tmp_path, broker, swaps)
    bad = {k: np.zeros((3,), np.float32) if k == "head.weight" else v
           for k, v in cnn2d_weights(1).items()}  # fmt: skip
    with caplog.at_level(logging.ERROR):
        coord.publish_global(1, bad)
        client.run_until_idle()
    assert "global model 1 not installed" in caplog.text
    assert [v for _, v in swaps] == [0] and served_version(tmp_path) == "0"
    coord.publish_global(2, cnn2d_weights(2))
    client.run_until_idle()
    assert [v for _, v in swaps] == [0, 2]
    client.stop()


def test_without_the_train_extra_a_model_without_onnx_export_is_not_followed_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A predict-only install cannot export weights: a manifest without the coordinator's ONNX
    export (an older coordinator) is logged once and nothing is served; the node stays online
    and does not advertise training (federate/test_model_sync_onnx.py: with ONNX)."""
    broker = MemoryBroker()
    FakeCoordinator(broker, FED).publish_global(0, cnn2d_weights(0))
    swaps = Swaps()
    client = FederationClient(
        node_config(tmp_path), swaps, broker.transport("node-n1"), can_train=False
    )
    with caplog.at_level(logging.ERROR):
        client.connect()
        client.run_until_idle()
    assert caplog.text.count("global model 0 comes without an ONNX export") == 1
    assert swaps == []
    status = NodeStatus.from_bytes(broker.retained[topics.node_status(FED, "n1")].payload)
    assert status.capabilities == ("predict", "sync")
    client.stop()


# -- safety gate -------------------------------------------------------------------------------

VAL_FRACTION = 0.35


def unbalanced_salt(node: LabelledNode) -> tuple[str, int]:
    """A split salt whose validation side holds both classes in unequal numbers; returns it
    with the majority class id (so constant predictors have distinct, known accuracies)."""
    for i in range(1000):
        salt = f"gate-{i}"
        counts = [0, 0]
        for p, pid in enumerate(node.patients):
            if side_of(patient_key(pid), salt=salt, val_fraction=VAL_FRACTION) == VAL:
                counts[p % 2] += 1  # odd patients are covid (train_helpers)
        if min(counts) >= 1 and counts[0] != counts[1]:
            return salt, int(counts[1] > counts[0])
    raise RuntimeError("no unbalanced salt")


def constant_model(class_id: int) -> dict[str, np.ndarray]:
    """cnn2d weights whose head always predicts ``class_id``."""
    w = cnn2d_weights(0)
    w["head.weight"] = np.zeros_like(w["head.weight"])
    bias = np.zeros_like(w["head.bias"])
    bias[class_id] = 1.0
    w["head.bias"] = bias
    return w


def test_safety_gate_keeps_serving_the_better_model_but_trains_from_the_new_one(
    tmp_path: Path,
) -> None:
    """With a margin, a global model less accurate on the node's own validation slices is
    refused for serving (and reported), while local training starts from it."""
    node = make_labelled_node(tmp_path, n_patients=10, slices_per_patient=1)
    salt, majority = unbalanced_salt(node)
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, salt)
    coord.publish_global(0, constant_model(majority))
    swaps = Swaps()
    client = make_client(tmp_path, broker, swaps, federation=salt, safety_margin=0.05)
    assert [v for _, v in swaps] == [0]

    coord.publish_global(1, constant_model(1 - majority))
    client.run_until_idle()
    assert [v for _, v in swaps] == [0]
    assert served_version(tmp_path) == "0"
    assert weights_version(tmp_path / "models" / "global.safetensors") == "1"
    state = client.sync.state
    assert state.refused_version == 1 and state.installed_version == 1
    assert state.refused_accuracy is not None and state.served_accuracy is not None
    assert state.refused_accuracy < state.served_accuracy
    status = NodeStatus.from_bytes(broker.retained[topics.node_status(salt, "n1")].payload)
    assert status.model_version == 0 and "safety_gate" in status.capabilities

    coord.publish_global(2, constant_model(majority))  # as good as the served one: accepted
    client.run_until_idle()
    assert [v for _, v in swaps] == [0, 2]
    client.stop()
