"""A predict-only node (no torch) follows the federation through the coordinator's ONNX export.

The scripted coordinator publishes real cnn2d weights plus the ONNX file the real coordinator
export function makes (``coordinator.onnx_artifact.export_global_onnx``: export + parity check),
signed; the node's compute refuses any job, so nothing here can have exported or trained on
the node's side. The served files are loaded with the node's real onnxruntime model class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest
import torch

from edge_node.federate.client import FederationClient
from edge_node.federate.model_sync import SyncState
from edge_node.serve.inference import OnnxModel
from edge_node.train.compute_service import ExportRequest, InProcessCompute
from edge_node.train.job import TrainJob, TrainResult
from fl_protocol import topics
from fl_protocol.metrics import Metrics
from fl_protocol.schemas import NodeStatus
from fl_protocol.transport import MemoryBroker
from tests.helpers.federation import FakeCoordinator, cnn2d_weights, node_config, onnx_export

FED = "fedtest"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class NoCompute:
    """A predict-only node's compute: any job is a failure of the test."""

    def train(self, job: TrainJob) -> TrainResult:
        raise AssertionError("a predict-only node trained")

    def evaluate(self, job: TrainJob) -> tuple[Metrics | None, int]:
        raise AssertionError("a predict-only node evaluated")

    def export(self, request: ExportRequest) -> Path:
        raise AssertionError("a predict-only node exported")

    def close(self) -> None:
        pass


class Swaps(list[tuple[Path, int]]):
    def __call__(self, path: Path, version: int) -> None:
        self.append((path, version))


def predict_only(root: Path, broker: MemoryBroker, swaps: Swaps) -> FederationClient:
    client = FederationClient(
        node_config(root, safety_margin=0.05),
        swaps,
        broker.transport("node-n1"),
        compute=NoCompute(),
        can_train=False,
    )
    client.connect()
    client.run_until_idle()
    return client


def test_each_global_version_is_installed_from_the_onnx_export(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """v0 then v1, each with its ONNX export: the node serves each file exactly as signed,
    keeps the previous one, holds no weights, says the safety gate cannot apply here, and
    reports the version it serves."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    exports = {v: onnx_export(cnn2d_weights(v), v, tmp_path / "coordinator") for v in (0, 1)}
    m0 = coord.publish_global(0, cnn2d_weights(0), onnx=exports[0])
    assert m0.onnx is not None and m0.schema_version() == 2
    swaps = Swaps()
    with caplog.at_level(logging.INFO):
        client = predict_only(tmp_path / "node", broker, swaps)
    models = tmp_path / "node" / "models"
    current = models / "current.onnx"
    assert swaps == [(current, 0)]
    assert current.read_bytes() == exports[0]
    assert hashlib.sha256(current.read_bytes()).hexdigest() == m0.onnx.sha256
    assert OnnxModel(current, 1).info.model_version == "0"
    assert "predict-only node" in caplog.text
    assert "safety gate: needs local evaluation" in caplog.text

    coord.publish_global(1, cnn2d_weights(1), onnx=exports[1])
    client.run_until_idle()
    assert swaps == [(current, 0), (current, 1)]
    assert OnnxModel(current, 1).info.model_version == "1"
    assert OnnxModel(models / "previous.onnx", 1).info.model_version == "0"
    assert not (models / "global.safetensors").exists()
    state = SyncState.load(tmp_path / "node" / "state" / "federation" / "sync.json")
    assert (state.installed_version, state.served_version) == (1, 1)
    status = NodeStatus.from_bytes(broker.retained[topics.node_status(FED, "n1")].payload)
    assert (status.model_version, status.capabilities) == (1, ("predict", "sync"))
    assert client.status()["pending_rounds"] == []  # nothing trained, nothing to send
    client.stop()


def test_an_onnx_export_that_names_another_version_is_never_served(tmp_path: Path) -> None:
    """Signed, hashes right, but the file's metadata says version 5 where the manifest says 1:
    refused, and version 0 keeps serving."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.publish_global(0, cnn2d_weights(0), onnx=onnx_export(cnn2d_weights(0), 0, tmp_path))
    swaps = Swaps()
    client = predict_only(tmp_path / "node", broker, swaps)
    wrong = onnx_export(cnn2d_weights(1), 5, tmp_path)
    coord.publish_global(1, cnn2d_weights(1), onnx=wrong)
    client.run_until_idle()
    assert [v for _, v in swaps] == [0]
    current = tmp_path / "node" / "models" / "current.onnx"
    assert OnnxModel(current, 1).info.model_version == "0"
    client.stop()


def test_a_tampered_onnx_chunk_is_refused_until_the_genuine_one_arrives(tmp_path: Path) -> None:
    """The ONNX chunks carry the same per-chunk SHA-256 checks as the weights."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED, chunk_size=16 * 1024)
    export = onnx_export(cnn2d_weights(0), 0, tmp_path)
    genuine = export[16 * 1024 : 32 * 1024]
    coord.publish_global(0, cnn2d_weights(0), onnx=export)
    topic = topics.global_onnx_chunk(FED, 0, 1)
    coord.t.publish(topic, b"\0" + genuine[1:], retain=True)  # overwrite chunk 1
    swaps = Swaps()
    client = predict_only(tmp_path / "node", broker, swaps)
    assert swaps == []
    coord.t.publish(topic, genuine, retain=True)
    client.run_until_idle()
    assert [v for _, v in swaps] == [0]
    client.stop()


def test_a_training_node_keeps_using_the_weights_and_exports_itself(tmp_path: Path) -> None:
    """With torch, the node takes the weights (what it trains from) and exports them with its
    own lung window, even when the manifest also carries the coordinator's ONNX file."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.publish_global(0, cnn2d_weights(0), onnx=onnx_export(cnn2d_weights(0), 0, tmp_path))
    config = node_config(tmp_path / "node")
    config = dataclasses.replace(
        config, preprocess=dataclasses.replace(config.preprocess, window_center=-500.0)
    )
    swaps = Swaps()
    client = FederationClient(
        config, swaps, broker.transport("node-n1"), compute=InProcessCompute(), can_train=True
    )
    client.connect()
    client.run_until_idle()
    models = tmp_path / "node" / "models"
    assert [v for _, v in swaps] == [0]
    assert (models / "global.safetensors").is_file()
    info = OnnxModel(models / "current.onnx", 1).info
    assert (info.model_version, info.window_center) == ("0", -500.0)  # its own export
    client.stop()
