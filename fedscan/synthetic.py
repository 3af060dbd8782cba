"""A synthetic two-class CT set, made as real CT DICOM (HU via RescaleIntercept), for the demo
and for tests that need many labelled slices without the UCSD images.

Each patient has an anatomy of its own (body and lung size, position and tilt, lung density,
noise level); each slice is a level through it (lungs grow and shrink with it). Every slice:
air, a body ellipse with a fat layer, two lungs at about -850 HU with a posterior (dependent)
density gradient, heart and spine, vessels as small bright dots, scanner-like noise and blur.

``covid`` slices add ground-glass opacities: 3-7 soft patches at -480 to -280 HU (well inside
the lung window: 0.58-0.71 of the display range against ~0.33 for lung), mostly peripheral
and posterior, 8-22 px (at 256 px) across, sometimes with a consolidated core. Hard cases on
both sides keep it from being trivial: about one covid slice in twenty shows only one small
fainter patch (-600 to -500 HU), and about a third of non_covid slices carry a confounder (a
dependent atelectasis band, a solid nodule, or denser lungs overall).

Stored as Explicit VR Little Endian CT Image Storage, int16 with RescaleIntercept -1024, so the
preprocessor takes its ``hu`` path. Same ``index.csv`` format as `fedscan.dataset` import;
patient-level train/val/test split, stratified by class. Deterministic in ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from edge_node.ingest.preprocess import patient_key
from fedscan.dataset import (
    LABELS,
    IndexRow,
    deterministic_uid,
    image_dataset,
    save_atomic,
    write_index,
)
from fedscan.errors import DatasetError

INTERCEPT = -1024.0


@dataclass(frozen=True)
class Anatomy:
    """One patient's body; lengths are fractions of the image side."""

    cx: float
    cy: float
    tilt: float  # radians
    body_a: float  # semi-axis, left-right
    body_b: float  # semi-axis, front-back
    lung_dx: float  # lung centre offset from the midline
    lung_a: float
    lung_b: float
    lung_hu: float
    noise_hu: float
    blur_px: float  # at 256 px

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        return cls(
            cx=0.5 + rng.uniform(-0.03, 0.03),
            cy=0.52 + rng.uniform(-0.03, 0.03),
            tilt=rng.uniform(-0.08, 0.08),
            body_a=rng.uniform(0.40, 0.46),
            body_b=rng.uniform(0.29, 0.35),
            lung_dx=rng.uniform(0.17, 0.21),
            lung_a=rng.uniform(0.11, 0.14),
            lung_b=rng.uniform(0.19, 0.24),
            lung_hu=rng.uniform(-880.0, -820.0),
            noise_hu=rng.uniform(15.0, 40.0),
            blur_px=rng.uniform(0.5, 1.0),
        )


