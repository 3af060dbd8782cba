"""fedscan pretrain: the NT-Xent loss and the two views on their own, then real pretraining runs
(cnn2d, a few synthetic DICOM slices, 1-2 epochs) through the CLI and the runner: the output
loads as a backbone through the zoo, an interrupted run resumes to the same weights, and
unusable inputs end with one clear error."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from export.zoo import create_model
from fedscan.cli import main
from fedscan.dataset import read_index
from fedscan.pretrain.config import PretrainConfig
from fedscan.pretrain.data import load_images
from fedscan.pretrain.errors import PretrainError
from fedscan.pretrain.objective import nt_xent
from fedscan.pretrain.runner import EpochStats, lr_at, run_pretrain
from fedscan.pretrain.views import two_views
from fedscan.synthetic import generate
from tests.helpers.dicom_factory import copy_sample, write_garbage


class Interrupted(Exception):
    """Stands in for a kill after an epoch's checkpoint was written."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic CT slices of 8 patients as DICOM with an index (2 of them test slices)."""
    return generate(tmp_path_factory.mktemp("syn") / "ds", 4, n_patients=8, size=64).parent


def _config(dataset: Path, out: Path, **kw: object) -> PretrainConfig:
    settings: dict[str, object] = {"arch": "cnn2d", "epochs": 2, "batch_size": 3, "threads": 2}
    settings.update(kw)
    return PretrainConfig(out=out, dataset=dataset, **settings)  # type: ignore[arg-type]


def test_nt_xent_is_low_for_identical_views_and_chance_for_unrelated_ones() -> None:
    """Two identical batches of 16 embeddings: each finds its partner at once (loss near 0);
    two unrelated batches: the partner is one of 31 candidates (loss near log 31)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 128, generator=g)
    other = torch.randn(16, 128, generator=g)
    assert float(nt_xent(z, z, 0.2)) < 0.5
    assert float(nt_xent(z, other, 0.2)) == pytest.approx(math.log(2 * 16 - 1), abs=0.3)
    assert float(nt_xent(z, z, 0.1)) < float(nt_xent(z, z, 0.5))
    with pytest.raises(ValueError):
        nt_xent(z[:1], z[:1], 0.2)


def test_two_views_keep_shape_and_range_and_repeat_with_the_seed() -> None:
    """Views of a batch of slices: same shape, inside [0, 1], different from each other and from
    the input, and the same again from a generator with the same seed."""
    images = torch.rand(4, 1, 224, 224, generator=torch.Generator().manual_seed(5))
    v1, v2 = two_views(images, torch.Generator().manual_seed(1))
    w1, w2 = two_views(images, torch.Generator().manual_seed(1))
    for v in (v1, v2):
        assert v.shape == images.shape and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert not torch.allclose(v, images)
    assert not torch.allclose(v1, v2)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    with pytest.raises(ValueError):
        two_views(images[0], torch.Generator())


def test_learning_rate_warms_up_over_one_epoch_then_decays() -> None:
    """4 steps per epoch, 3 epochs: linear to the peak over epoch 1, then a cosine down."""
    lrs = [lr_at(s, 4, 12, 1e-3) for s in range(12)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(lrs[4:])) and lrs[-1] > 0


def test_cli_pretrains_on_train_and_val_and_the_zoo_loads_the_backbone(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedscan pretrain --dataset` on the train/val slices for 1 epoch: one progress line,
    a weights file that create_model(arch, pretrained=...) takes as its backbone (tensor for
    tensor), and a report with the loss history and the before/after sanity figure."""
    out = tmp_path / "bb.safetensors"
    rc = main(
        ["pretrain", "--dataset", str(dataset), "--out", str(out), "--arch", "cnn2d",
         "--epochs", "1", "--batch-size", "3", "--threads", "2"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("epoch 1/1  loss ") for line in printed.splitlines()) == 1
    assert "images/s" in printed

    saved = load_file(str(out))
    model = create_model("cnn2d", pretrained=out)
    backbone = model.backbone.state_dict()
    assert backbone and all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in backbone.items())
    assert not torch.equal(backbone["conv1.weight"], create_model("cnn2d").backbone.conv1.weight)

    doc = json.loads((tmp_path / "bb.safetensors.json").read_text())
    assert doc["schema"] == "fedscan.pretrain/1" and doc["arch"] == "cnn2d"
    unseen = [r for r in read_index(dataset / "index.csv") if r.split == "test"]
    assert len(unseen) == 2 and doc["n_images"] == doc["files"] == 8 - len(unseen)
    assert doc["epochs"] == 1 and len(doc["history"]) == 1 and doc["seconds"] > 0
    assert doc["version"].startswith("pretrain-")
    sanity = doc["sanity"]
    assert math.isfinite(sanity["loss_epoch0"]) and math.isfinite(sanity["loss_last"])
    assert sanity["chance"] == pytest.approx(math.log(2 * 3 - 1))
    assert doc["config"]["splits"] == ["train", "val"]
    assert (tmp_path / "bb-work" / "checkpoint.json").is_file()


