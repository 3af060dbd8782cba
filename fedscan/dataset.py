"""PNG/JPG CT slices -> DICOM Secondary Capture files plus ``index.csv``, so that imported data
takes the same DICOM path (watcher, preprocess, predict, train) as a scanner's files.

Layouts of the source folder:

``ucsd``     the UCSD COVID-CT release: ``CT_COVID/``, ``CT_NonCOVID/``, the official split in
             ``Data-split/{COVID,NonCOVID}/{train,val,test}CT_*.txt``, patient ids in
             ``meta/*.csv`` (``manifest.csv`` as a fallback).
``folders``  one folder per class (``covid/`` and ``non_covid/`` or recognisable names like
             ``CT_COVID``, ``positive``, ``normal``; anything else via ``class_map``),
             optionally below ``train/``, ``val/``, ``test/``. A subfolder below a class folder
             is a patient; otherwise the file stem up to a ``%`` is (``12%0.png`` and
             ``12%1.png`` are one patient, the UCSD naming). Without split folders patients
             are split by a hash of their id (``val_fraction``, ``test_fraction``).
``auto``     ``ucsd`` when ``Data-split/`` and ``CT_COVID/`` exist, else ``folders``.

Output: ``OUT/<split>/<label>/<name>.dcm`` and ``OUT/index.csv`` with the columns
`INDEX_FIELDS`: the DICOM path relative to OUT, split, label (``covid`` / ``non_covid``),
patient_key (sha256 of the PatientID written, as edge_node.ingest.preprocess computes it), the
source file relative to SRC, and the SOPInstanceUID.

Each DICOM file: Secondary Capture Image Storage, Modality CT (so the default allow-list takes
it), 8-bit MONOCHROME2 without rescale (the preprocessor's display path), grayscale by Rec. 601
luminance (``PIL convert("L")``: RGBA, RGB, palette and gray sources all end up the same way, so
no class can hide in the colour mode), PatientID = the source's patient id, Study and Series
UIDs derived from it, SOPInstanceUID derived from the relative source path: importing the same
folder again writes the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from edge_node.ingest.preprocess import patient_key
from fedscan.errors import DatasetError

log = logging.getLogger(__name__)

LABELS = ("non_covid", "covid")  # index 0, 1 as in the model contract
SPLITS = ("train", "val", "test")
INDEX_FIELDS = ("path", "split", "label", "patient_key", "source", "sop_instance_uid")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_UID_ROOT = "fedscan.dataset"

# Folder names (lower case, letters and digits only) recognised without a class map.
_KNOWN_CLASSES = {
    "covid": "covid",
    "ctcovid": "covid",
    "covid19": "covid",
    "positive": "covid",
    "noncovid": "non_covid",
    "ctnoncovid": "non_covid",
    "normal": "non_covid",
    "negative": "non_covid",
}


@dataclass(frozen=True)
class SourceImage:
    path: Path  # absolute
    rel: str  # relative to SRC, posix separators (names the SOPInstanceUID)
    label: str  # "covid" | "non_covid"
    split: str  # "train" | "val" | "test"
    patient_id: str


@dataclass(frozen=True)
class IndexRow:
    path: str  # DICOM file relative to the index's folder
    split: str
    label: str
    patient_key: str
    source: str
    sop_instance_uid: str


def deterministic_uid(*parts: str) -> str:
    """A ``2.25.`` UID from a 128-bit hash of ``parts``: the same parts give the same UID.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and
    returns a random UUID, hence our own.)"""
    digest = hashlib.sha256("\x1f".join((_UID_ROOT, *parts)).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def hashed_split(patient_id: str, val_fraction: float, test_fraction: float) -> str:
    """Patient-level split from a hash of the id (stable across runs and machines)."""
    u = int(hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# --- layouts ----------------------------------------------------------------------------


def detect_layout(src: Path) -> str:
    if (src / "Data-split").is_dir() and (src / "CT_COVID").is_dir():
        return "ucsd"
    return "folders"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def _ucsd_patients(src: Path) -> dict[tuple[str, str], str]:
    """(class folder, file name) -> patient id, from meta/ (manifest.csv as fallback)."""
    found: dict[tuple[str, str], str] = {}
    for folder, csv_name, file_col, pid_col in (
        ("CT_COVID", "COVID-CT-MetaInfo.csv", "File name", "Patient ID"),
        ("CT_NonCOVID", "NonCOVID-CT-MetaInfo.csv", "image name", "patient id"),
    ):
        meta = src / "meta" / csv_name
        if meta.is_file():
            for row in _read_csv(meta):
                name, pid = (row.get(file_col) or "").strip(), (row.get(pid_col) or "").strip()
                if name and pid:
                    found[(folder, name)] = pid
    manifest = src / "manifest.csv"
    if manifest.is_file():
        for row in _read_csv(manifest):
            folder, _, name = (row.get("path") or "").partition("/")
            pid = (row.get("patient_id") or "").strip()
            if name and pid:
                found.setdefault((folder, name), pid)
    return found


def discover_ucsd(src: Path) -> list[SourceImage]:
    patients = _ucsd_patients(src)
    images: list[SourceImage] = []
    for folder, split_dir, label in (
        ("CT_COVID", "COVID", "covid"),
        ("CT_NonCOVID", "NonCOVID", "non_covid"),
    ):
        class_dir = src / folder
        if not class_dir.is_dir():
            raise DatasetError(f"UCSD layout: {class_dir} is missing")
        split_of: dict[str, str] = {}
        for split in SPLITS:
            listing = src / "Data-split" / split_dir / f"{split}CT_{split_dir}.txt"
            if not listing.is_file():
                raise DatasetError(f"UCSD layout: official split list {listing} is missing")
            for line in listing.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    split_of[line.strip()] = split
        on_disk = {p.name: p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for name in sorted(split_of.keys() - on_disk.keys()):
            log.warning("UCSD layout: %s/%s is in the split lists but not on disk", folder, name)
        for name in sorted(on_disk):
            img_split = split_of.get(name)
            if img_split is None:
                log.warning("UCSD layout: %s/%s is in no official split; skipped", folder, name)
                continue
            pid = patients.get((folder, name)) or _stem_patient(name)
            images.append(SourceImage(on_disk[name], f"{folder}/{name}", label, img_split, pid))
    return images


def _stem_patient(name: str) -> str:
    return Path(name).stem.split("%", 1)[0]


def _class_of(name: str, class_map: Mapping[str, str]) -> str | None:
    if name in class_map:
        return class_map[name]
    return _KNOWN_CLASSES.get(_norm(name))


def _scan_class_folders(
    root: Path, class_map: Mapping[str, str], split: str | None
) -> list[tuple[Path, str, str | None, str]]:
    """(image, label, split or None, patient id) for every image below the class folders."""
    found: list[tuple[Path, str, str | None, str]] = []
    classes = [d for d in sorted(root.iterdir()) if d.is_dir()]
    mapped = [(d, _class_of(d.name, class_map)) for d in classes]
    unknown = [d.name for d, lab in mapped if lab is None and not d.name.startswith(".")]
    if len([1 for _, lab in mapped if lab]) < 2:
        raise DatasetError(
            f"{root}: need two class folders (covid / non_covid); found {[d.name for d in classes]}"
            "; map them with --class-map FOLDER=covid --class-map FOLDER=non_covid"
        )
    if unknown:
        log.warning("ignoring folders that are no class: %s", ", ".join(unknown))
    for class_dir, label in mapped:
        if label is None:
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            inner = path.relative_to(class_dir).parts
            pid = inner[0] if len(inner) > 1 else _stem_patient(path.name)
            # a patient id must not collide across classes by accident ("1.png" in both)
            found.append((path, label, split, f"{class_dir.name}/{pid}"))
    return found


def discover_folders(
    src: Path,
    class_map: Mapping[str, str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> list[SourceImage]:
    class_map = dict(class_map or {})
    for folder, label in class_map.items():
        if label not in LABELS:
            raise DatasetError(f"class map {folder}={label}: label must be one of {LABELS}")
    split_dirs = [src / s for s in SPLITS if (src / s).is_dir()]
    entries: list[tuple[Path, str, str | None, str]] = []
    if split_dirs:
        for d in split_dirs:
            entries += _scan_class_folders(d, class_map, d.name)
    else:
        entries = _scan_class_folders(src, class_map, None)
    images = []
    for path, label, split, pid in entries:
        split = split or hashed_split(pid, val_fraction, test_fraction)
        images.append(SourceImage(path, path.relative_to(src).as_posix(), label, split, pid))
    return images


def discover(
    src: str | Path,
    layout: str = "auto",
    class_map: Mapping[str, str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> list[SourceImage]:
    """Every importable image of ``src`` with its label, split and patient id."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"dataset folder {src} does not exist")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError("val_fraction and test_fraction must be in [0, 1) with sum < 1")
    layout = detect_layout(src) if layout == "auto" else layout
    if layout == "ucsd":
        images = discover_ucsd(src)
    elif layout == "folders":
        images = discover_folders(src, class_map, val_fraction, test_fraction)
    else:
        raise DatasetError(f"unknown layout {layout!r}; choose auto, ucsd or folders")
    if not images:
        raise DatasetError(f"no images found in {src} (layout {layout})")
    return images


