"""The coordinator sums the nodes' calibration statistics per version and fits the operating
point that the next version's ONNX export carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.calibration import CalibrationBook
from coordinator.reports import store_eval_report
from coordinator.state import State
from edge_node.federate.update_sender import eval_report
from fl_protocol.calibration import calibration_stats, combine, fit_operating_point
from fl_protocol.metrics import classification_metrics
from fl_protocol.schemas import EvalReport
from fl_protocol.topics import eval_report as eval_topic
from fl_protocol.topics import parse_topic


def _node_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    z = 3.0 * (np.where(y == 1, 0.5, -1.5) + rng.normal(0, 1.0, size=n))  # overconfident
    return np.stack([np.zeros(n), z], axis=1), y


def test_reports_from_three_nodes_give_the_pooled_operating_point(tmp_path: Path) -> None:
    """Three nodes report v2 with statistics (one old-style v1 report without): the book's fit
    equals the fit on the pooled slices, and version 3's ONNX metadata names v2."""
    state = State(tmp_path / "coord")
    parts = []
    for k, n in enumerate((40, 70, 25)):
        logits, y = _node_data(k, n)
        stats = calibration_stats(logits, y)
        parts.append(stats)
        m = classification_metrics(y, logits.argmax(1), 1 / (1 + np.exp(-logits[:, 1])))
        report = eval_report(3, f"node-{k}", 2, m, stats.to_dict())
        assert report.to_dict()["schema"] == "fedscan.eval_report/2"
        wire = EvalReport.from_bytes(report.to_bytes())
        info = parse_topic(eval_topic("fed", 3, f"node-{k}"))
        assert store_eval_report(state, info, wire.to_bytes()) is not None
    logits, y = _node_data(9, 30)
    m = classification_metrics(y, logits.argmax(1), None)
    old = eval_report(3, "node-old", 2, m)
    assert old.to_dict()["schema"] == "fedscan.eval_report/1"
    store_eval_report(state, parse_topic(eval_topic("fed", 3, "node-old")), old.to_bytes())

    book = CalibrationBook(state.dir)
    pooled = combine(parts)
    assert pooled is not None
    assert book.stats(2) == pooled
    expected = fit_operating_point(pooled)
    assert book.operating_point(2) == expected and expected is not None
    assert expected.temperature > 1.5  # the nodes' models were overconfident
    meta = book.metadata_for(3)
    assert meta is not None
    assert meta["fedscan.calibration_version"] == "2"
    assert float(meta["fedscan.threshold"]) == float(f"{expected.threshold:.6g}")
    assert book.metadata_for(2) is None  # nothing earlier than v2 was reported


def test_onnx_artifacts_export_with_the_fitted_point(tmp_path: Path) -> None:
    """The coordinator's ONNX artifacts ask the book by default: version 1's export gets the
    operating point fitted from the nodes' reports on version 0."""
    from coordinator.onnx_artifact import OnnxArtifacts

    state = State(tmp_path / "coord")
    logits, y = _node_data(5, 80)
    m = classification_metrics(y, logits.argmax(1), None)
    report = eval_report(1, "node-a", 0, m, calibration_stats(logits, y).to_dict())
    store_eval_report(state, parse_topic(eval_topic("fed", 1, "node-a")), report.to_bytes())
    seen: dict[int, object] = {}

    def exporter(weights, out, version, center, width, extra):  # type: ignore[no-untyped-def]
        seen[version] = extra
        out.write_bytes(b"onnx")
        return out

    artifacts = OnnxArtifacts(state, exporter=exporter)
    assert artifacts.ensure(1) is not None
    extra = seen[1]
    assert isinstance(extra, dict) and extra["fedscan.calibration_version"] == "0"
    assert 0 < float(extra["fedscan.threshold"]) < 1


def test_the_manifest_repeats_the_operating_point_of_the_real_onnx_export(
    tmp_path: Path,
) -> None:
    """A real ONNX export of a checkpoint, with the point fitted from a node's report: the
    artifact's ``serving_point`` reads it back from the file's metadata and the publisher's
    manifest carries it (training nodes write it into their own export)."""
    import torch

    from coordinator.onnx_artifact import OnnxArtifacts
    from coordinator.publisher import ModelIdentity, Publisher
    from export.weights import save_weights
    from export.zoo import create_model
    from fl_protocol.schemas import ServingPoint

    state = State(tmp_path / "coord")
    torch.manual_seed(0)
    for v in (0, 1):
        save_weights(create_model("cnn2d"), state.checkpoint_path(v), version=v)
    logits, y = _node_data(5, 80)
    m = classification_metrics(y, logits.argmax(1), None)
    report = eval_report(1, "node-a", 0, m, calibration_stats(logits, y).to_dict())
    store_eval_report(state, parse_topic(eval_topic("fed", 1, "node-a")), report.to_bytes())
    expected = CalibrationBook(state.dir).operating_point(0)
    assert expected is not None

    class Sent(list[tuple[str, bytes]]):
        def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
            self.append((topic, payload))

    artifacts = OnnxArtifacts(state)
    publisher = Publisher(Sent(), "fed", state, ModelIdentity("cnn2d", 0), onnx=artifacts)
    manifest = publisher.publish_manifest(1, None)
    point = manifest.operating_point
    assert isinstance(point, ServingPoint) and point == artifacts.serving_point(1)
    assert point.calibration_version == 0 and point.n_val == expected.n_val
    assert point.threshold == float(f"{expected.threshold:.6g}")
    assert publisher.publish_manifest(0, None).operating_point is None  # nothing before v0
