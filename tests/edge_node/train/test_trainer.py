"""Local training on real CT slices: outputs, modes, seeds, FedProx, early stopping, resume.

Every test trains the paper's cnn2d for one to a few epochs on ~10 labelled slices with one
torch thread, so the file runs in seconds.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file

from edge_node.errors import TrainingError
from edge_node.train import checkpoint as train_checkpoint
from edge_node.train.augment import AugmentParams, augment_batch
from edge_node.train.job import TrainJob, TrainResult
from edge_node.train.job_subprocess import start
from edge_node.train.trainer import (
    _exclusive,
    class_weights,
    evaluate,
    initial_model,
    load_split,
    train_epoch,
    train_once,
)
from export.weights import load_weights, read_metadata, save_weights
from tests.helpers.training import LabelledNode, make_labelled_node, pick_salt

VAL_FRACTION = 0.35


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> LabelledNode:
    return make_labelled_node(tmp_path_factory.mktemp("node"), n_patients=10, slices_per_patient=1)


def make_job(node: LabelledNode, work: Path, **kw: object) -> TrainJob:
    values: dict[str, object] = {
        "db_path": node.db_path,
        "state_dir": work / "state",
        "out_dir": work / "out",
        "epochs": 2,
        "batch_size": 4,
        "val_fraction": VAL_FRACTION,
        "split_salt": pick_salt(node, VAL_FRACTION),
        "patience": 0,
        "nice": 0,
    }
    values.update(kw)
    return TrainJob(**values)  # type: ignore[arg-type]


def tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def test_train_once_writes_weights_onnx_and_metrics(node: LabelledNode, tmp_path: Path) -> None:
    """A full training from scratch: best weights, ONNX and a per-epoch metrics JSON, with the
    validation side made of other patients than the training side."""
    job = make_job(node, tmp_path, export_onnx=True)
    result = train_once(job)

    assert result.weights_path.is_file() and result.onnx_path and result.onnx_path.is_file()
    assert result.init == "random" and result.arch == "cnn2d" and result.mode == "full"
    assert result.num_samples + result.n_val == len(node.uids)
    assert result.n_val > 0 and result.epochs_run == 2 and result.resumed_from_epoch == 0
    assert result.model_version.startswith("local-")
    meta = read_metadata(result.weights_path)
    assert (meta["arch"], meta["version"]) == ("cnn2d", result.model_version)

    metrics = json.loads(result.metrics_path.read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for entry in metrics["epochs"]:
        assert set(entry["train"]) >= {"accuracy", "precision", "recall", "specificity", "f1"}
        assert entry["val"]["n"] == result.n_val and entry["loss"] > 0
    assert metrics["n_train"] == result.num_samples and metrics["init"] == "random"
    assert metrics["best_epoch"] == result.best_epoch
    assert metrics["images_per_s"] > 0
    assert TrainResult.load(job.out_dir / "result.json") == result

    data = load_split(job, texture=False)
    train_patients = set(data.train.patient_keys)
    assert train_patients and not train_patients & set(data.val.patient_keys)
    # the saved weights are the best epoch's: evaluating them reproduces its val metrics
    assert evaluate(result.weights_path, data.val) == result.val_metrics
    # onnxruntime on the exported model agrees with torch
    import onnxruntime as ort

    sess = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: data.val.images})[0]
    model = load_weights(result.weights_path).eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(data.val.images)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    # the operating point fitted on the local validation side is in the ONNX metadata
    props = {p.key: p.value for p in onnx.load(str(result.onnx_path)).metadata_props}
    if result.operating_point is None:  # one class on the validation side: nothing to fit
        assert "fedscan.threshold" not in props
    else:
        assert float(props["fedscan.threshold"]) == pytest.approx(
            result.operating_point["threshold"], rel=1e-5
        )
        assert float(props["fedscan.temperature"]) > 0
    assert result.init_val_calibration is not None
    assert result.init_val_calibration["n_pos"] + result.init_val_calibration["n_neg"] == (
        result.n_val
    )


def test_same_seed_same_weights(node: LabelledNode, tmp_path: Path) -> None:
    """Seeded CPU training is reproducible; another seed gives other weights."""
    a = train_once(make_job(node, tmp_path / "a", seed=7))
    b = train_once(make_job(node, tmp_path / "b", seed=7))
    c = train_once(make_job(node, tmp_path / "c", seed=8))
    ta, tb, tc = (tensors(r.weights_path) for r in (a, b, c))
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key])
    assert any(not np.array_equal(ta[k], tc[k]) for k in ta)
    assert a.model_version == b.model_version != c.model_version


def test_start_from_global_weights_and_evaluate_it(node: LabelledNode, tmp_path: Path) -> None:
    """Given the global model, training starts from it and reports the global model's metrics
    on the local validation side (what the coordinator collects each round)."""
    global_path = tmp_path / "global.safetensors"
    torch.manual_seed(3)
    save_weights(initial_model(make_job(node, tmp_path)), global_path, version=4)
    job = make_job(node, tmp_path, init_weights=global_path, epochs=1)
    result = train_once(job)
    assert result.init == "global.safetensors"
    data = load_split(job, texture=False)
    assert result.init_val_metrics == evaluate(global_path, data.val)


def test_head_mode_trains_only_the_classifier_from_cached_embeddings(
    node: LabelledNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    global_path = tmp_path / "global.safetensors"
    save_weights(initial_model(make_job(node, tmp_path)), global_path, version=1)
    job = make_job(node, tmp_path, init_weights=global_path, mode="head", epochs=3)
    result = train_once(job)
    assert (job.train_dir / "embeddings").is_dir()
    assert len(list((job.train_dir / "embeddings").glob("*.npz"))) == 1
    before, after = tensors(global_path), tensors(result.weights_path)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"} == set(result.trainable_keys)

    caplog.set_level("INFO")
    train_once(replace(job, out_dir=tmp_path / "again"))
    assert "embeddings from the cache" in caplog.text


def test_last_stage_mode_leaves_the_early_layers(node: LabelledNode, tmp_path: Path) -> None:
    global_path = tmp_path / "global.safetensors"
    save_weights(initial_model(make_job(node, tmp_path)), global_path, version=1)
    result = train_once(make_job(node, tmp_path, init_weights=global_path, mode="last_stage"))
    before, after = tensors(global_path), tensors(result.weights_path)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed <= set(result.trainable_keys)
    assert "backbone.conv1.weight" not in changed and "head.weight" in changed
    assert any(k.startswith("backbone.conv2") for k in changed)


def test_fedprox_keeps_weights_near_the_global_model(node: LabelledNode, tmp_path: Path) -> None:
    """The proximal term mu/2 ||w - w_global||^2: a large mu moves less than mu = 0."""
    global_path = tmp_path / "global.safetensors"
    save_weights(initial_model(make_job(node, tmp_path)), global_path, version=1)
    w0 = tensors(global_path)

    def drift(mu: float) -> float:
        job = make_job(
            node, tmp_path / f"mu{mu}", init_weights=global_path, mu=mu, epochs=2, lr=3e-3
        )
        w = tensors(train_once(job).weights_path)
        return float(sum(np.sum((w[k] - w0[k]) ** 2) for k in w0))

    plain, prox = drift(0.0), drift(1000.0)
    assert prox < 0.5 * plain


def test_a_cosine_schedule_lowers_the_rate_epoch_by_epoch(
    node: LabelledNode, tmp_path: Path
) -> None:
    """lr_schedule = "cosine": each epoch's rate (in metrics.json) is the schedule's, from the
    base rate down; an unknown schedule is refused before anything runs."""
    from fl_protocol.schedule import scheduled_lr

    job = make_job(node, tmp_path, epochs=3, lr=2e-3, lr_schedule="cosine")
    result = train_once(job)
    epochs = json.loads(result.metrics_path.read_text())["epochs"]
    rates = [e["lr"] for e in epochs]
    assert rates == pytest.approx([scheduled_lr(2e-3, "cosine", i, 3) for i in range(3)])
    assert rates[0] == pytest.approx(2e-3) and rates[2] < rates[1] < rates[0]
    with pytest.raises(TrainingError, match="lr_schedule"):
        make_job(node, tmp_path, lr_schedule="step")


def test_the_head_trains_at_its_own_multiple_of_the_rate(
    node: LabelledNode, tmp_path: Path
) -> None:
    """head_lr_mult = 10: from the same start the classifier moves much further in one epoch
    than at the plain rate (Adam steps scale with the rate); out-of-range values are refused."""
    start = tmp_path / "start.safetensors"
    save_weights(initial_model(make_job(node, tmp_path)), start, version=0)
    w0 = tensors(start)

    def head_move(mult: float) -> float:
        job = make_job(node, tmp_path / f"m{mult}", init_weights=start, epochs=1,
                       head_lr_mult=mult)  # fmt: skip
        w = tensors(train_once(job).weights_path)
        return float(np.abs(w["head.weight"] - w0["head.weight"]).sum())

    assert head_move(10.0) > 3 * head_move(1.0)
    with pytest.raises(TrainingError, match="head_lr_mult"):
        make_job(node, tmp_path, head_lr_mult=0.0)


def test_early_stopping_keeps_the_best_epoch(node: LabelledNode, tmp_path: Path) -> None:
    """With patience 1 and a learning rate too high to keep improving, training stops before
    the epoch budget, and the weights written are the best epoch's."""
    job = make_job(node, tmp_path, epochs=8, patience=1, lr=0.05, augment=False)
    result = train_once(job)
    history = json.loads(result.metrics_path.read_text())["epochs"]
    val_losses = [e["val_loss"] for e in history]
    assert result.epochs_run < 8  # the data and seed are fixed: this run does stop early
    assert result.best_epoch == 1 + int(np.argmin(val_losses))
    assert result.epochs_run == result.best_epoch + 1  # patience 1
    data = load_split(job, texture=False)
    assert (
        evaluate(result.weights_path, data.val).to_dict() == history[result.best_epoch - 1]["val"]
    )


