"""Stored pixel values -> Hounsfield units -> lung window, or -> display values; all in [0, 1].

Two pipelines, chosen from the header alone (`choose_pipeline`):

``hu``
    The modality LUT gives physical values: HU = stored * RescaleSlope + RescaleIntercept
    (or the Modality LUT Sequence). For Enhanced CT the rescale lives in the functional groups,
    which pydicom 3 does not apply: per frame
    ``PerFrameFunctionalGroupsSequence[i].PixelValueTransformationSequence[0]``, else
    ``SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]``, else the top-level
    attributes, else identity. Then the lung window maps
    ``[center - width/2, center + width/2]`` linearly onto ``[0, 1]`` (clipped).

``display``
    Pixels that already are display values: a Secondary Capture made from a PNG/JPG, or any
    image without a modality transform whose BitsStored is <= 8, or colour (RGB, YBR converted
    to RGB by pydicom, PALETTE COLOR through its LUT). Gray = value / (2**BitsStored - 1)
    (signed: offset by 2**(BitsStored-1) first); colour = Rec. 601 luminance
    (0.299 R + 0.587 G + 0.114 B, the weights PIL's ``convert("L")`` uses) over the maximum
    sample value. No HU windowing: the values carry no HU, only what a screen showed.

Output convention: always MONOCHROME2, bright = dense. Where MONOCHROME1 is inverted:

* ``display`` path: yes, ``1 - v`` after scaling. In MONOCHROME1 the minimum value is shown
  white (PS3.3 C.7.6.3.1.2), so the stored display values run opposite to density.
* ``hu`` path on CT (Modality CT, or RescaleType HU): no numeric inversion, and none is needed.
  The photometric interpretation is applied after the modality and VOI LUTs, to what the screen
  shows; the modality LUT output is physical (air -1000, water 0, bone > 0) whatever the
  photometric tag says. A MONOCHROME1 CT that is written correctly therefore yields the same HU
  as its MONOCHROME2 twin, and the lung window (higher HU -> brighter) already produces the
  MONOCHROME2 convention. Inverting here would turn air white. Tests check both: a real CT
  relabelled MONOCHROME1 (same HU) and one with stored values flipped and a negative slope
  (same HU again) both give the MONOCHROME2 image.
* ``hu`` path on other modalities (only reached with a widened allow-list: MR, CR, NM...):
  their modality values are not densities, so MONOCHROME1 is inverted after windowing, as a
  screen would show it.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut

from edge_node.errors import NotDicomError, PixelDecodeError
from edge_node.ingest.dicom_decode import input_error, number_of_frames

# Secondary Capture SOP classes (single-frame and the four multi-frame ones).
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
MAX_RESCALE = 1e30  # |slope|, |intercept| above this overflow float32 pixels: a corrupt header
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()


def is_color(ds: Dataset) -> bool:
    pi = photometric(ds)
    return int(ds.get("SamplesPerPixel") or 1) > 1 or pi.startswith(("RGB", "YBR", "PALETTE"))


def is_secondary_capture(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID") or "") in SECONDARY_CAPTURE_CLASSES


def _pixel_value_transform(item: Dataset | None) -> Dataset | None:
    if item is None or "PixelValueTransformationSequence" not in item:
        return None
    seq = item.PixelValueTransformationSequence
    return seq[0] if len(seq) else None


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq is not None and len(seq) else None


def rescale_per_frame(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """``(slopes, intercepts)``, one per frame, or None when the file has no rescale at all."""
    n = number_of_frames(ds)
    shared = _pixel_value_transform(_first(ds, "SharedFunctionalGroupsSequence"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    top: Dataset | None = ds if ("RescaleSlope" in ds or "RescaleIntercept" in ds) else None
    slopes = np.ones(n, dtype=np.float64)
    intercepts = np.zeros(n, dtype=np.float64)
    found = False
    for i in range(n):
        item = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        src = _pixel_value_transform(item) or shared or top
        if src is None:
            continue
        found = True
        slopes[i] = float(src.get("RescaleSlope", 1.0) or 1.0)
        intercepts[i] = float(src.get("RescaleIntercept", 0.0) or 0.0)
    sane = (np.abs(slopes) <= MAX_RESCALE).all() and (np.abs(intercepts) <= MAX_RESCALE).all()
    if found and not sane:  # NaN, inf or absurd values would make every pixel NaN/inf
        raise input_error(NotDicomError, "bad_header", "rescale slope/intercept not finite")
    return (slopes, intercepts) if found else None


def has_modality_transform(ds: Dataset) -> bool:
    return "ModalityLUTSequence" in ds or rescale_per_frame(ds) is not None


def values_are_hu(ds: Dataset) -> bool:
    """True when the modality LUT output is Hounsfield units (CT, or RescaleType HU)."""
    modality = str(ds.get("Modality") or "").strip().upper()
    return modality == "CT" or str(ds.get("RescaleType") or "").strip().upper() == "HU"


def choose_pipeline(ds: Dataset) -> str:
    """``"hu"`` or ``"display"`` from the header alone (see the module docstring)."""
    if is_color(ds):
        return "display"
    if has_modality_transform(ds):
        return "hu"
    bits = ds.get("BitsStored")
    if (bits is not None and int(bits) <= 8) or is_secondary_capture(ds):
        return "display"
    return "hu"


def to_hu(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Modality values (HU for CT), float32 ``(frames, rows, cols)``; ``pixels`` from
    `edge_node.ingest.dicom_decode.decode_pixels`."""
    if pixels.ndim != 3:
        raise ValueError(f"to_hu needs single-sample frames, got shape {pixels.shape}")
    if "ModalityLUTSequence" in ds:
        out = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    else:
        rescale = rescale_per_frame(ds)
        out = pixels.astype(np.float32)
        if rescale is not None:
            slopes, intercepts = rescale
            if np.any(slopes != 1.0):
                out *= slopes.astype(np.float32)[:, None, None]
            if np.any(intercepts != 0.0):
                out += intercepts.astype(np.float32)[:, None, None]
    if out.dtype.kind == "f" and pixels.dtype.kind == "f":
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: ``center - width/2`` -> 0, ``center + width/2`` -> 1, clipped; float32."""
    if width <= 0:
        raise ValueError("window width must be > 0")
    lo = center - width / 2.0
    out = np.asarray(hu, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / width)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def windowed(ds: Dataset, pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """The ``hu`` pipeline: `to_hu`, `apply_window`, MONOCHROME1 rule; float32 in [0, 1]."""
    out = apply_window(to_hu(ds, pixels), center, width)
    if photometric(ds) == "MONOCHROME1" and not values_are_hu(ds):
        out = 1.0 - out
    return out


def to_display(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """The ``display`` path: float32 ``(frames, rows, cols)`` in [0, 1], MONOCHROME2 convention."""
    pi = photometric(ds)
    if pi.startswith("PALETTE"):
        try:
            rgb = np.asarray(apply_color_lut(pixels, ds))
        except (ValueError, AttributeError, KeyError, IndexError, TypeError) as exc:
            msg = f"no usable palette colour LUT ({type(exc).__name__})"
            raise input_error(PixelDecodeError, "palette", msg) from exc
        full = 255.0 if rgb.dtype == np.uint8 else 65535.0
        return _luminance(rgb, full)
    bits = int(ds.get("BitsStored") or 8)
    full = float((1 << bits) - 1)
    if pixels.ndim == 4:
        return _luminance(pixels, full)
    out = pixels.astype(np.float32)
    if pixels.dtype.kind == "i":
        out += np.float32(1 << (bits - 1))
    out *= np.float32(1.0 / full)
    np.clip(out, 0.0, 1.0, out=out)
    if pi == "MONOCHROME1":
        out = 1.0 - out
    return out


def _luminance(rgb: np.ndarray, full: float) -> np.ndarray:
    gray = rgb.astype(np.float32) @ _LUMA
    gray *= np.float32(1.0 / full)
    np.clip(gray, 0.0, 1.0, out=gray)
    return gray
