"""One DICOM file -> model-ready frames: float32 ``(size, size)`` in [0, 1], one per frame.

Torch-free (numpy, pydicom, Pillow): the predict-only workstation runs it.

    read (full parse, completeness checks)      edge_node.ingest.dicom_decode.read_dataset
    -> usable? modality allow-list, no SEG / 1-bit, no colour unless Secondary Capture
    -> decode pixels (gdcm, openjpeg, rle, deflate, big endian)   dicom_decode.decode_pixels
    -> "hu": HU (rescale, Enhanced CT functional groups) -> lung window     ingest.intensity
       "display": 8-bit display values / 255 (SC from PNG/JPG), colour -> luminance
    -> MONOCHROME2 convention, bright = dense. MONOCHROME1 is inverted on the display path
       and for non-CT modality values; CT HU are physical values (the photometric tag applies
       after the modality LUT, to the screen), so the window already gives dense = bright and
       nothing is inverted there. The full argument is in edge_node.ingest.intensity.
    -> antialiased resize to size x size (Pillow, mode "F", bilinear = triangle filter
       scaled to the reduction, no overshoot)

Errors (each with a short ``.reason``; codes listed in edge_node.ingest.dicom_decode and here):
NotDicomError, PixelDecodeError, SkippedInput. SkippedInput reasons added here:
``modality:<MOD>`` (not in the allow-list; ``none`` when absent), ``segmentation`` (SEG SOP
class), ``bits_allocated:1``, ``color:<PHOTOMETRIC>`` (colour that is not a Secondary Capture).
NotDicomError ``bad_header``: a header value that cannot be read as what it must be (a
multi-valued Rows, say); PixelDecodeError ``palette`` (edge_node.ingest.intensity): no usable
colour LUT.

Images are stretched to a square, not padded: CT slices are square already, and the trainer
sees exactly this function's output, so train and inference agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from edge_node.config import PreprocessConfig
from edge_node.errors import ConfigError, NotDicomError, SkippedInput
from edge_node.ingest.dicom_decode import (
    _PARSE_ERRORS,
    DEFAULT_LIMITS,
    DecodeLimits,
    Source,
    decode_pixels,
    input_error,
    number_of_frames,
    read_dataset,
    transfer_syntax,
)
from edge_node.ingest.intensity import (
    apply_window,
    choose_pipeline,
    is_color,
    is_secondary_capture,
    photometric,
    to_display,
    to_hu,
    windowed,
)
from edge_node.series.chest import ChestPolicy, content_reason, header_reason, header_says_chest
from edge_node.series.header import SeriesHeader

__all__ = [
    "DecodeLimits",
    "PreparedFile",
    "PreprocessParams",
    "SliceMeta",
    "apply_window",
    "load",
    "patient_key",
    "prepare",
    "prepare_dataset",
    "read_meta",
    "resize",
    "to_display",
    "to_hu",
]

SEGMENTATION_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
ANY_MODALITY = "*"


# (window center, window width, size, texture) a model expects: one parameter set per model
PreprocessKey = tuple[float, float, int, str]


class ModelInput(Protocol):
    """What preprocessing needs to know of a model (``edge_node.serve.inference.ModelInfo``)."""

    @property
    def window_center(self) -> float | None: ...

    @property
    def window_width(self) -> float | None: ...

    @property
    def input_size(self) -> int: ...

    @property
    def texture(self) -> str: ...


class HasModelInput(Protocol):
    @property
    def info(self) -> ModelInput: ...


def model_key(model: HasModelInput, config: PreprocessConfig) -> PreprocessKey:
    """Preprocessing that ``model`` expects: its own window when its metadata has one."""
    info = model.info
    wc = info.window_center if info.window_center is not None else config.window_center
    ww = info.window_width if info.window_width is not None else config.window_width
    return (wc, ww, info.input_size, info.texture)


@dataclass(frozen=True)
class PreprocessParams:
    window_center: float = -600.0  # lung window level (HU); the model metadata overrides it
    window_width: float = 1500.0  # lung window width (HU)
    size: int = 224  # output side (model input)
    modalities: tuple[str, ...] = ("CT",)  # allow-list; "*" accepts any modality
    # Skip non-chest images (edge_node.series.chest) with reason not_chest:*; None: no check
    chest: ChestPolicy | None = None
    limits: DecodeLimits = DEFAULT_LIMITS  # DICOM bomb bounds (frames, pixels, dataset bytes)

    def __post_init__(self) -> None:
        if not self.window_width > 0:
            raise ConfigError("preprocess: window_width must be > 0")
        if self.size < 16:
            raise ConfigError("preprocess: size must be >= 16")
        if not self.modalities:
            raise ConfigError("preprocess: modalities must not be empty")
        upper = tuple(m.strip().upper() for m in self.modalities)
        object.__setattr__(self, "modalities", upper)

    @classmethod
    def from_config(cls, cfg: Any) -> PreprocessParams:
        """From ``edge_node.config.PreprocessConfig`` (or anything with the same fields)."""
        return cls(
            window_center=float(cfg.window_center),
            window_width=float(cfg.window_width),
            size=int(cfg.size),
            modalities=tuple(cfg.modalities),
            limits=DecodeLimits.from_config(cfg),
        )

    def accepts(self, modality: str) -> bool:
        return ANY_MODALITY in self.modalities or modality.upper() in self.modalities


@dataclass(frozen=True)
class SliceMeta:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_key: str  # sha256 hex of PatientID (of StudyInstanceUID when PatientID is empty)
    modality: str
    transfer_syntax: str  # UID
    n_frames: int
    photometric: str  # as stored (MONOCHROME1, MONOCHROME2, RGB, ...)
    rows: int
    cols: int
    pipeline: str  # "hu" | "display"
    # Study and series header (edge_node.series groups slices by them; the local page shows
    # them). Patient name/ID stay in the local SQLite: never logged, never sent.
    header: SeriesHeader | None = None
    lung_air: float | None = None  # chest content probe (edge_node.series.chest), hu path only


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except _PARSE_ERRORS:
        return None


def series_header(ds: Dataset) -> SeriesHeader:
    """Study/series attributes of a parsed dataset; an unreadable value reads as absent."""

    def text(keyword: str) -> str:
        try:
            return _text(ds, keyword)
        except _PARSE_ERRORS:
            return ""

    expected = _int_or_none(ds, "NumberOfSlices") or _int_or_none(ds, "ImagesInAcquisition")
    return SeriesHeader(
        patient_name=text("PatientName"),
        patient_id=text("PatientID"),
        accession_number=text("AccessionNumber"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        study_description=text("StudyDescription"),
        referring_physician=text("ReferringPhysicianName"),
        series_number=_int_or_none(ds, "SeriesNumber"),
        series_description=text("SeriesDescription"),
        body_part=text("BodyPartExamined"),
        protocol_name=text("ProtocolName"),
        expected_instances=expected if expected and expected > 0 else None,
    )


@dataclass(frozen=True)
class PreparedFile:
    meta: SliceMeta
    frames: list[np.ndarray]  # float32 (size, size) in [0, 1], MONOCHROME2 convention
    read_ms: float = 0.0  # parse time (prepare() only; 0 from prepare_dataset)
    preprocess_ms: float = 0.0  # decode + HU/window + resize


def patient_key(patient_id: str | None, study_uid: str | None = None) -> str:
    """sha256 hex of the PatientID; an empty PatientID hashes the StudyInstanceUID instead, so
    anonymised studies still group. The only patient-derived value that may leave the file."""
    pid = (patient_id or "").strip()
    basis = pid if pid else (study_uid or "").strip()
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def slice_meta(ds: Dataset) -> SliceMeta:
    """Header facts of a parsed dataset (no pixel decoding); NotDicomError("bad_header") when
    a value cannot be read as what it must be (e.g. a multi-valued Rows)."""
    try:
        return _slice_meta(ds)
    except _PARSE_ERRORS as exc:
        raise input_error(  # the type only: a value could be a patient's name
            NotDicomError, "bad_header", f"unreadable header value ({type(exc).__name__})"
        ) from exc


def _slice_meta(ds: Dataset) -> SliceMeta:
    study = _text(ds, "StudyInstanceUID")
    return SliceMeta(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        study_instance_uid=study,
        patient_key=patient_key(_text(ds, "PatientID"), study),
        modality=_text(ds, "Modality").upper(),
        transfer_syntax=transfer_syntax(ds),
        n_frames=number_of_frames(ds),
        photometric=photometric(ds),
        rows=int(ds.get("Rows") or 0),
        cols=int(ds.get("Columns") or 0),
        pipeline=choose_pipeline(ds),
        header=series_header(ds),
    )


def read_meta(path: Source) -> SliceMeta:
    """Header only (stops before the pixel data): for label ingestion and dedupe."""
    return slice_meta(read_dataset(path, stop_before_pixels=True))


def load(source: Source, limits: DecodeLimits = DEFAULT_LIMITS) -> Dataset:
    """Full parse with completeness checks (NotDicomError otherwise) within ``limits``."""
    return read_dataset(source, limits=limits)


def check_usable(ds: Dataset, meta: SliceMeta, params: PreprocessParams) -> None:
    """Raise SkippedInput for a valid DICOM object we do not predict on."""
    if not params.accepts(meta.modality):
        mod = meta.modality or "none"
        raise input_error(SkippedInput, f"modality:{mod}", f"modality {mod} not in allow-list")
    if str(ds.get("SOPClassUID") or "") == SEGMENTATION_CLASS:
        raise input_error(SkippedInput, "segmentation", "segmentation object, not an image")
    try:
        bits = int(ds.get("BitsAllocated") or 0)
    except _PARSE_ERRORS as exc:
        raise input_error(
            NotDicomError, "bad_header", f"unreadable BitsAllocated ({type(exc).__name__})"
        ) from exc
    if bits == 1:
        raise input_error(SkippedInput, "bits_allocated:1", "1-bit (binary) pixel data")
    if is_color(ds) and not is_secondary_capture(ds):
        code = meta.photometric.replace(" ", "_")
        raise input_error(SkippedInput, f"color:{code}", f"colour image ({code}), not a capture")


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of one 2-D image to ``(size, size)`` float32 (Pillow bilinear, whose
    triangle filter widens with the reduction factor; never overshoots, so [0, 1] stays)."""
    arr = np.ascontiguousarray(img, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"resize needs a 2-D image, got shape {arr.shape}")
    if arr.shape == (size, size):
        return arr.copy()
    out = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def prepare_dataset(ds: Dataset, params: PreprocessParams) -> PreparedFile:
    """`prepare` for a dataset already parsed with `load`."""
    t0 = time.perf_counter()
    meta = slice_meta(ds)
    check_usable(ds, meta, params)
    chest = params.chest if params.chest is not None and params.chest.enabled else None
    if chest is not None:
        why = header_reason(ds)
        if why is not None:
            raise _not_chest(why, meta)
    pixels = decode_pixels(ds, params.limits)
    if meta.pipeline == "hu":
        if chest is not None and not header_says_chest(ds):
            why, frac = content_reason(to_hu(ds, pixels), chest)
            meta = dataclasses.replace(meta, lung_air=round(frac, 4))
            if why is not None:
                raise _not_chest(why, meta)
        images = windowed(ds, pixels, params.window_center, params.window_width)
    else:
        images = to_display(ds, pixels)
    frames = [resize(frame, params.size) for frame in images]
    return PreparedFile(meta, frames, preprocess_ms=(time.perf_counter() - t0) * 1000.0)


def _not_chest(reason: str, meta: SliceMeta) -> SkippedInput:
    """SkippedInput for a non-chest image; ``.meta`` lets the pipeline file it in its series."""
    exc = input_error(SkippedInput, reason, "not a chest CT image")
    exc.meta = meta  # type: ignore[attr-defined]
    return exc


def prepare(source: Source, params: PreprocessParams | None = None) -> PreparedFile:
    """Read, check and preprocess every frame of one file (path or bytes)."""
    t0 = time.perf_counter()
    params = params or PreprocessParams()
    ds = load(source, params.limits)
    read_ms = (time.perf_counter() - t0) * 1000.0
    prepared = prepare_dataset(ds, params)
    return PreparedFile(
        prepared.meta, prepared.frames, read_ms=read_ms, preprocess_ms=prepared.preprocess_ms
    )
