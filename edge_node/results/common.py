"""What the result builders share: the series facts they report and the source headers."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

MANUFACTURER = "fedscan"


def quiet_highdicom() -> None:
    """No header value from highdicom reaches the logs (idempotent; run at import).

    highdicom logs "copy Patient-related attributes from dataset <UID>" at INFO and warns
    with the PatientName quoted when it has one component; neither may reach the node log.
    """
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom(\.|$)")


quiet_highdicom()
# Patient and study module attributes copied from the source (type 2: present, maybe empty).
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True)
class SliceScore:
    sop_instance_uid: str
    frame: int
    prob_covid: float
    verdict: str | None


@dataclass(frozen=True)
class SeriesFinding:
    """One complete series' verdict and how it was made (what every result object states)."""

    series_instance_uid: str  # the source series
    verdict: str  # covid | non_covid | uncertain
    score: float | None
    threshold: float
    uncertain_band: float
    rule: str
    n_slices_used: int
    model_version: str
    calibrated: bool  # the model file carries a fitted threshold
    untrained: bool  # random init: the scores mean nothing
    slices: Sequence[SliceScore] = ()

    @property
    def content_key(self) -> str:
        """What the result objects say, as text: their UIDs derive from it, so the same finding
        queued again replaces itself while a changed one (a late slice) gets new UIDs."""
        score = "-" if self.score is None else f"{self.score:.6f}"
        return "/".join(
            (
                self.series_instance_uid,
                self.model_version,
                self.rule,
                self.verdict,
                score,
                str(self.n_slices_used),
                f"{self.threshold:g}",
                f"{self.uncertain_band:g}",
            )
        )

    @property
    def calibration_text(self) -> str:
        """Plain words for the model's state, as every result object shows it."""
        if self.untrained:
            return "UNTRAINED MODEL (random init): scores are meaningless"
        if not self.calibrated:
            return f"uncalibrated (default threshold {self.threshold:g})"
        return f"calibrated threshold {self.threshold:g}"


def patient_study_view(source: Dataset) -> Dataset:
    """A dataset with only the patient and study attributes of ``source`` (absent -> empty)."""
    ds = Dataset()
    for keyword in PATIENT_STUDY:
        value = source.get(keyword)
        setattr(ds, keyword, "" if value is None else value)
    return ds


def new_uid(root_entropy: str) -> UID:
    """A deterministic UID from ``root_entropy`` (the same series result -> the same UID, so an
    object enqueued twice replaces itself in the outbox)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[root_entropy])