def test_texture_features_are_cached_and_fed_to_the_model(
    node: LabelledNode, tmp_path: Path
) -> None:
    texture = pytest.importorskip("edge_node.ingest.texture")
    job = make_job(node, tmp_path, texture_features=True, epochs=1)
    result = train_once(job)
    model = load_weights(result.weights_path)
    assert model.texture_dim == texture.TEXTURE_DIM
    data = load_split(job, texture=True)
    assert data.train.texture is not None
    assert data.train.texture.shape == (len(data.train), texture.TEXTURE_DIM)
    np.testing.assert_allclose(
        data.train.texture[0], texture.texture_features(data.train.images[0, 0]), rtol=1e-6
    )
    assert evaluate(model, data.val).n == result.n_val


def test_nothing_to_train_on(tmp_path: Path) -> None:
    empty = make_labelled_node(tmp_path / "empty", n_patients=0)
    job = TrainJob(db_path=empty.db_path, state_dir=tmp_path / "s", out_dir=tmp_path / "o")
    with pytest.raises(TrainingError, match="no labelled slices"):
        train_once(job)


def test_one_training_at_a_time(node: LabelledNode, tmp_path: Path) -> None:
    job = make_job(node, tmp_path)
    with _exclusive(job.train_dir / "lock"), pytest.raises(TrainingError, match="already"):
        train_once(job)