# --- conversion -------------------------------------------------------------------------


def image_to_gray(path: str | Path) -> np.ndarray:
    """Any PNG/JPG -> uint8 (rows, cols) luminance; 16-bit gray is scaled to its range."""
    try:
        with Image.open(path) as raw:
            img = ImageOps.exif_transpose(raw)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                top = float(arr.max()) or 1.0
                return np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def image_dataset(
    sop_class: UID,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    description: str,
) -> Dataset:
    """The parts every image we write shares: file meta (Explicit VR Little Endian), UIDs, an
    empty patient name and study details, Modality CT, BodyPartExamined CHEST, one MONOCHROME2
    sample per pixel."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"  # lung CT: the node's chest-only filter keeps it
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = description
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def secondary_capture(
    pixels: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int = 1,
    description: str = "fedscan dataset import",
) -> Dataset:
    """An 8-bit MONOCHROME2 Secondary Capture (Modality CT) holding ``pixels``."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("pixels must be a 2-D uint8 array")
    ds = image_dataset(
        SecondaryCaptureImageStorage,
        patient_id=patient_id[:64],
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        instance_number=instance_number,
        description=description,
    )
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def save_atomic(ds: Dataset, path: Path) -> None:
    """Write beside the target and rename, so a watcher never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _out_names(images: Sequence[SourceImage]) -> list[str]:
    """File names (without folder) unique within each split/label folder, deterministic."""
    names: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for img in images:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(img.rel).stem).strip("._") or "image"
        name = base
        if (img.split, img.label, name) in seen:
            name = f"{base}_{hashlib.sha256(img.rel.encode()).hexdigest()[:8]}"
        seen.add((img.split, img.label, name))
        names.append(name + ".dcm")
    return names


def import_images(
    images: Sequence[SourceImage], out: str | Path, *, namespace: str = ""
) -> list[IndexRow]:
    """Convert ``images`` into ``out`` and write ``out/index.csv``; returns the index rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(images, key=lambda i: (i.patient_id, i.rel))
    instance: dict[str, int] = {}
    rows: list[IndexRow] = []
    for img, name in zip(ordered, _out_names(ordered), strict=True):
        instance[img.patient_id] = instance.get(img.patient_id, 0) + 1
        study = deterministic_uid(namespace, "study", img.patient_id)
        sop = deterministic_uid(namespace, "sop", img.rel)
        ds = secondary_capture(
            image_to_gray(img.path),
            patient_id=img.patient_id,
            study_uid=study,
            series_uid=deterministic_uid(namespace, "series", img.patient_id),
            sop_uid=sop,
            instance_number=instance[img.patient_id],
        )
        rel = f"{img.split}/{img.label}/{name}"
        save_atomic(ds, out / rel)
        key = patient_key(img.patient_id[:64], study)
        rows.append(IndexRow(rel, img.split, img.label, key, img.rel, sop))
    write_index(rows, out / "index.csv")
    return rows


