"""A small labelled workstation for training tests, made from one real CT slice.

The real slice (pydicom-data ``693_UNCR.dcm``, 512x512 CT) is copied with new UIDs and a new
PatientID per copy; "covid" copies get bright ground-glass-like blobs (+500 HU) burnt into the
pixel data, so that there is something to learn and the labels are not noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from edge_node.labels import LabelBook
from tests.helpers.dicom_factory import CT_SAMPLE, sample_path


def write_slice(src: Path, dst: Path, *, patient_id: str, covid: bool, seed: int) -> str:
    """Copy the real CT slice to ``dst`` as a new slice of ``patient_id``; returns its UID."""
    ds = pydicom.dcmread(src)
    stored = ds.pixel_array.astype(np.int32)
    rng = np.random.default_rng(seed)
    rows, cols = stored.shape
    if covid:
        yy, xx = np.mgrid[0:rows, 0:cols]
        for _ in range(4):
            cy, cx = rng.integers(rows // 4, 3 * rows // 4, size=2)
            r = rng.integers(rows // 16, rows // 8)
            stored[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 500
    stored += rng.integers(-20, 21, size=stored.shape)
    ds.PixelData = np.clip(stored, -2000, 2492).astype("<i2").tobytes()
    # deterministic UIDs: the label book lists slices by UID, so the sample order (and with it a
    # seeded training trajectory) is the same in every test session
    uid = generate_uid(entropy_srcs=[patient_id, str(seed), dst.name, "sop"])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.PatientID = patient_id
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return str(uid)


@dataclass(frozen=True)
class LabelledNode:
    root: Path
    inbox: Path
    db_path: Path
    uids: tuple[str, ...]
    patients: tuple[str, ...]


def make_labelled_node(
    root: Path, *, n_patients: int = 8, slices_per_patient: int = 2, who: str = "tester"
) -> LabelledNode:
    """An inbox with ``n_patients * slices_per_patient`` labelled slices (half the patients
    covid) and their labels in ``root/state/node.sqlite`` (source ``cli``)."""
    src = sample_path(CT_SAMPLE)
    inbox = root / "inbox"
    db_path = root / "state" / "node.sqlite"
    uids: list[str] = []
    patients = [f"PAT-{i:03d}" for i in range(n_patients)]
    with LabelBook(db_path) as book:
        for p, pid in enumerate(patients):
            covid = p % 2 == 1
            for s in range(slices_per_patient):
                path = inbox / pid / f"{s}.dcm"
                uid = write_slice(src, path, patient_id=pid, covid=covid, seed=p * 100 + s)
                book.set(uid, "covid" if covid else "non_covid", who=who, source="cli", path=path)
                uids.append(uid)
    return LabelledNode(root, inbox, db_path, tuple(uids), tuple(patients))


def pick_salt(node: LabelledNode, val_fraction: float) -> str:
    """A split salt under which both sides hold both classes (deterministic search), so that
    small test sets give meaningful validation metrics."""
    from edge_node.ingest.preprocess import patient_key
    from edge_node.train.split import VAL, side_of

    for i in range(1000):
        salt = f"test-{i}"
        sides: dict[str, set[int]] = {"train": set(), "val": set()}
        n_val = 0
        for p, pid in enumerate(node.patients):
            side = side_of(patient_key(pid), salt=salt, val_fraction=val_fraction)
            sides["val" if side == VAL else "train"].add(p % 2)
            n_val += side == VAL
        if sides["train"] == {0, 1} and sides["val"] == {0, 1} and n_val <= len(node.patients) // 2:
            return salt
    raise RuntimeError("no salt gives a two-class split")