def _blob(
    img: np.ndarray, cy: float, cx: float, sy: float, sx: float, amp: float, theta: float
) -> None:
    """Add an anisotropic Gaussian (pixels units) in place, computed on a local window."""
    r = math.ceil(3.0 * max(sy, sx))
    y0, y1 = max(0, int(cy) - r), min(img.shape[0], int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(img.shape[1], int(cx) + r + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    img[y0:y1, x0:x1] += amp * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reconstruction kernel), edges replicated."""
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    pad = np.pad(img, r, mode="edge")
    rows = sum(k[i] * pad[:, i : i + img.shape[1]] for i in range(2 * r + 1))
    return np.asarray(sum(k[i] * rows[i : i + img.shape[0], :] for i in range(2 * r + 1)))


def ct_slice(anatomy: Anatomy, rng: np.random.Generator, *, size: int, covid: bool) -> np.ndarray:
    """One axial slice in HU, float32 ``(size, size)``."""
    a = anatomy
    s = float(size)
    level = rng.uniform(0.6, 1.0)  # lungs are smaller near apex and base
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    c, si = math.cos(a.tilt), math.sin(a.tilt)
    x = c * (xx - a.cx) + si * (yy - a.cy)  # body frame: x right, y posterior
    y = -si * (xx - a.cx) + c * (yy - a.cy)

    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = (x / a.body_a) ** 2 + (y / a.body_b) ** 2
    hu[body <= 1.0] = -100.0  # subcutaneous fat
    inner = (x / (a.body_a - 0.03)) ** 2 + (y / (a.body_b - 0.03)) ** 2 <= 1.0
    hu[inner] = 40.0 + rng.normal(0, 5)  # muscle / soft tissue

    lung = np.zeros((size, size), dtype=bool)
    lung_params = []
    for side in (-1.0, 1.0):
        lx, ly = side * a.lung_dx, -0.02
        la, lb = a.lung_a * level, a.lung_b * level
        ang = np.arctan2(y - ly, x - lx)
        wobble = 1.0 + 0.06 * np.sin(3 * ang + rng.uniform(0, 6.3))  # not a perfect ellipse
        one = ((x - lx) / la) ** 2 + ((y - ly) / lb) ** 2 <= wobble**2
        lung |= one
        lung_params.append((lx, ly, la, lb))
    # lung density with a posterior (dependent) gradient
    hu[lung] = a.lung_hu + 40.0 * np.clip(y[lung] / a.body_b + 0.5, 0, 1.5)

    heart = ((x - 0.02) / 0.1) ** 2 + ((y + 0.05) / 0.09) ** 2 <= level
    hu[heart & ~lung] = 45.0
    spine = (x / 0.05) ** 2 + ((y - a.body_b + 0.07) / 0.05) ** 2
    hu[spine <= 1.0] = 300.0
    hu[spine <= 0.55] = 650.0

    lesions = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(10, 25))):  # vessels, denser near the hilum
        lx, ly, la, lb = lung_params[int(rng.integers(0, 2))]
        t, r = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1)) * 0.9
        px, py = _to_pixels(a, lx + r * la * math.cos(t), ly + r * lb * math.sin(t), s)
        sig = rng.uniform(0.5, 1.6) * s / 256.0 * (1.3 - 0.5 * r)
        lesions += _vessel(size, py, px, sig, rng.uniform(300, 800))

    if covid:
        faint = rng.random() < 0.05
        for _ in range(1 if faint else int(rng.integers(3, 8))):
            _ggo(lesions, a, lung_params, rng, s, faint)
    else:
        _confounder(hu, lesions, a, lung, lung_params, rng, s, y)

    hu[lung] += lesions[lung]
    hu = _blur(hu, a.blur_px * s / 256.0)
    hu += rng.normal(0.0, a.noise_hu, size=hu.shape).astype(np.float32)
    return hu.astype(np.float32)


def _to_pixels(a: Anatomy, bx: float, by: float, s: float) -> tuple[float, float]:
    c, si = math.cos(a.tilt), math.sin(a.tilt)
    return (a.cx + c * bx - si * by) * s, (a.cy + si * bx + c * by) * s


def _vessel(size: int, cy: float, cx: float, sigma: float, amp: float) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    _blob(out, cy, cx, sigma, sigma, amp, 0.0)
    return out


def _ggo(
    lesions: np.ndarray,
    a: Anatomy,
    lung_params: list[tuple[float, float, float, float]],
    rng: np.random.Generator,
    s: float,
    faint: bool,
) -> None:
    """A ground-glass patch: peripheral, posterior-leaning, soft-edged, -500..-300 HU."""
    lx, ly, la, lb = lung_params[int(rng.integers(0, 2))]
    t = rng.normal(math.pi / 2, 1.0)  # +y is posterior
    r = rng.uniform(0.6, 0.92)
    px, py = _to_pixels(a, lx + r * la * math.cos(t), ly + r * lb * math.sin(t), s)
    scale = s / 256.0
    if faint:
        sig, target = rng.uniform(4.5, 7.0) * scale, rng.uniform(-600.0, -500.0)
    else:
        sig, target = rng.uniform(8.0, 22.0) * scale, rng.uniform(-480.0, -280.0)
    amp = target - a.lung_hu
    texture = 0.75 + 0.25 * rng.random()
    _blob(lesions, py, px, sig, sig * rng.uniform(1.0, 2.0), amp * texture, rng.uniform(0, 3.2))
    if not faint and rng.random() < 0.2:  # consolidated core
        _blob(lesions, py, px, sig * 0.35, sig * 0.5, rng.uniform(250.0, 450.0), 0.0)


def _confounder(
    hu: np.ndarray,
    lesions: np.ndarray,
    a: Anatomy,
    lung: np.ndarray,
    lung_params: list[tuple[float, float, float, float]],
    rng: np.random.Generator,
    s: float,
    y: np.ndarray,
) -> None:
    """Hard non_covid cases: what a lazy classifier would confuse with ground glass."""
    kind = rng.random()
    if kind < 0.12:  # dependent atelectasis: a thin dense band at the back of the lungs
        for _lx, ly, _la, lb in lung_params:
            band = lung & (y > ly + lb * rng.uniform(0.7, 0.85))
            hu[band] += rng.uniform(150.0, 300.0)
    elif kind < 0.24:  # a solid nodule: round, small, dense, anywhere in the lung
        lx, ly, la, lb = lung_params[int(rng.integers(0, 2))]
        t, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.7)
        px, py = _to_pixels(a, lx + r * la * math.cos(t), ly + r * lb * math.sin(t), s)
        sig = rng.uniform(2.0, 3.5) * s / 256.0
        _blob(lesions, py, px, sig, sig, rng.uniform(750.0, 900.0), 0.0)
    elif kind < 0.34:  # denser lungs overall (expiration, another scanner)
        hu[lung] += rng.uniform(60.0, 120.0)


def ct_dataset(
    hu: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
) -> Dataset:
    """CT Image Storage, int16 stored values with RescaleIntercept -1024, slope 1."""
    stored = np.clip(np.round(hu - INTERCEPT), -32768, 32767).astype("<i2")
    ds = image_dataset(
        CTImageStorage,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        instance_number=instance_number,
        description="fedscan synthetic",
    )
    ds.FrameOfReferenceUID = deterministic_uid("synthetic-for", patient_id)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelSpacing = [f"{350.0 / stored.shape[0]:.4f}"] * 2
    ds.SliceThickness = "1"
    ds.PixelData = stored.tobytes()
    return ds


def _patient_splits(
    n: int, rng: np.random.Generator, val_fraction: float, test_fraction: float
) -> list[str]:
    """Splits for ``n`` patients of one class: at least one test patient from 3, one
    validation patient from 5."""
    n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 5 else 0
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return [splits[i] for i in rng.permutation(n)]


def generate(
    out_dir: str | Path,
    n_per_class: int,
    seed: int = 0,
    n_patients: int | None = None,
    *,
    size: int = 256,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Path:
    """Write ``n_per_class`` slices of each class under ``out_dir`` and return the path of its
    ``index.csv``. Half the ``n_patients`` are covid, half non_covid (default ``n_per_class``:
    two slices per patient). Labels belong to patients, so with many slices per patient a
    model can learn to recognise patients instead of opacities; keep a few slices per patient
    for a set that generalises (in our check a 3-layer CNN at 112 px reached 85-89 % test
    accuracy after 10 epochs on ``generate(out, 200, n_patients=200)``, and stayed near chance
    with 10 slices per patient)."""
    n_patients = n_per_class if n_patients is None else n_patients
    if n_per_class < 1 or n_patients < 2:
        raise DatasetError("synthetic set needs n_per_class >= 1 and n_patients >= 2")
    if size < 64:
        raise DatasetError("synthetic slices need size >= 64")
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 7])
    patients = [f"SYN{seed:04d}-{p:03d}" for p in range(n_patients)]
    label_of = {pid: LABELS[i % 2] for i, pid in enumerate(patients)}
    split_of: dict[str, str] = {}
    for label in LABELS:
        group = [p for p in patients if label_of[p] == label]
        splits = _patient_splits(len(group), rng, val_fraction, test_fraction)
        split_of.update(zip(group, splits, strict=True))
    rows: list[IndexRow] = []
    for label in LABELS:
        group = [p for p in patients if label_of[p] == label]
        for i in range(n_per_class):
            pid = group[i % len(group)]
            p_index = patients.index(pid)
            anatomy = Anatomy.sample(np.random.default_rng([seed, p_index]))
            slice_rng = np.random.default_rng([seed, p_index, i])
            hu = ct_slice(anatomy, slice_rng, size=size, covid=label == "covid")
            study = deterministic_uid("synthetic", str(seed), "study", pid)
            sop = deterministic_uid("synthetic", str(seed), "sop", pid, str(i))
            ds = ct_dataset(
                hu,
                patient_id=pid,
                study_uid=study,
                series_uid=deterministic_uid("synthetic", str(seed), "series", pid),
                sop_uid=sop,
                instance_number=i // len(group) + 1,
            )
            name = f"{pid}_{i:04d}.dcm"
            rel = f"{split_of[pid]}/{label}/{name}"
            save_atomic(ds, out / rel)
            rows.append(
                IndexRow(
                    rel, split_of[pid], label, patient_key(pid, study), f"synthetic/{name}", sop
                )
            )
    return write_index(rows, out / "index.csv")