def test_an_interrupted_run_resumes_to_the_same_weights(dataset: Path, tmp_path: Path) -> None:
    """2 epochs straight vs. killed after epoch 1 and started again: identical output tensors
    and losses; a checkpoint of other settings in the same work folder is not continued."""
    straight = run_pretrain(_config(dataset, tmp_path / "a" / "bb.safetensors"))

    def kill_after_first(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise Interrupted

    config = _config(dataset, tmp_path / "b" / "bb.safetensors")
    with pytest.raises(Interrupted):
        run_pretrain(config, progress=kill_after_first)
    assert not config.out.exists()
    resumed = run_pretrain(config)
    assert resumed["resumed_after_epoch"] == 1

    a = load_file(str(tmp_path / "a" / "bb.safetensors"))
    b = load_file(str(config.out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["sanity"] == straight["sanity"]
    assert resumed["version"] == straight["version"]

    other = run_pretrain(_config(dataset, config.out, epochs=1, temperature=0.5))
    assert other["resumed_after_epoch"] == 0 and len(other["history"]) == 1


def test_inbox_frames_skip_unusable_files_and_come_from_the_cache_next_time(
    tmp_path: Path,
) -> None:
    """An inbox with a CT slice, a two-frame enhanced CT (in a subfolder), an MR image and a
    non-DICOM file: 3 slices from 2 files, 2 files skipped; a second load reads the cache."""
    inbox = tmp_path / "inbox"
    copy_sample("693_UNCR.dcm", inbox / "a.dcm")
    copy_sample("eCT_Supplemental.dcm", inbox / "sub" / "b.dcm")
    copy_sample("emri_small.dcm", inbox / "c.dcm")
    write_garbage(inbox / "d.dcm")
    config = PretrainConfig(out=tmp_path / "bb.safetensors", inbox=inbox)
    first = load_images(config)
    assert first.images.shape == (3, 224, 224) and first.images.dtype.name == "uint8"
    assert (first.files, first.skipped, first.cached) == (2, 2, False)
    again = load_images(config)
    assert again.cached and again.digest() == first.digest() and again.skipped == 2


def test_no_usable_images_is_one_line_and_the_pretrain_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An inbox of files that are not CT DICOM ends with one line saying so and exit 17;
    --dataset with --inbox, or neither, is a usage error (exit 2)."""
    inbox = tmp_path / "inbox"
    write_garbage(inbox / "x.dcm")
    write_garbage(inbox / "y.dcm", seed=1)
    out = tmp_path / "bb.safetensors"
    rc = main(["pretrain", "--inbox", str(inbox), "--out", str(out), "--arch", "cnn2d"])
    assert rc == PretrainError.exit_code == 17
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedscan: error: no usable images")
    assert "2 file(s) skipped" in err[0] and not out.exists()

    for argv in (["--inbox", str(inbox), "--dataset", str(tmp_path)], []):
        with pytest.raises(SystemExit) as done:
            main(["pretrain", *argv, "--out", str(out)])
        assert done.value.code == 2
    with pytest.raises(PretrainError, match="--splits"):
        PretrainConfig(out=out, dataset=tmp_path, splits=("train", "holdout"))
