"""Write real DICOM files for tests: CT slices from a HU array, Secondary Captures, copies of real
samples with fresh UIDs (to multiply one real file into a burst), broken files.

Everything here writes genuine Part 10 files with pydicom; nothing is mocked. Real samples come
from ``tests/fixtures/dicom`` (small copies of pydicom-data, MIT, licence beside them) or, for the
large ones, from ``../shared/data/dicom-samples``; `sample_path` skips the test with a clear
message when a file is absent.

    from tests.helpers.dicom_factory import write_ct, copy_with_new_uid, sample_path

    write_ct(inbox / "a.dcm", patient_id="P7")                 # 512x512 CT phantom, HU int16
    write_ct(inbox / "b.dcm", hu=my_hu, photometric="MONOCHROME1")
    src = sample_path("693_UNCR.dcm")                          # real 512x512 CT
    for i in range(500):
        copy_with_new_uid(src, inbox / f"{i:03d}.dcm")
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures" / "dicom"
SHARED_SAMPLES_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom-samples"

# A real 512x512 CT slice (int16, RescaleIntercept -1024) kept in the fixtures folder.
CT_SAMPLE = "693_UNCR.dcm"
# The same slice, JPEG 2000 lossless.
CT_SAMPLE_J2K = "693_J2KR.dcm"
# A real two-frame Enhanced CT (rescale only in the functional groups).
ENHANCED_CT_SAMPLE = "eCT_Supplemental.dcm"


def sample_path(name: str) -> Path:
    """Path of a real pydicom-data sample: the fixture copy if there, else the shared folder.

    Skips the calling test (with the places looked at) when neither has it.
    """
    for folder in (FIXTURES_DIR, SHARED_SAMPLES_DIR):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    pytest.skip(f"DICOM sample {name} not found in {FIXTURES_DIR} or {SHARED_SAMPLES_DIR}")


def ct_phantom(rows: int = 512, cols: int = 512, *, seed: int = 0) -> np.ndarray:
    """A CT-like axial slice in HU (float32): air, a soft-tissue body ellipse, two lungs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2.0, cols / 2.0
    hu = np.full((rows, cols), -1000.0, dtype=np.float32)
    body = ((yy - cy) / (0.38 * rows)) ** 2 + ((xx - cx) / (0.45 * cols)) ** 2 <= 1.0
    hu[body] = 40.0
    for side in (-1.0, 1.0):
        lung = ((yy - cy) / (0.28 * rows)) ** 2 + (
            (xx - cx - side * 0.2 * cols) / (0.14 * cols)
        ) ** 2
        hu[lung <= 1.0] = -850.0
    hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32)
    return hu


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_study(
    ds: Dataset,
    *,
    patient_id: str,
    study_uid: str | None,
    series_uid: str | None,
    modality: str,
) -> None:
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality


