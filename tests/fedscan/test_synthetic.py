"""fedscan.synthetic: CT-like DICOM slices that the edge node preprocesses through its HU path,
with a class difference that is real but not trivially separable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_node.ingest.dicom_decode import decode_pixels, read_dataset
from edge_node.ingest.preprocess import prepare, to_hu
from fedscan.cli import main as fedscan_main
from fedscan.dataset import INDEX_FIELDS, read_index
from fedscan.errors import DatasetError
from fedscan.synthetic import generate


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, 30, seed=3, n_patients=30)
    return out


def test_index_and_files_follow_the_import_format(small_set: Path) -> None:
    """Same index.csv columns as dataset import; files under <split>/<label>/."""
    rows = read_index(small_set / "index.csv")
    header = (small_set / "index.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == INDEX_FIELDS
    assert Counter(r.label for r in rows) == {"covid": 30, "non_covid": 30}
    for r in rows:
        assert r.path.startswith(f"{r.split}/{r.label}/") and (small_set / r.path).is_file()
    assert len({r.sop_instance_uid for r in rows}) == 60


def test_patient_level_split_stratified_by_class(small_set: Path) -> None:
    """Every patient has one label and one split; each split holds both classes."""
    rows = read_index(small_set / "index.csv")
    per_patient: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        per_patient.setdefault(r.patient_key, set()).add((r.split, r.label))
    assert len(per_patient) == 30
    assert all(len(v) == 1 for v in per_patient.values())
    assert {(r.split, r.label) for r in rows} == {
        (s, lab) for s in ("train", "val", "test") for lab in ("covid", "non_covid")
    }


def test_slices_are_real_ct_through_the_hu_path(small_set: Path) -> None:
    """CT Image Storage with rescale; preprocess takes pipeline hu; air near -1000 HU and the
    lungs near -850 HU."""
    rows = read_index(small_set / "index.csv")
    for r in rows:
        out = prepare(small_set / r.path)
        assert out.meta.pipeline == "hu" and out.meta.modality == "CT"
        assert out.meta.patient_key == r.patient_key
        assert out.meta.sop_instance_uid == r.sop_instance_uid
        assert out.frames[0].shape == (224, 224)
    ds = pydicom.dcmread(small_set / rows[0].path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and float(ds.RescaleIntercept) == -1024
    assert (ds.Rows, ds.Columns) == (256, 256)
    healthy = next(r for r in rows if r.label == "non_covid")  # covid lungs are mostly GGO
    parsed = read_dataset(small_set / healthy.path)
    hu = to_hu(parsed, decode_pixels(parsed))[0]
    assert abs(float(np.median(hu[:8, :8])) + 1000) < 60  # air in the corner
    lung_like = hu[(hu > -950) & (hu < -700)]
    assert lung_like.size > 2000 and abs(float(np.median(lung_like)) + 850) < 60


def _lung_mean(frame: np.ndarray) -> float:
    # lung window values between outside air (~0.23) and soft tissue (~0.93)
    inside = frame[(frame > 0.29) & (frame < 0.8)]
    return float(inside.mean())


def test_classes_differ_in_lung_intensity_but_overlap(small_set: Path) -> None:
    """Ground-glass raises the mean lung intensity of covid slices (Welch t > 3), yet the
    two classes overlap on that statistic: learnable, not trivial."""
    rows = read_index(small_set / "index.csv")
    means: dict[str, list[float]] = {"covid": [], "non_covid": []}
    for r in rows:
        means[r.label].append(_lung_mean(prepare(small_set / r.path).frames[0]))
    a, b = np.array(means["covid"]), np.array(means["non_covid"])
    t = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert t > 3.0
    assert a.min() < b.max()


def test_generation_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    """Same seed, same bytes; another seed, other pixels."""
    a = generate(tmp_path / "a", 3, seed=5, n_patients=4)
    b = generate(tmp_path / "b", 3, seed=5, n_patients=4)
    c = generate(tmp_path / "c", 3, seed=6, n_patients=4)
    assert a.read_bytes() == b.read_bytes()
    rows = read_index(a)
    for r in rows:
        assert (tmp_path / "a" / r.path).read_bytes() == (tmp_path / "b" / r.path).read_bytes()
    first_c = read_index(c)[0]
    pa = pydicom.dcmread(tmp_path / "a" / rows[0].path).PixelData
    pc = pydicom.dcmread(tmp_path / "c" / first_c.path).PixelData
    assert pa != pc


def test_bad_arguments_are_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        generate(tmp_path, 0)
    with pytest.raises(DatasetError):
        generate(tmp_path, 4, n_patients=1)


def test_cli_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fedscan dataset synthetic` writes the set and prints its summary."""
    code = fedscan_main(
        ["dataset", "synthetic", "--out", str(tmp_path / "s"), "--n-per-class", "4", "--seed", "1"]
    )
    assert code == 0
    assert len(read_index(tmp_path / "s" / "index.csv")) == 8
    assert "covid" in capsys.readouterr().out
