"""The coordinator publishes each global version's ONNX export beside its weights.

A real cnn2d federation over MemoryTransport: version 0 from the torch zoo, the real export
function (export + parity check), a signing key, and one simulated node sending deltas of the
right shapes. What a predict-only node receives is read back from the broker's retained
messages and loaded with the node's onnxruntime model class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.config import CoordinatorConfig, ModelConfig, RoundsConfig
from coordinator.model_init import torch_model_source
from coordinator.onnx_artifact import export_global_onnx, torch_onnx_exporter
from coordinator.service import CoordinatorService
from edge_node.serve.inference import OnnxModel
from export.errors import ExportError
from fl_protocol import topics
from fl_protocol.chunking import Reassembler
from fl_protocol.schemas import GlobalManifest
from fl_protocol.signing import generate_keypair, save_private_key, verify_manifest
from fl_protocol.transport import MemoryBroker
from tests.coordinator.fakes import FEDERATION, FakeClock, FakeNode


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class CountingExporter:
    """The real exporter, counting its calls (a restart must not export again)."""

    def __init__(self) -> None:
        self.versions: list[int] = []

    def __call__(
        self,
        weights: Path,
        out: Path,
        version: int,
        center: float,
        width: float,
        extra: Mapping[str, str] | None,
    ) -> Path:
        self.versions.append(version)
        return torch_onnx_exporter(weights, out, version, center, width, extra)


def make_service(
    tmp_path: Path, broker: MemoryBroker, exporter: object, **model: object
) -> tuple[CoordinatorService, object]:
    private, public = generate_keypair()
    key = tmp_path / "coordinator.key"
    if not key.exists():
        save_private_key(private, key)
    cfg = CoordinatorConfig(
        state_dir=tmp_path / "state",
        federation=FEDERATION,
        signing_key=key,
        model=ModelConfig(arch="cnn2d", **model),  # type: ignore[arg-type]
        rounds=RoundsConfig(
            num_rounds=2, min_nodes=1, expected_nodes=("a",), round_timeout_s=60.0, codec="fp32"
        ),
    )
    service = CoordinatorService(
        cfg,
        broker.transport("coordinator"),
        model_source=torch_model_source,
        clock=FakeClock(),
        onnx_exporter=exporter,  # type: ignore[arg-type]
    )
    return service, public


def current(broker: MemoryBroker) -> GlobalManifest:
    return GlobalManifest.from_bytes(broker.retained[topics.global_current(FEDERATION)].payload)


def onnx_file(broker: MemoryBroker, manifest: GlobalManifest, out: Path) -> Path:
    """Reassemble the retained ONNX chunks the way a node does (hash-checked)."""
    assert manifest.onnx is not None
    r = Reassembler(manifest.onnx)
    for i in range(manifest.onnx.num_chunks):
        r.add(i, broker.retained[topics.global_onnx_chunk(FEDERATION, manifest.version, i)].payload)
    out.write_bytes(r.result())
    return out


def send_round(node: FakeNode, service: CoordinatorService) -> None:
    rng = np.random.default_rng(node.manifest.version)
    delta = {
        k: np.array(1.0, np.float32)
        if k.endswith("num_batches_tracked")
        else (0.001 * rng.normal(size=v.shape)).astype(np.float32)
        for k, v in node.global_weights().items()
    }
    node.send_update(delta, 10, chunk_size=64 * 1024)
    for _ in range(5):
        service.step()


def test_every_version_goes_out_with_a_signed_parity_checked_onnx_export(tmp_path: Path) -> None:
    """v0, v1, v2 each come with their ONNX file (schema version 2, signed over both
    artifacts); the file loads in onnxruntime and names its version; v0's ONNX chunks are
    cleared with its weights when it is retired; a restart publishes the same file again
    without exporting."""
    broker = MemoryBroker()
    node = FakeNode(broker.transport("node-a"), "a").connect()
    exporter = CountingExporter()
    service, public = make_service(tmp_path, broker, exporter)
    service.start()
    for version in (0, 1, 2):
        m = current(broker)
        assert m.version == version and m.schema_version() == 2
        verify_manifest(m, public)  # type: ignore[arg-type]
        info = OnnxModel(onnx_file(broker, m, tmp_path / f"got{version}.onnx"), 1).info
        assert (info.model_version, info.arch, info.window_center) == (str(version), "cnn2d", -600)
        assert (info.texture_dim, info.init) == (0, f"global-{version}.safetensors")
        if version < 2:
            send_round(node, service)
    assert exporter.versions == [0, 1, 2]
    assert service.done and current(broker).round is None
    onnx_versions = {topics.parse_topic(t).version for t in broker.retained if "/onnx/" in t}
    assert onnx_versions == {1, 2}  # v0 retired: its ONNX chunks cleared too
    published = (tmp_path / "state" / "checkpoints" / "global_v2.onnx").read_bytes()
    service.close()

    restarted, _ = make_service(tmp_path, broker, exporter)
    restarted.start()  # all rounds done: publishes v2 again
    assert exporter.versions == [0, 1, 2]  # not exported again
    m = current(broker)
    assert (
        m.version == 2 and onnx_file(broker, m, tmp_path / "again.onnx").read_bytes() == published
    )
    restarted.close()


def test_a_version_that_cannot_be_exported_goes_out_without_onnx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No torch on the coordinator (the exporter's import fails): the weights still go out
    in a version-1 manifest, and the log says who can and cannot follow."""

    def no_torch(*_args: object) -> Path:
        raise ImportError("No module named 'torch'")

    broker = MemoryBroker()
    service, _ = make_service(tmp_path, broker, no_torch)
    with caplog.at_level(logging.ERROR):
        service.start()
    m = current(broker)
    assert m.version == 0 and m.onnx is None and m.schema_version() == 1
    assert "global v0: no ONNX export" in caplog.text and "'train' extra" in caplog.text
    assert not any("/onnx/" in t for t in broker.retained)
    service.close()


