"""fedscan dataset import: tiny PNG/JPG sets made by the tests -> DICOM Secondary Captures that
the edge node's own preprocess reads; plus one check on the real UCSD folder when present."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from edge_node.ingest.preprocess import prepare, read_meta, resize
from fedscan.cli import main as fedscan_main
from fedscan.dataset import (
    INDEX_FIELDS,
    deterministic_uid,
    discover,
    hashed_split,
    import_dataset,
    read_index,
)
from fedscan.errors import DatasetError

UCSD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "covid-ct-ucsd"


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """A small RGB test image (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _save(path: Path, rgb: np.ndarray, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P")
    img.save(path)
    return path


def _class_folders(root: Path) -> Path:
    """covid/ (RGBA PNGs, two slices of patient 7) and non_covid/ (RGB PNG, gray PNG, JPG)."""
    _save(root / "covid" / "7%0.png", _image(1), "RGBA")
    _save(root / "covid" / "7%1.png", _image(2), "RGBA")
    _save(root / "covid" / "8.png", _image(3), "RGBA")
    _save(root / "non_covid" / "1.png", _image(4), "RGB")
    _save(root / "non_covid" / "2.png", _image(5), "L")
    _save(root / "non_covid" / "3.jpg", _image(6), "RGB")
    (root / "non_covid" / "notes.txt").write_text("not an image")
    return root


def test_class_folders_import_to_secondary_captures(tmp_path: Path) -> None:
    """Every image becomes an 8-bit MONOCHROME2 Secondary Capture (Modality CT) whose pixels
    are PIL's luminance of the source, listed in index.csv with its split and label."""
    src = _class_folders(tmp_path / "src")
    out = tmp_path / "out"
    rows = import_dataset(src, out)
    assert len(rows) == 6
    header = (out / "index.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == INDEX_FIELDS
    assert Counter(r.label for r in rows) == {"covid": 3, "non_covid": 3}
    for r in rows:
        dcm = out / r.path
        assert dcm.is_file() and r.path.startswith(f"{r.split}/{r.label}/")
        ds = pydicom.dcmread(dcm)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.Modality == "CT"
        assert (ds.PhotometricInterpretation, ds.BitsStored) == ("MONOCHROME2", 8)
        assert "RescaleSlope" not in ds and ds.SOPInstanceUID == r.sop_instance_uid
        with Image.open(src / r.source) as im:
            expected = np.asarray(im.convert("L"))
        np.testing.assert_array_equal(ds.pixel_array, expected)


def test_imported_files_take_the_display_path_of_preprocess(tmp_path: Path) -> None:
    """The edge node reads them with pipeline display: value / 255, resized; the index's
    patient_key and SOPInstanceUID are what preprocess finds in the file."""
    src = _class_folders(tmp_path / "src")
    rows = import_dataset(src, tmp_path / "out")
    for r in rows:
        out = prepare(tmp_path / "out" / r.path)
        assert out.meta.pipeline == "display" and out.meta.modality == "CT"
        assert out.meta.patient_key == r.patient_key
        assert out.meta.sop_instance_uid == r.sop_instance_uid
        pixels = pydicom.dcmread(tmp_path / "out" / r.path).pixel_array
        np.testing.assert_allclose(out.frames[0], resize(pixels / 255.0, 224), atol=1e-6)


def test_rgba_and_rgb_sources_give_the_same_dicom_pixels(tmp_path: Path) -> None:
    """The colour mode of a source (a class hint in some datasets) does not survive."""
    rgb = _image(11)
    src = tmp_path / "src"
    _save(src / "covid" / "a.png", rgb, "RGBA")
    _save(src / "non_covid" / "a.png", rgb, "RGB")
    rows = {r.label: r for r in import_dataset(src, tmp_path / "out")}
    a = pydicom.dcmread(tmp_path / "out" / rows["covid"].path)
    b = pydicom.dcmread(tmp_path / "out" / rows["non_covid"].path)
    assert a.PixelData == b.PixelData


def test_reimport_is_idempotent_and_uids_follow_paths_and_patients(tmp_path: Path) -> None:
    """Importing twice writes identical bytes; SOP UIDs come from the relative source path,
    Study/Series UIDs from the patient."""
    src = _class_folders(tmp_path / "src")
    rows_a = import_dataset(src, tmp_path / "a")
    rows_b = import_dataset(src, tmp_path / "b")
    import_dataset(src, tmp_path / "a")  # again, in place
    assert rows_a == rows_b
    for r in rows_a:
        assert (tmp_path / "a" / r.path).read_bytes() == (tmp_path / "b" / r.path).read_bytes()
    assert (tmp_path / "a" / "index.csv").read_bytes() == (
        tmp_path / "b" / "index.csv"
    ).read_bytes()
    by_source = {r.source: r for r in rows_a}
    assert by_source["covid/7%0.png"].sop_instance_uid == deterministic_uid(
        "", "sop", "covid/7%0.png"
    )
    ds0 = pydicom.dcmread(tmp_path / "a" / by_source["covid/7%0.png"].path)
    ds1 = pydicom.dcmread(tmp_path / "a" / by_source["covid/7%1.png"].path)
    ds8 = pydicom.dcmread(tmp_path / "a" / by_source["covid/8.png"].path)
    assert ds0.StudyInstanceUID == ds1.StudyInstanceUID != ds8.StudyInstanceUID
    assert ds0.SeriesInstanceUID == ds1.SeriesInstanceUID != ds8.SeriesInstanceUID
    assert ds0.SOPInstanceUID != ds1.SOPInstanceUID
    assert len({r.sop_instance_uid for r in rows_a}) == len(rows_a)
    assert all(len(r.sop_instance_uid) <= 64 for r in rows_a)
    other_ns = import_dataset(src, tmp_path / "c", namespace="site-b")
    assert {r.sop_instance_uid for r in other_ns}.isdisjoint({r.sop_instance_uid for r in rows_a})


def test_patients_group_by_percent_stem_and_subfolder(tmp_path: Path) -> None:
    """'7%0.png' and '7%1.png' are one patient; so are files in one patient subfolder; each
    patient lands in exactly one split."""
    src = tmp_path / "src"
    for i in range(3):
        _save(src / "covid" / "patA" / f"{i}.png", _image(20 + i))
    _save(src / "covid" / "7%0.png", _image(30))
    _save(src / "covid" / "7%1.png", _image(31))
    for i in range(40):
        _save(src / "non_covid" / f"{i}%0.png", _image(40 + i, (8, 8)))
        _save(src / "non_covid" / f"{i}%1.png", _image(90 + i, (8, 8)))
    rows = import_dataset(src, tmp_path / "out")
    key = {r.source: r.patient_key for r in rows}
    assert key["covid/patA/0.png"] == key["covid/patA/1.png"] == key["covid/patA/2.png"]
    assert key["covid/7%0.png"] == key["covid/7%1.png"] != key["covid/patA/0.png"]
    assert key["covid/7%0.png"] == hashlib.sha256(b"covid/7").hexdigest()
    splits_of: dict[str, set[str]] = {}
    for r in rows:
        splits_of.setdefault(r.patient_key, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {r.split for r in rows} == {"train", "val", "test"}  # 42 patients, hashed
    assert len(splits_of) == 42


def test_hashed_split_is_stable_and_roughly_proportional() -> None:
    """The split of a patient depends only on its id and the fractions."""
    ids = [f"patient-{i}" for i in range(2000)]
    splits = Counter(hashed_split(p, 0.1, 0.2) for p in ids)
    assert abs(splits["test"] / 2000 - 0.2) < 0.04 and abs(splits["val"] / 2000 - 0.1) < 0.03
    assert [hashed_split(p, 0.1, 0.2) for p in ids[:50]] == [
        hashed_split(p, 0.1, 0.2) for p in ids[:50]
    ]


def test_split_folders_are_respected(tmp_path: Path) -> None:
    """SRC/train/<class> and SRC/test/<class>: the folder names the split."""
    src = tmp_path / "src"
    _save(src / "train" / "covid" / "a.png", _image(1))
    _save(src / "train" / "non_covid" / "b.png", _image(2))
    _save(src / "test" / "covid" / "c.png", _image(3))
    _save(src / "test" / "non_covid" / "d.png", _image(4))
    rows = import_dataset(src, tmp_path / "out")
    assert {(r.source, r.split) for r in rows} == {
        ("train/covid/a.png", "train"),
        ("train/non_covid/b.png", "train"),
        ("test/covid/c.png", "test"),
        ("test/non_covid/d.png", "test"),
    }


def test_unknown_class_folders_need_a_class_map(tmp_path: Path) -> None:
    """Folders named pos/neg are not guessed: a clear DatasetError, then the map works."""
    src = tmp_path / "src"
    _save(src / "pos" / "a.png", _image(1))
    _save(src / "neg" / "b.png", _image(2))
    with pytest.raises(DatasetError, match="class-map"):
        import_dataset(src, tmp_path / "out")
    with pytest.raises(DatasetError, match="label must be one of"):
        import_dataset(src, tmp_path / "out", class_map={"pos": "sick", "neg": "non_covid"})
    rows = import_dataset(src, tmp_path / "out", class_map={"pos": "covid", "neg": "non_covid"})
    assert {(r.source, r.label) for r in rows} == {
        ("pos/a.png", "covid"),
        ("neg/b.png", "non_covid"),
    }


def _mini_ucsd(root: Path) -> Path:
    """The UCSD folder structure with tiny generated images (never the real ones)."""
    covid = ["p1-1.png", "p1-2.png", "p2-1.png", "p3-1.png"]
    non = ["0.jpg", "1%0.jpg", "1%1.jpg", "5.png", "9.png"]
    for i, name in enumerate(covid):
        _save(root / "CT_COVID" / name, _image(i), "RGBA")
    for i, name in enumerate(non):
        _save(root / "CT_NonCOVID" / name, _image(50 + i), "RGB")
    _save(root / "CT_NonCOVID" / "stray.png", _image(99))  # in no split list: skipped
    split_dir = root / "Data-split"
    lists = {
        ("COVID", "train"): ["p1-1.png", "p1-2.png"],
        ("COVID", "val"): ["p2-1.png"],
        ("COVID", "test"): ["p3-1.png"],
        ("NonCOVID", "train"): ["1%0.jpg", "1%1.jpg"],
        ("NonCOVID", "val"): ["5.png"],
        ("NonCOVID", "test"): ["0.jpg", "9.png"],
    }
    for (cls, split), names in lists.items():
        path = split_dir / cls / f"{split}CT_{cls}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(names) + "\n")
    (root / "meta").mkdir()
    with (root / "meta" / "COVID-CT-MetaInfo.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["File name", "Patient ID", "Age"])
        for name, pid in zip(
            covid, ["Patient 1", "Patient 1", "Patient 2", "Patient 3"], strict=True
        ):
            w.writerow([name, pid, "40"])
    with (root / "meta" / "NonCOVID-CT-MetaInfo.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "image name", "patient id"])
        for i, (name, pid) in enumerate(zip(non, ["c0", "c1", "c1", "c5", "c9"], strict=True)):
            w.writerow([i, name, pid])
    return root


def test_ucsd_layout_follows_official_split_and_patient_ids(tmp_path: Path) -> None:
    """Splits from Data-split lists, patients from meta/, images outside the lists skipped."""
    src = _mini_ucsd(tmp_path / "ucsd")
    assert {i.rel for i in discover(src)} == {
        *(f"CT_COVID/{n}" for n in ["p1-1.png", "p1-2.png", "p2-1.png", "p3-1.png"]),
        *(f"CT_NonCOVID/{n}" for n in ["0.jpg", "1%0.jpg", "1%1.jpg", "5.png", "9.png"]),
    }
    rows = import_dataset(src, tmp_path / "out")
    by = {r.source: r for r in rows}
    assert by["CT_COVID/p1-1.png"].split == "train" and by["CT_COVID/p2-1.png"].split == "val"
    assert by["CT_NonCOVID/0.jpg"].split == "test" and by["CT_NonCOVID/0.jpg"].label == "non_covid"
    assert by["CT_COVID/p1-1.png"].patient_key == hashlib.sha256(b"Patient 1").hexdigest()
    assert by["CT_COVID/p1-1.png"].patient_key == by["CT_COVID/p1-2.png"].patient_key
    assert by["CT_NonCOVID/1%0.jpg"].patient_key == by["CT_NonCOVID/1%1.jpg"].patient_key
    assert read_meta(tmp_path / "out" / by["CT_COVID/p3-1.png"].path).patient_key == (
        hashlib.sha256(b"Patient 3").hexdigest()
    )
    assert read_index(tmp_path / "out" / "index.csv") == sorted(rows, key=lambda r: r.path)


def test_cli_import_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fedscan dataset import` exits 0 and prints counts; a missing folder exits 3."""
    src = _class_folders(tmp_path / "src")
    code = fedscan_main(["dataset", "import", "--src", str(src), "--out", str(tmp_path / "o")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 images" in printed and "non_covid" in printed
    code = fedscan_main(
        ["dataset", "import", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert code == 10  # DatasetError
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.ucsd
def test_real_ucsd_import_matches_the_official_split(tmp_path: Path) -> None:
    """All 746 UCSD slices convert; per split and class the counts are those of the official
    lists, and no patient appears in two splits."""
    if not (UCSD / "Data-split").is_dir():
        pytest.skip(f"UCSD COVID-CT not found at {UCSD}")
    rows = import_dataset(UCSD, tmp_path / "ucsd")
    expected = Counter()
    for folder, label in (("COVID", "covid"), ("NonCOVID", "non_covid")):
        for split in ("train", "val", "test"):
            listing = UCSD / "Data-split" / folder / f"{split}CT_{folder}.txt"
            names = [n.strip() for n in listing.read_text().splitlines() if n.strip()]
            expected[(split, label)] = len(names)
    assert Counter((r.split, r.label) for r in rows) == expected
    assert len(rows) == 746
    splits_of: dict[str, set[str]] = {}
    for r in rows:
        splits_of.setdefault(r.patient_key, set()).add(r.split)
    assert [k for k, s in splits_of.items() if len(s) > 1] == []
    for r in rows[::50]:  # spot-check that the edge node reads them
        assert prepare(tmp_path / "ucsd" / r.path).meta.patient_key == r.patient_key
