"""`fedscan bench train` on a tiny UCSD-shaped folder the test draws itself (no UCSD images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_node.ingest.preprocess import prepare
from fedscan.bench.train import discover, limit_items, load_image
from fedscan.cli import main
from fedscan.dataset import import_dataset


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_ucsd_like(root: Path, per_class_split: int = 2) -> Path:
    """CT_COVID (RGBA PNGs) / CT_NonCOVID (RGB PNGs) with the official split lists."""
    rng = np.random.default_rng(0)
    for folder, split_dir, mode in (
        ("CT_COVID", "COVID", "RGBA"),
        ("CT_NonCOVID", "NonCOVID", "RGB"),
    ):
        (root / folder).mkdir(parents=True)
        (root / "Data-split" / split_dir).mkdir(parents=True)
        for split in ("train", "val", "test"):
            names = []
            for i in range(per_class_split):
                name = f"{split}{i}%{i}.png"
                h, w = 180 + 7 * i, 200 + 5 * i
                pixels = rng.integers(0, 256, size=(h, w, len(mode)), dtype=np.uint8)
                if mode == "RGBA":
                    pixels[..., 3] = 255
                Image.fromarray(pixels, mode).save(root / folder / name)
                names.append(name)
            (root / "Data-split" / split_dir / f"{split}CT_{split_dir}.txt").write_text(
                "\n".join(names) + "\n"
            )
    return root


def test_same_input_from_png_and_from_imported_dicom(tmp_path: Path) -> None:
    """The benchmark's PNG path and the node's DICOM path (after `fedscan dataset import`) give
    the model the same array."""
    src = make_ucsd_like(tmp_path / "ucsd")
    rows = import_dataset(src, tmp_path / "dicom")
    items, kind = discover(src)
    assert kind == "images" and len(items) == len(rows) == 12
    by_source = {i.path.relative_to(src).as_posix(): i for i in items}
    for row in rows:
        from_png = load_image(by_source[row.source], "images")
        from_dicom = prepare(tmp_path / "dicom" / row.path).frames[0]
        np.testing.assert_array_equal(from_png, from_dicom)
    dicom_items, dicom_kind = discover(tmp_path / "dicom")
    assert dicom_kind == "dicom" and {i.split for i in dicom_items} == {"train", "val", "test"}


def test_bench_train_writes_the_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_ucsd_like(tmp_path / "ucsd")
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "train",
            "--json",
            str(out),
            "--dataset",
            str(src),
            "--archs",
            "cnn2d",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["init"] == "random" and set(report["results"]) == {"cnn2d", "cnn2d+texture"}
    for name, r in report["results"].items():
        for key in (
            "accuracy",
            "f1",
            "sensitivity",
            "specificity",
            "precision",
            "auc",
            "train_images_per_s",
            "seconds",
        ):
            assert key in r, (name, key)
        assert r["init"] == "random" and r["epochs"] == 1
        assert (r["n_train"], r["n_val"], r["n_test"]) == (4, 4, 4)
        assert r["train_images_per_s"] > 0
    assert "| cnn2d | GLCM+LBP |" in capsys.readouterr().out


def test_missing_dataset_is_skipped_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "train", "--json", str(out), "--dataset", str(tmp_path / "nope")])
    assert rc == 0
    assert "skipped" in json.loads(out.read_text())
    assert "not found" in capsys.readouterr().err


def test_limit_keeps_both_classes(tmp_path: Path) -> None:
    items, _ = discover(make_ucsd_like(tmp_path / "ucsd", per_class_split=3))
    small = limit_items(items, 4)
    for split in ("train", "val", "test"):
        labels = sorted(i.label for i in small if i.split == split)
        assert labels == [0, 0, 1, 1]
