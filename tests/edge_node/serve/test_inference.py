"""OnnxModel / ModelHolder against real onnxruntime sessions of tiny ONNX models."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_node.errors import ModelError
from edge_node.serve.inference import ModelHolder, OnnxModel, session_options
from tests.helpers.onnx_models import expected_label, make_classifier

REPO = Path(__file__).resolve().parents[3]


def _images(means: list[float], size: int = 224) -> np.ndarray:
    return np.stack([np.full((1, size, size), m, np.float32) for m in means])


def test_metadata_is_parsed_from_the_model_file(tmp_path: Path) -> None:
    """A model carries version, arch, classes, window and input size; the node reads them."""
    path = make_classifier(tmp_path / "m.onnx", version="7", arch="resnet18", window=(-500, 1400))
    info = OnnxModel(path, intra_op_threads=1).info
    assert info.model_version == "7"
    assert info.arch == "resnet18"
    assert info.class_names == ("non_covid", "covid")
    assert (info.window_center, info.window_width) == (-500.0, 1400.0)
    assert info.input_size == 224
    assert info.texture == "none" and info.texture_dim == 0 and not info.needs_texture
    assert info.texture_input is None and info.image_input == "image"
    assert len(info.sha256) == 64


def test_predict_gives_labels_softmax_confidence_and_version(tmp_path: Path) -> None:
    """Bright images are 'covid', dark 'non_covid'; probabilities sum to one."""
    model = OnnxModel(make_classifier(tmp_path / "m.onnx", version="3"), intra_op_threads=1)
    means = [0.1, 0.9, 0.45, 0.7]
    pred = model.predict(_images(means))
    assert pred.labels == [expected_label(m) for m in means]
    assert pred.model_version == "3"
    np.testing.assert_allclose(pred.probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(pred.confidence, pred.probs.max(axis=1))
    np.testing.assert_allclose(pred.prob_covid, pred.probs[:, 1])
    # scale 10: mean 0.9 -> logit gap 8 -> p(covid) = sigmoid(8)
    assert pred.prob_covid[1] == pytest.approx(1 / (1 + np.exp(-8.0)), rel=1e-5)


def test_dynamic_batch_sizes(tmp_path: Path) -> None:
    model = OnnxModel(make_classifier(tmp_path / "m.onnx"), intra_op_threads=1)
    for n in (1, 3, 16):
        assert len(model.predict(_images([0.2] * n))) == n
    assert len(model.predict(np.zeros((0, 1, 224, 224), np.float32))) == 0


def test_wrong_input_shape_is_a_model_error(tmp_path: Path) -> None:
    model = OnnxModel(make_classifier(tmp_path / "m.onnx", size=64), intra_op_threads=1)
    with pytest.raises(ModelError, match=r"\[N, 1, 64, 64\]"):
        model.predict(_images([0.5], size=224))


def test_texture_model_requires_and_uses_texture(tmp_path: Path) -> None:
    """A model with fedscan.texture=glcm_lbp has a second input that changes the output."""
    model = OnnxModel(make_classifier(tmp_path / "t.onnx", texture_dim=5), intra_op_threads=1)
    assert model.info.needs_texture and model.info.texture_dim == 5
    assert model.info.texture_input == "texture"
    with pytest.raises(ModelError, match="texture"):
        model.predict(_images([0.5]))
    low = model.predict(_images([0.5]), np.zeros((1, 5), np.float32)).prob_covid[0]
    high = model.predict(_images([0.5]), np.full((1, 5), 100.0, np.float32)).prob_covid[0]
    assert high > low


def test_model_without_fedscan_metadata_uses_contract_defaults(tmp_path: Path) -> None:
    path = make_classifier(tmp_path / "plain.onnx", fedscan_metadata=False)
    info = OnnxModel(path, intra_op_threads=1).info
    assert info.model_version == f"sha256-{info.sha256[:8]}"
    assert info.class_names == ("non_covid", "covid")
    assert info.window_center is None and info.window_width is None


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"fedscan.schema": "2"}, "schema"),
        ({"fedscan.texture": "wavelets"}, "texture"),
        ({"fedscan.class_names": "not json"}, "malformed"),
        ({"fedscan.window_width": "wide"}, "not a number"),
        ({"fedscan.class_names": '["a", "b", "c"]'}, "classes"),
        ({"fedscan.temperature": "0"}, "temperature"),
        ({"fedscan.threshold": "1.5"}, "threshold"),
        ({"fedscan.uncertain_band": "nan"}, "uncertain_band"),
    ],
)
def test_bad_metadata_is_refused(tmp_path: Path, meta: dict[str, str], match: str) -> None:
    path = make_classifier(tmp_path / "bad.onnx", metadata=meta)
    with pytest.raises(ModelError, match=match):
        OnnxModel(path, intra_op_threads=1)


def test_unloadable_files_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(ModelError, match="cannot load"):
        OnnxModel(garbage)


def test_session_options_for_a_shared_workstation() -> None:
    so = session_options(3)
    assert so.intra_op_num_threads == 3
    assert so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_holder_swaps_atomically_and_keeps_old_model_on_failure(tmp_path: Path) -> None:
    """In-flight work keeps its model; a broken replacement leaves the old one serving."""
    holder = ModelHolder(intra_op_threads=1)
    assert holder.current() is None
    assert holder.wait(0.01) is None
    seen: list[str] = []
    holder.on_swap(lambda m: seen.append(m.info.model_version))
    holder.swap(make_classifier(tmp_path / "v1.onnx", version="1"))
    in_flight = holder.current()
    assert in_flight is not None
    holder.swap(make_classifier(tmp_path / "v2.onnx", version="2"))
    assert in_flight.predict(_images([0.2])).model_version == "1"  # still usable
    current = holder.current()
    assert current is not None and current.info.model_version == "2"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    with pytest.raises(ModelError):
        holder.swap(bad)
    current = holder.current()
    assert current is not None and current.info.model_version == "2"
    assert seen == ["1", "2"]


def test_concurrent_predict_during_swaps(tmp_path: Path) -> None:
    """Predictions run from several threads while models are swapped; none fails."""
    holder = ModelHolder(intra_op_threads=1)
    paths = [make_classifier(tmp_path / f"v{i}.onnx", version=str(i)) for i in range(3)]
    holder.swap(paths[0])
    errors: list[BaseException] = []
    versions: set[str] = set()

    def work() -> None:
        try:
            for _ in range(50):
                model = holder.current()
                assert model is not None
                versions.add(model.predict(_images([0.3, 0.8], size=224)).model_version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for p in paths[1:] * 3:
        holder.swap(p)
    for t in threads:
        t.join()
    assert not errors
    assert versions <= {"0", "1", "2"}


def test_inference_path_never_imports_torch() -> None:
    """The predict-only workstation must not need torch (nor pay its import time)."""
    code = (
        "import edge_node.daemon, edge_node.cli.predict, edge_node.serve.api,"
        " edge_node.serve.pipeline, sys;"
        "from fedscan.cli import build_parser; build_parser('node'); build_parser('predict');"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'skimage' not in sys.modules, 'scikit-image imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_operating_point_from_metadata_decides_label_and_uncertain_band(tmp_path: Path) -> None:
    """A calibrated model divides logits by its temperature and calls covid at its own
    threshold; probabilities inside the uncertain band are reported as "uncertain"."""
    plain = OnnxModel(make_classifier(tmp_path / "plain.onnx"), intra_op_threads=1)
    assert not plain.info.calibrated
    assert (plain.info.temperature, plain.info.threshold) == (1.0, 0.5)
    meta = {
        "fedscan.temperature": "2.0",
        "fedscan.threshold": "0.3",
        "fedscan.uncertain_band": "0.05",
    }
    model = OnnxModel(make_classifier(tmp_path / "cal.onnx", metadata=meta), intra_op_threads=1)
    info = model.info
    assert info.calibrated and (info.temperature, info.threshold, info.uncertain_band) == (
        2.0,
        0.3,
        0.05,
    )
    means = [0.1, 0.45, 0.5, 0.9]
    pred = model.predict(_images(means))
    # scale 10, threshold 0.5 in the graph: logit gap 20 * (m - 0.5), halved by T = 2
    expected = [1 / (1 + np.exp(-10.0 * (m - 0.5))) for m in means]
    np.testing.assert_allclose(pred.prob_covid, expected, rtol=1e-3)
    # P = 0.38 for m = 0.45: covid at threshold 0.3 (argmax would say non_covid)
    assert pred.labels == ["non_covid", "covid", "covid", "covid"]
    np.testing.assert_allclose(pred.confidence, [1 - expected[0], *expected[1:]], rtol=1e-3)
    assert pred.verdicts == ["non_covid", "covid", "covid", "covid"]
    # m = 0.42 -> P = 0.31, within 0.05 of the threshold 0.3
    assert model.predict(_images([0.42])).verdicts == ["uncertain"]
    wide = make_classifier(
        tmp_path / "wide.onnx", metadata={**meta, "fedscan.uncertain_band": "0.2"}
    )
    assert OnnxModel(wide, intra_op_threads=1).predict(_images([0.45])).verdicts == ["uncertain"]
