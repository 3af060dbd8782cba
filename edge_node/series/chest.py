"""Is this slice part of a chest CT? Header rules first, then (HU images only) its content.

The model was trained on lung CT; a head, abdomen or scout image gets a meaningless COVID
score. Each rule returns a short machine-greppable reason (``not_chest:<why>``) that the
pipeline records as the file's skip reason, before any inference:

    header   ImageType contains LOCALIZER           not_chest:localizer
             BodyPartExamined names a non-chest region   not_chest:body_part=HEAD
             ProtocolName / SeriesDescription name a non-chest region or a scout,
             without naming the chest               not_chest:protocol=... / description=...
             ConvolutionKernel is a head kernel (Siemens H30s, Hr40; "BRAIN")
                                                    not_chest:kernel=H30S
    content  (``hu`` pipeline, no header says CHEST) too little lung-like air inside the
             body: pixels at HU < -400 within the filled body outline   not_chest:no_lung_air

A header naming the chest (BodyPartExamined CHEST/LUNG/THORAX..., or the words in the
protocol/description) wins over the content probe, so apex and base slices of a chest CT,
which hold little lung, still count. A slice with no header hint is judged by its content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

# Body parts (DICOM PS3.16 CID 4031 code meanings/values, upper case) that hold lung.
CHEST_PARTS = frozenset(
    {
        "CHEST",
        "LUNG",
        "LUNGS",
        "THORAX",
        "CHESTABDOMEN",
        "CHEST_ABDOMEN",
        "CHESTABDPELVIS",
        "CHEST_ABDOMEN_PELVIS",
        "CAP",
        "TORSO",
        "WHOLEBODY",
        "WHOLE_BODY",
        "BREAST",  # axial breast CT includes lung
    }
)
_CHEST_WORDS = re.compile(r"\b(CHEST|THORAX|THORACIC|THOR|LUNGS?|PULM\w*|HRCT|CTPA|TORSO)\b")
_NOT_CHEST_WORDS = re.compile(
    r"\b(HEAD|BRAIN|SKULL|CRANI\w*|NEURO|SINUS\w*|ORBITS?|FACE|MAXILLO\w*|DENTAL|NECK|"
    r"C-?SPINE|ABDOMEN|ABD|PELVIS|LIVER|RENAL|KIDNEYS?|KNEE|ANKLE|FOOT|HAND|WRIST|ELBOW|"
    r"SHOULDER|HIP|FEMUR|EXTREMITY|SCOUT|TOPOGRAM|SCANOGRAM|SURVIEW|LOCALI[SZ]ER)\b"
)
# Reconstruction kernels only used for the head: Siemens H.. / Hr.. (H30s, Hr40), or a kernel
# named after the head or brain (Philips UB/UC are brain kernels too, but too short to trust).
_HEAD_KERNEL = re.compile(r"^HR?\d{2}[A-Z]?(\\|$)")
LUNG_AIR_HU = -400.0  # lung parenchyma and airways are below this; soft tissue is above
BODY_HU = -500.0  # the patient's outline (skin, fat, tissue) is above this


@dataclass(frozen=True)
class ChestPolicy:
    """What counts as chest (from ``[series]`` in node.toml)."""

    enabled: bool = True  # False: every usable image is predicted, as before
    min_lung_air: float = 0.05  # content probe: lung-like air / body area below this = no lung

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_lung_air < 1.0:
            raise ValueError("min_lung_air must be in [0, 1)")


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value is no hint
        return ""
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value).upper()
    return str(value).strip().upper()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Z0-9]+", "_", text).strip("_")[:32] or "empty"


def header_says_chest(ds: Dataset) -> bool:
    """True when a header field names the chest (the content probe is then not consulted)."""
    part = _text(ds, "BodyPartExamined").replace(" ", "")
    if part in CHEST_PARTS:
        return True
    words = f"{_text(ds, 'ProtocolName')} {_text(ds, 'SeriesDescription')}"
    return bool(_CHEST_WORDS.search(words))


def header_reason(ds: Dataset) -> str | None:
    """``not_chest:<why>`` when the header says this is not a chest image, else None."""
    image_type = _text(ds, "ImageType")
    if "LOCALIZER" in image_type.split("\\"):
        return "not_chest:localizer"
    part = _text(ds, "BodyPartExamined")
    if part and part.replace(" ", "") not in CHEST_PARTS:
        return f"not_chest:body_part={_slug(part)}"
    if part:  # a chest body part: protocol wording does not overrule it
        return None
    words = f"{_text(ds, 'ProtocolName')} {_text(ds, 'SeriesDescription')}"
    if _CHEST_WORDS.search(words):
        return None
    for keyword, tag in (("ProtocolName", "protocol"), ("SeriesDescription", "description")):
        hit = _NOT_CHEST_WORDS.search(_text(ds, keyword))
        if hit:
            return f"not_chest:{tag}={_slug(hit.group(0))}"
    kernel = _text(ds, "ConvolutionKernel")
    if _HEAD_KERNEL.match(kernel) or _NOT_CHEST_WORDS.search(kernel):
        return f"not_chest:kernel={_slug(kernel)}"
    return None


def lung_air_fraction(hu: np.ndarray) -> float:
    """Share of the body area (filled outline at HU > BODY_HU) that is lung-like air (HU <
    LUNG_AIR_HU): ~0.2-0.4 through the lungs, ~0 in a head or abdomen slice."""
    from scipy import ndimage

    img = np.asarray(hu, dtype=np.float32)
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    step = max(1, min(img.shape) // 128)  # 512 -> 128 px is plenty for an area ratio
    img = img[::step, ::step]
    body = img > BODY_HU
    labels, n = ndimage.label(body)
    if n == 0:
        return 0.0
    sizes = np.bincount(labels.ravel())[1:]
    outline = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
    area = int(outline.sum())
    if area == 0:
        return 0.0
    air = int((outline & (img < LUNG_AIR_HU)).sum())
    return air / area


def content_reason(hu: np.ndarray, policy: ChestPolicy) -> tuple[str | None, float]:
    """(``not_chest:no_lung_air`` or None, the measured lung-air fraction)."""
    frac = lung_air_fraction(hu)
    return ("not_chest:no_lung_air" if frac < policy.min_lung_air else None), frac
