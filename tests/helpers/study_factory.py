"""Whole synthetic studies for page tests: a chest CT series from the HU phantom (lungs, body)
and a head CT series from the real 693 sample, with patient, accession and descriptions set.

Only made-up test patients: no real patient data is ever written.

    study = new_study("Doe^Jane", "TP-001", "ACC-1001", "CT THORAX", "20240102")
    write_chest_series(inbox / "a", study, n=4, description="Lung 1.0 B70f", hu_offsets=[...])
    write_head_series(inbox / "h", study, n=2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.helpers.dicom_factory import ct_phantom, sample_path, series_from, write_ct


@dataclass(frozen=True)
class StudyTags:
    """Patient/study attributes written into every instance of a study."""

    patient_name: str
    patient_id: str
    accession: str
    description: str
    study_date: str  # DICOM DA, YYYYMMDD
    study_uid: str = field(default_factory=generate_uid)


def new_study(name: str, pid: str, accession: str, description: str, date: str) -> StudyTags:
    return StudyTags(name, pid, accession, description, date)


def _tag(path: Path, study: StudyTags, description: str, number: int, body_part: str) -> None:
    ds = pydicom.dcmread(path)
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.StudyDate = study.study_date
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesDescription = description
    ds.SeriesNumber = number
    ds.BodyPartExamined = body_part
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.save_as(path, enforce_file_format=True)


def write_chest_series(
    folder: Path,
    study: StudyTags,
    *,
    hu_offsets: Sequence[float],
    description: str = "Thorax 1.0 lung",
    number: int = 2,
) -> list[Path]:
    """One chest CT slice per HU offset (brighter slices score higher with the tiny model)."""
    series_uid = generate_uid()
    paths = []
    for i, off in enumerate(hu_offsets):
        path = write_ct(
            folder / f"{i:03d}.dcm",
            hu=ct_phantom(seed=i) + float(off),
            patient_id=study.patient_id,
            study_uid=study.study_uid,
            series_uid=series_uid,
        )
        _tag(path, study, description, number, "CHEST")
        paths.append(path)
    return paths


def write_head_series(
    folder: Path, study: StudyTags, *, n: int = 2, description: str = "Head routine"
) -> list[Path]:
    """``n`` slices of the real 693 head CT sample, as one series of ``study``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series_from(sample_path("693_UNCR.dcm"), n)):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _tag(path, study, description, 1, "HEAD")
        paths.append(path)
    return paths
