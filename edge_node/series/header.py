"""The study and series attributes of one slice, as the pipeline read them from its header.

A module of its own, importing nothing, so the store (series tables) and ingest (which fills it
from the dataset it parsed anyway) share one definition without the store importing the
decoders.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeriesHeader:
    """The study and series attributes of one slice, as text ("" when absent)."""

    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    protocol_name: str = ""
    # Instances the series will hold when a header says so (NumberOfSlices, or
    # ImagesInAcquisition); None when unknown.
    expected_instances: int | None = None