def write_ct(
    path: str | Path,
    *,
    sop_uid: str | None = None,
    patient_id: str = "P1",
    hu: np.ndarray | None = None,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    rows: int = 512,
    cols: int = 512,
    study_uid: str | None = None,
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    seed: int = 0,
) -> Path:
    """Write a CT Image Storage file (Explicit VR Little Endian) whose rescale gives ``hu``.

    ``hu``: float array ``(rows, cols)`` or ``(frames, rows, cols)`` in Hounsfield units; default
    a `ct_phantom`. Stored values are ``round((hu - intercept) / slope)`` as signed 16-bit with
    RescaleSlope/RescaleIntercept, so HU = stored * slope + intercept as in real scanners.
    ``photometric`` only sets the tag: HU are physical values, the stored pixels do not change.
    Returns the path written.
    """
    path = Path(path)
    if hu is None:
        hu = ct_phantom(rows, cols, seed=seed)
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim not in (2, 3):
        raise ValueError(f"hu must be 2-D or 3-D, got shape {hu.shape}")
    stored = np.clip(np.round((hu - intercept) / slope), -32768, 32767).astype("<i2")
    sop_uid = sop_uid or generate_uid()

    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    _patient_study(
        ds, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, modality=modality
    )
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    if stored.ndim == 3:
        ds.NumberOfFrames = int(stored.shape[0])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleType = "HU"
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = "1"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_secondary_capture(
    path: str | Path,
    pixels: np.ndarray,
    *,
    sop_uid: str | None = None,
    patient_id: str = "P1",
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    photometric: str | None = None,
) -> Path:
    """Write an 8-bit Secondary Capture (no rescale), gray ``(rows, cols)`` or RGB ``(r, c, 3)``.

    This is what a PNG/JPG converted to DICOM looks like; the preprocessor takes its display
    path (value / 255).
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError("pixels must be uint8 display values")
    rgb = pixels.ndim == 3
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(SecondaryCaptureImageStorage, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    _patient_study(
        ds, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid, modality=modality
    )
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def copy_with_new_uid(src: str | Path, dst: str | Path, *, sop_uid: str | None = None) -> str:
    """Copy a real DICOM file to ``dst`` with a new SOPInstanceUID (pixels, syntax unchanged).

    Use it to multiply one real sample into a burst of distinct slices. Returns the new UID.
    """
    ds = pydicom.dcmread(src)
    uid = sop_uid or generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return uid


def with_photometric(
    src: str | Path, dst: str | Path, photometric: str, *, invert_stored: bool = False
) -> Path:
    """Copy a real single-sample file with another PhotometricInterpretation (new SOP UID).

    ``invert_stored=True`` also flips the stored values within their range so that the image
    a viewer shows stays the same (what a modality writing MONOCHROME1 would do); for files
    with a rescale the rescale is changed to keep the modality values (HU) identical.
    """
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = photometric
    if invert_stored:
        arr = ds.pixel_array
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        bits = int(ds.BitsStored)
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        flipped = (hi + lo) - arr.astype(np.int64)
        ds.PixelData = flipped.astype(arr.dtype.newbyteorder("<")).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            slope = float(ds.get("RescaleSlope", 1.0))
            intercept = float(ds.get("RescaleIntercept", 0.0))
            # hu = slope * stored + intercept, stored = (hi + lo) - flipped
            ds.RescaleSlope = f"{-slope:g}"
            ds.RescaleIntercept = f"{intercept + slope * (hi + lo):g}"
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def truncated_copy(src: str | Path, dst: str | Path, keep: int | float) -> Path:
    """Write the first ``keep`` bytes of ``src`` (an int, or a fraction of its size) to ``dst``:
    what a partially written or cut-off transfer leaves behind."""
    data = Path(src).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else int(keep)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:n])
    return dst


def write_garbage(path: str | Path, size: int = 4096, *, seed: int = 0) -> Path:
    """Random bytes with a .dcm name: not DICOM at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def copy_sample(name: str, dst: str | Path) -> Path:
    """Copy a real sample byte for byte (keeps its UIDs)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sample_path(name), dst)
    return dst


def series_from(
    src: str | Path, n: int, *, slice_mm: float = 2.5, body_part: str | None = None
) -> list[Dataset]:
    """``n`` slices of one new study/series made from a real single slice: fresh Study,
    Series and SOP Instance UIDs, InstanceNumber 1..n and ImagePositionPatient stepping in z
    (pixels and transfer syntax unchanged), as a scanner would send them. ``body_part`` sets
    BodyPartExamined (e.g. "CHEST", so the chest-only filter takes the head CT sample)."""
    base = pydicom.dcmread(src)
    study, series = generate_uid(), generate_uid()
    x, y, z0 = (float(v) for v in base.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
    slices = []
    for i in range(n):
        ds = copy.deepcopy(base)  # pixel bytes are immutable: shared, not copied
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, z0 - i * slice_mm]
        ds.SliceLocation = z0 - i * slice_mm
        if body_part is not None:
            ds.BodyPartExamined = body_part
        slices.append(ds)
    return slices


def write_series(
    src: str | Path, folder: str | Path, n: int, *, body_part: str | None = None
) -> list[Path]:
    """:func:`series_from` written as ``folder/NNN.dcm``; returns the paths in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series_from(src, n, body_part=body_part)):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