def test_publish_onnx_false_publishes_weights_only(tmp_path: Path) -> None:
    """``[model] publish_onnx = false``: no export at all."""
    broker = MemoryBroker()
    exporter = CountingExporter()
    service, _ = make_service(tmp_path, broker, exporter, publish_onnx=False)
    service.start()
    assert current(broker).onnx is None and exporter.versions == []
    service.close()


def test_extra_metadata_goes_into_the_export_and_may_not_replace_its_own(tmp_path: Path) -> None:
    """The one export function takes extra metadata (e.g. a fitted threshold), refuses to
    overwrite the keys it writes itself, and leaves no file behind when it refuses."""
    from export import weights as export_weights
    from export import zoo

    model = zoo.create_model("cnn2d")
    src = export_weights.save_weights(model, tmp_path / "w.safetensors", version=4)
    out = export_global_onnx(
        src, tmp_path / "m.onnx", model_version=4, extra_metadata={"fedscan.threshold": "0.4"}
    )
    info = OnnxModel(out, 1).info
    assert (info.model_version, info.threshold) == ("4", 0.4)
    with pytest.raises(ExportError, match="may not replace"):
        export_global_onnx(
            src, tmp_path / "n.onnx", model_version=4, extra_metadata={"fedscan.model_version": "9"}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "w.safetensors"]


def test_window_from_the_config_is_written_into_the_onnx(tmp_path: Path) -> None:
    """``[model] window_center / window_width`` end up in the published file's metadata."""
    broker = MemoryBroker()
    service, _ = make_service(
        tmp_path, broker, torch_onnx_exporter, window_center=-500.0, window_width=1200.0
    )
    service.start()
    info = OnnxModel(onnx_file(broker, current(broker), tmp_path / "w.onnx"), 1).info
    assert (info.window_center, info.window_width) == (-500.0, 1200.0)
    service.close()
