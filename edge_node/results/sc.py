"""A Secondary Capture summary image of one series verdict, readable in any viewer.

One 8-bit MONOCHROME2 image (highdicom ``SCImage``): a text band with the verdict, score,
threshold, uncertain band, rule, model version and calibration state, above up to
``key_slices`` tiles of the slices with the highest P(covid), each labelled with its score.
It joins the source study as a new series and carries the source's patient and study
modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from edge_node.results.common import MANUFACTURER, SeriesFinding, new_uid

TILE = 256  # px per key slice
BAND = 120  # px of text above the tiles
SERIES_NUMBER = 9902


@dataclass(frozen=True)
class KeySlice:
    image: np.ndarray  # float32 (h, w) in [0, 1], lung window, bright = dense
    prob_covid: float
    verdict: str | None
    instance_number: int | None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render(finding: SeriesFinding, keys: Sequence[KeySlice]) -> np.ndarray:
    """The summary picture as uint8 (rows, cols)."""
    n = max(1, len(keys))
    cols = min(n, 2) if n <= 4 else 3
    rows = -(-n // cols)
    width = max(cols * TILE, 2 * TILE)
    canvas = Image.new("L", (width, BAND + rows * TILE), 0)
    draw = ImageDraw.Draw(canvas)
    big, small = _font(22), _font(15)
    score = "-" if finding.score is None else f"{finding.score:.3f}"
    draw.text((8, 6), f"fedscan AI: {finding.verdict.upper()}", fill=255, font=big)
    lines = [
        f"score {score}  threshold {finding.threshold:g}  band +/-{finding.uncertain_band:g}",
        f"rule {finding.rule} on {finding.n_slices_used} slice(s), model {finding.model_version}",
        finding.calibration_text,
        "Not a diagnosis: research software, review the images.",
    ]
    for i, line in enumerate(lines):
        draw.text((8, 36 + 20 * i), line[:80], fill=255, font=small)
    for i, key in enumerate(keys):
        img = np.clip(np.asarray(key.image, dtype=np.float32), 0.0, 1.0)
        tile = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8)).resize(
            (TILE, TILE), Image.Resampling.BILINEAR
        )
        x, y = (i % cols) * TILE, BAND + (i // cols) * TILE
        canvas.paste(tile, (x, y))
        label = f"P(covid) {key.prob_covid:.2f} {key.verdict or ''}"
        if key.instance_number is not None:
            label = f"#{key.instance_number}  " + label
        draw.rectangle((x, y, x + TILE - 1, y + 20), fill=0)
        draw.text((x + 4, y + 2), label, fill=255, font=small)
    return np.asarray(canvas, dtype=np.uint8)


def build_sc(finding: SeriesFinding, source: Dataset, keys: Sequence[KeySlice]) -> hd.sc.SCImage:
    """The SC of one complete series; ``source`` is one of its instances (header only)."""
    pixels = render(finding, keys)
    key = f"fedscan-sc/{finding.content_key}"

    def get(keyword: str) -> str | None:
        value = source.get(keyword)
        return None if value is None or value == "" else value

    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=new_uid(f"fedscan-sc-series/{finding.series_instance_uid}"),
        series_number=SERIES_NUMBER,
        sop_instance_uid=new_uid(key + "/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_id=get("PatientID"),
        patient_name=get("PatientName"),
        patient_birth_date=get("PatientBirthDate"),
        patient_sex=get("PatientSex"),
        accession_number=get("AccessionNumber"),
        study_id=get("StudyID"),
        study_date=get("StudyDate"),
        study_time=get("StudyTime"),
        referring_physician_name=get("ReferringPhysicianName"),
        patient_orientation=("L", "P"),  # the tiles are axial slices as the scanner gave them
    )
    sc.SeriesDescription = f"fedscan AI summary: {finding.verdict}"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # the text names the verdict, not the patient
    sc.Laterality = ""  # type 2C in General Series: empty, an axial chest is unpaired
    return sc