def import_dataset(
    src: str | Path,
    out: str | Path,
    *,
    layout: str = "auto",
    class_map: Mapping[str, str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    namespace: str = "",
) -> list[IndexRow]:
    """`discover` + `import_images`: the whole ``fedscan dataset import``."""
    images = discover(src, layout, class_map, val_fraction, test_fraction)
    return import_images(images, out, namespace=namespace)


# --- index.csv --------------------------------------------------------------------------


def write_index(rows: Iterable[IndexRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_FIELDS)
        for r in sorted(rows, key=lambda r: r.path):
            writer.writerow([r.path, r.split, r.label, r.patient_key, r.source, r.sop_instance_uid])
    os.replace(tmp, path)
    return path


def read_index(path: str | Path) -> list[IndexRow]:
    """Rows of an ``index.csv``; ``row.path`` stays relative to the index's folder."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"index {path} not found")
    rows = _read_csv(path)
    if rows and set(INDEX_FIELDS) - rows[0].keys():
        raise DatasetError(f"{path}: columns must include {', '.join(INDEX_FIELDS)}")
    return [IndexRow(*(r[f] for f in INDEX_FIELDS)) for r in rows]


def summarize(rows: Sequence[IndexRow]) -> str:
    """A small text table: images per split and label, and patients."""
    lines = [f"{'split':<6} {'non_covid':>9} {'covid':>6} {'patients':>8}"]
    for split in SPLITS:
        part = [r for r in rows if r.split == split]
        counts = [sum(1 for r in part if r.label == lab) for lab in LABELS]
        patients = len({r.patient_key for r in part})
        lines.append(f"{split:<6} {counts[0]:>9} {counts[1]:>6} {patients:>8}")
    return "\n".join(lines)