def test_class_weights_balance_the_classes() -> None:
    w = class_weights(np.array([0, 0, 0, 1]))
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    assert class_weights(np.array([1, 1])).tolist() == pytest.approx([1.0, 1.0])


def test_augmentation_is_seeded_and_stays_in_range() -> None:
    images = torch.rand(4, 1, 32, 32)
    params = AugmentParams()
    a = augment_batch(images, params, torch.Generator().manual_seed(1))
    b = augment_batch(images, params, torch.Generator().manual_seed(1))
    c = augment_batch(images, params, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    still = AugmentParams(rotation_deg=0, zoom=(1, 1), shift=0, hflip=0, vflip=0)
    same = augment_batch(images, still, torch.Generator().manual_seed(1))
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    flipped = augment_batch(images, replace(still, hflip=1.0), torch.Generator())
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)


def test_corrupt_checkpoint_is_ignored(node: LabelledNode, tmp_path: Path) -> None:
    """A checkpoint whose tensor file was damaged is not resumed from: training starts over."""
    job = make_job(node, tmp_path, epochs=1)
    folder = job.train_dir
    folder.mkdir(parents=True)
    (folder / train_checkpoint.INDEX).write_text(
        json.dumps({"schema": train_checkpoint.SCHEMA, "fingerprint": "x", "epoch": 1})
    )
    assert train_checkpoint.load(folder, "x") is None
    assert train_once(job).resumed_from_epoch == 0


def test_killed_training_resumes_and_matches_an_uninterrupted_run(
    node: LabelledNode, tmp_path: Path
) -> None:
    """The worker subprocess is SIGKILLed right after its first epoch checkpoint; started again
    (in this process, to spare a second torch start-up), it continues from there and ends with
    exactly the weights of an uninterrupted run. `fedscan node train` in test_train_cli runs
    the whole subprocess round trip."""
    job = make_job(node, tmp_path / "killed", epochs=5, batch_size=2)
    proc = start(job)
    index = job.train_dir / train_checkpoint.INDEX
    deadline = time.monotonic() + 240
    while not index.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the worker ended before it could be killed"
    done = json.loads(index.read_text())["epoch"]
    assert 1 <= done < 5
    assert not (job.out_dir / "result.json").exists()

    resumed = train_once(job)
    assert resumed.resumed_from_epoch == done and resumed.epochs_run == 5
    assert not index.exists()  # cleared once the outputs are written

    reference = train_once(make_job(node, tmp_path / "straight", epochs=5, batch_size=2))
    got, want = tensors(resumed.weights_path), tensors(reference.weights_path)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert resumed.val_metrics == reference.val_metrics


def test_a_diverging_training_stops_with_a_clear_error(node: LabelledNode, tmp_path: Path) -> None:
    """Non-finite loss (here: an infinite classifier weight) is an error, not NaN weights."""
    job = make_job(node, tmp_path)
    model = initial_model(job)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    optimizer = torch.optim.AdamW(model.parameters())
    data = load_split(job, texture=False)
    with pytest.raises(TrainingError, match="diverged"):
        train_epoch(model, optimizer, data.train, batch_size=4, generator=torch.Generator())
