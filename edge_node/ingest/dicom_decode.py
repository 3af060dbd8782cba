"""Read a DICOM file completely and decode its pixels, turning every failure into an InputError.

pydicom is lenient on purpose: a file cut off in its pixel data or before the sequence delimiter
still "reads" (the element is dropped, sometimes the whole dataset), and ``force=True`` turns any
bytes into a dataset of junk private tags. The watcher needs the opposite: a file is usable only
when it parses fully, so this module adds the checks pydicom leaves out.

Reason codes (``exc.reason``), stable and greppable:

    NotDicomError     not_dicom        no DICOM structure (no preamble and no plausible dataset)
                      truncated        DICOM header seen, but the dataset or its pixels are cut off
                                       (a partial write or a broken transfer: retry later)
                      missing_uid      no SOPInstanceUID anywhere (cannot dedupe or store)
    PixelDecodeError  pixel_decode     the decoder for this transfer syntax failed on the data
                      no_decoder       no installed plugin handles this transfer syntax
                      jpeg_header_mismatch
                                       a JPEG Lossless / JPEG-LS frame header (SOF) disagrees
                                       with the DICOM header, or has none (see check_jpeg_frames)
    SkippedInput      no_pixel_data    a valid object without an image (SR, presentation state...)
    NotDicomError     limit:file_size  the file is larger than DecodeLimits.max_dataset_bytes
                      limit:inflated   a deflated dataset (or one deflated frame) inflates past its
                                       bound: the dataset past max_dataset_bytes, a frame past
                                       the size its header gives
    PixelDecodeError  limit:frames     NumberOfFrames above DecodeLimits.max_frames
                      j2k_header_mismatch / jpeg_header_mismatch (JPEG baseline, extended)
                                       a frame's codestream (SIZ / SOF) is not the size the
                                       header gives: decoders allocate the codestream's size
                      limit:pixels     frames x rows x columns x samples above max_pixels

DICOM bombs: every bound is checked before the memory is spent. The file size before it is
read; a Deflated Explicit VR Little Endian dataset is inflated here with a cap before pydicom
parses it (pydicom would inflate it whole); deflated frames inflate with a cap of their header
size; frames and pixels are counted from the header before any decoder runs.

Messages never carry patient identifiers or paths: the caller knows the path. Nor do
pydicom's own: importing this module stops pydicom's value validation while reading (its
warning quotes the value, a malformed UID or a name, once as a log line and once as a Python
warning), silences the warning copy and withholds quoted values in the ``pydicom`` logger.

Transfer syntaxes: native (implicit/explicit little endian, explicit big endian), Deflated
Explicit VR Little Endian (pydicom inflates it while reading), JPEG Lossless and JPEG-LS
(python-gdcm), JPEG 2000 and HTJ2K (pylibjpeg-openjpeg), RLE Lossless (pylibjpeg-rle, pydicom's
own as fallback), and Deflated Image Frame Compression (1.2.840.10008.1.2.8.1, each frame raw
deflate), which pydicom 3.0 does not know and this module inflates itself.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_fragmented_frames, generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filereader import read_dataset as pydicom_read_dataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from edge_node.errors import InputError, NotDicomError, PixelDecodeError, SkippedInput

E = TypeVar("E", bound=InputError)

# Deflated Image Frame Compression (DICOM 2024c); unknown to pydicom 3.0.
DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Errors pydicom and the decoding plugins raise on bad input (no bare Exception: a bug in our
# own code must still surface as a crash in tests).
_PARSE_ERRORS = (
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    IndexError,
    OverflowError,
    NotImplementedError,
    AttributeError,
    UnicodeDecodeError,
    zlib.error,
    InvalidDicomError,
    BytesLengthException,
    struct.error,
)
# StopIteration: pydicom runs out of fragments when NumberOfFrames claims more than there are.
_DECODE_ERRORS = (*_PARSE_ERRORS, RuntimeError, MemoryError, StopIteration)

Source = str | Path | bytes
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")  # a quoted value in a pydicom message


class _WithholdValues(logging.Filter):
    """Replaces quoted values in pydicom's log messages (element values: UIDs, names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _QUOTED.sub("'<withheld>'", record.getMessage())
        record.args = ()
        return True


def quiet_pydicom() -> None:
    """No element value from pydicom reaches the logs (idempotent; run at import)."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _WithholdValues) for f in logger.filters):
        logger.addFilter(_WithholdValues())


quiet_pydicom()


@dataclass(frozen=True)
class DecodeLimits:
    """What one file may make the node read, inflate and decode (defaults: PreprocessConfig)."""

    max_frames: int = 1024  # NumberOfFrames; each frame becomes a prediction row
    max_pixels: int = 1 << 27  # frames x rows x columns x samples (512 frames of 512 x 512)
    max_dataset_bytes: int = 288 << 20  # file size, and inflated size of a deflated dataset

    def __post_init__(self) -> None:
        if min(self.max_frames, self.max_pixels, self.max_dataset_bytes) < 1:
            raise ValueError("DecodeLimits: every bound must be >= 1")

    @classmethod
    def from_config(cls, cfg: object) -> DecodeLimits:
        """From ``edge_node.config.PreprocessConfig`` (max_frames, max_pixels, max_dataset_mb)."""
        d = cls()
        mb = getattr(cfg, "max_dataset_mb", None)
        return cls(
            max_frames=int(getattr(cfg, "max_frames", d.max_frames)),
            max_pixels=int(getattr(cfg, "max_pixels", d.max_pixels)),
            max_dataset_bytes=int(mb) << 20 if mb is not None else d.max_dataset_bytes,
        )


DEFAULT_LIMITS = DecodeLimits()


def input_error(cls: type[E], reason: str, message: str) -> E:
    """An InputError subclass instance carrying its own short ``reason`` code."""
    exc = cls(message)
    exc.reason = reason
    return exc


def read_dataset(
    source: Source, *, stop_before_pixels: bool = False, limits: DecodeLimits = DEFAULT_LIMITS
) -> Dataset:
    """Parse a whole DICOM file (path or bytes) and check that it is complete.

    Files without the 128-byte preamble are accepted only when a forced parse yields a dataset
    with a numeric SOP Class UID (old ACR-NEMA style or raw datasets do exist in PACS exports);
    random bytes never do. OSError while reading the file itself (vanished, no permission)
    propagates: that is not a property of the content. A file over ``limits.max_dataset_bytes``
    is refused unread; a deflated dataset is inflated with that cap (see `inflate`).
    """
    cap = limits.max_dataset_bytes
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if size > cap:
        raise input_error(NotDicomError, "limit:file_size", f"file of {size} bytes > {cap}")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    deflated = _split_deflated(data)
    if deflated is not None:
        return _finish_read(_read_deflated(data, *deflated, stop_before_pixels, cap))
    try:
        ds: Dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = _read_forced(data, stop_before_pixels)
        _check_complete(ds, len(data), stop_before_pixels)
    except (EOFError, OSError, struct.error, BytesLengthException) as exc:
        # pydicom's "No tag to read at file position" and friends: the bytes ran out
        raise input_error(NotDicomError, "truncated", f"cut off: {_short(exc)}") from exc
    except _PARSE_ERRORS as exc:
        raise input_error(NotDicomError, "not_dicom", f"cannot parse: {_short(exc)}") from exc
    else:
        _check_complete(ds, len(data), stop_before_pixels)
    return _finish_read(ds)


def _finish_read(ds: Dataset) -> Dataset:
    _parse_fully(ds)
    if not _valid_uid(ds.get("SOPInstanceUID")):
        meta_uid = ds.file_meta.get("MediaStorageSOPInstanceUID") if ds.file_meta else None
        if meta_uid:
            ds.SOPInstanceUID = meta_uid
        elif "SOPInstanceUID" not in ds:
            raise input_error(NotDicomError, "missing_uid", "no SOPInstanceUID")
    return ds


INFLATE_CHUNK = 8 << 20  # bytes inflated per step: the peak stays at the cap, not twice it


def inflate_into(out: io.BytesIO, data: bytes | memoryview, max_bytes: int, what: str) -> int:
    """Raw deflate of ``data`` appended to ``out`` in steps, refused (NotDicomError
    "limit:inflated") as soon as the output would pass ``max_bytes``: the memory spent is
    bounded by the cap, not by the data. Returns the inflated size."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    tail = data
    try:
        while True:
            chunk = d.decompress(tail, min(INFLATE_CHUNK, max_bytes + 1 - total))
            total += len(chunk)
            if total > max_bytes:
                raise input_error(
                    NotDicomError, "limit:inflated", f"{what} inflates past {max_bytes} bytes"
                )
            out.write(chunk)
            tail = d.unconsumed_tail
            if d.eof or (not tail and not chunk):
                break
    except zlib.error as exc:
        raise input_error(NotDicomError, "not_dicom", f"{what}: {_short(exc)}") from exc
    if not d.eof:
        raise input_error(NotDicomError, "truncated", f"{what}: deflate stream cut off")
    return total


def inflate(data: bytes, max_bytes: int, what: str) -> bytes:
    """`inflate_into` returning the bytes (for frames, whose cap is their header size)."""
    out = io.BytesIO()
    inflate_into(out, data, max_bytes, what)
    return out.getvalue()


def _split_deflated(data: bytes) -> tuple[bytes | None, FileMetaDataset, int] | None:
    """(preamble, file meta, offset of the dataset) when the file meta names Deflated Explicit
    VR Little Endian; None otherwise (pydicom then reads the file as usual)."""
    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        ts = str(meta.get("TransferSyntaxUID") or "")
    except (*_PARSE_ERRORS, OSError):
        return None
    if ts != str(DeflatedExplicitVRLittleEndian):
        return None
    return preamble, meta, fp.tell()


def _read_deflated(
    data: bytes,
    preamble: bytes | None,
    meta: FileMetaDataset,
    offset: int,
    stop_before_pixels: bool,
    cap: int,
) -> Dataset:
    """What pydicom's dcmread does for a deflated dataset, with the inflation capped."""
    buffer = io.BytesIO()
    size = inflate_into(buffer, memoryview(data)[offset:], cap, "deflated dataset")
    buffer.seek(0)

    def at_pixels(tag: object, _vr: object, _length: int) -> bool:
        return stop_before_pixels and tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)

    try:
        dataset = pydicom_read_dataset(buffer, False, True, stop_when=at_pixels)
    except (EOFError, OSError, struct.error, BytesLengthException) as exc:
        raise input_error(NotDicomError, "truncated", f"cut off: {_short(exc)}") from exc
    except _PARSE_ERRORS as exc:
        raise input_error(NotDicomError, "not_dicom", f"cannot parse: {_short(exc)}") from exc
    ds = FileDataset(io.BytesIO(), dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    if preamble is None and not _UID_RE.match(str(ds.get("SOPClassUID") or "")):
        raise input_error(NotDicomError, "not_dicom", "no DICOM preamble and no SOP Class UID")
    _check_complete(ds, size, stop_before_pixels, inflated=True)
    return ds


def _check_complete(
    ds: Dataset, size: int, stop_before_pixels: bool, *, inflated: bool = False
) -> None:
    """pydicom stops quietly when the bytes run out: an element whose value ends past the end
    of the file, or a few bytes left over that cannot hold an element header, mean a cut file
    (the last top-level element is checked; nested ones are covered by parsing them).
    ``inflated``: ``size`` and the offsets refer to the inflated stream of a deflated file."""
    if len(ds) == 0:
        raise input_error(NotDicomError, "truncated", "file meta present but dataset cut off")
    try:
        if not inflated and transfer_syntax(ds) == str(DeflatedExplicitVRLittleEndian):
            return  # offsets refer to the inflated stream
        last = ds.get_item(max(ds.keys()))
    except _PARSE_ERRORS as exc:  # a corrupt raw element (unknown VR...) converted here
        raise input_error(NotDicomError, "not_dicom", f"broken element: {_short(exc)}") from exc
    if not isinstance(last, RawDataElement) or last.length == UNDEFINED_LENGTH:
        return
    end = last.value_tell + last.length
    if end > size:
        raise input_error(NotDicomError, "truncated", f"last element needs {end - size} more bytes")
    if not stop_before_pixels and 0 < size - end < 8:
        raise input_error(NotDicomError, "truncated", "partial element header at end of file")


def _read_forced(data: bytes, stop_before_pixels: bool) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except (*_PARSE_ERRORS, OSError, BytesLengthException) as exc:
        raise input_error(NotDicomError, "not_dicom", "no DICOM preamble, not a dataset") from exc
    try:
        plausible = bool(_UID_RE.match(str(ds.get("SOPClassUID") or "")))
    except _PARSE_ERRORS:
        plausible = False
    if not plausible:
        raise input_error(NotDicomError, "not_dicom", "no DICOM preamble and no SOP Class UID")
    # Group 0002 elements inline in the dataset (some writers do that) become the file meta;
    # otherwise the encoding pydicom detected names the transfer syntax.
    meta = FileMetaDataset()
    for elem in list(ds.group_dataset(0x0002)):
        meta.add(elem)
        del ds[elem.tag]
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta
    return ds


def _parse_fully(ds: Dataset) -> None:
    """Convert every raw element (recursively) so that a broken one fails now, not later."""
    try:
        for _ in ds.iterall():
            pass
    except _PARSE_ERRORS as exc:
        raise input_error(NotDicomError, "not_dicom", f"broken element: {_short(exc)}") from exc


def _valid_uid(value: object) -> bool:
    # Some de-identifiers write hex digests into UI elements (bad_sequence.dcm); any non-empty
    # printable value still identifies the instance, so only emptiness and junk bytes fail.
    if value is None:
        return False
    text = str(value).strip().rstrip("\x00")
    return bool(text) and len(text) <= 128 and (bool(_UID_RE.match(text)) or text.isprintable())


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else str(ImplicitVRLittleEndian)


def has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in _PIXEL_KEYWORDS)


def is_image_sop_class(ds: Dataset) -> bool:
    """SOP classes whose instances always carry pixel data (any "... Image Storage", SEG,
    parametric maps)."""
    meta = getattr(ds, "file_meta", None)
    try:
        uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    except _PARSE_ERRORS:  # a corrupt raw element: no class to go by
        return False
    name = UID(str(uid or "")).name
    return "Image Storage" in name or name in ("Segmentation Storage", "Parametric Map Storage")


# More frames than any real CT object has: a header claiming more is corrupt, and per-frame
# loops and arrays sized from it (2**31 - 1 is a valid IS) must not run or allocate that much.
MAX_FRAMES = 65536


def number_of_frames(ds: Dataset) -> int:
    try:
        return min(MAX_FRAMES, max(1, int(ds.get("NumberOfFrames") or 1)))
    except (TypeError, ValueError):
        return 1


def check_image_size(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Refuse (PixelDecodeError "limit:frames" / "limit:pixels") before decoding an image whose
    header asks for more frames or pixels than ``limits`` allow. Unreadable geometry is left
    to the decoding checks that follow."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        pixels = frames * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    except (*_PARSE_ERRORS, AttributeError):
        return
    if frames > limits.max_frames:
        raise input_error(
            PixelDecodeError, "limit:frames", f"{frames} frames > max_frames {limits.max_frames}"
        )
    if pixels > limits.max_pixels:
        raise input_error(
            PixelDecodeError, "limit:pixels", f"{pixels} pixels > max_pixels {limits.max_pixels}"
        )


def decode_pixels(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Stored pixel values, shape ``(frames, rows, cols)`` or ``(frames, rows, cols, 3)``.

    Native byte order; YBR colour spaces converted to RGB; nothing rescaled. Raises
    NotDicomError("truncated") when the pixel data is shorter than the header says,
    PixelDecodeError when a decoder fails or the image is over ``limits`` (checked first),
    SkippedInput("no_pixel_data") for image-less objects.
    """
    if not has_pixels(ds):
        if ("Rows" in ds and "Columns" in ds) or is_image_sop_class(ds):
            # pydicom drops an encapsulated Pixel Data element whose delimiter is missing, and
            # stops quietly at EOF inside the header: an image object without pixels was cut.
            raise input_error(NotDicomError, "truncated", "image object without pixel data")
        raise input_error(SkippedInput, "no_pixel_data", "object carries no image")
    check_image_size(ds, limits)
    ts = transfer_syntax(ds)
    if ts == DEFLATED_IMAGE_FRAME:
        _inflate_frames(ds)
        ts = str(ExplicitVRLittleEndian)
    elif "PixelData" in ds and not _is_encapsulated(ds, ts):
        _check_native_length(ds)
    elif ts in GDCM_SYNTAXES and "PixelData" in ds:
        check_jpeg_frames(ds)  # gdcm aborts the process on a mismatch: refuse before it
    elif ts in SIZED_SYNTAXES and "PixelData" in ds:
        check_frame_sizes(ds, ts)  # decoders allocate what the codestream says: a bomb
    try:
        arr = pixel_array(ds)  # not ds.pixel_array: no cached copy kept on the dataset
    except NotImplementedError as exc:
        raise input_error(
            PixelDecodeError, "no_decoder", f"no decoder for {_ts_name(ts)}: {_short(exc)}"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"{_ts_name(ts)} decode failed: {_short(exc)}"
        ) from exc
    except BaseException as exc:  # Rust decoders (pylibjpeg-rle) panic on bad data: pyo3's
        if type(exc).__name__ != "PanicException":  # PanicException is a BaseException
            raise
        raise input_error(
            PixelDecodeError, "pixel_decode", f"{_ts_name(ts)} decoder panicked: {_short(exc)}"
        ) from exc
    return _frames_first(ds, arr)


# JPEG Lossless (Process 14, and its SV1 selection) and JPEG-LS (lossless, near-lossless): with
# pylibjpeg-libjpeg absent pydicom hands these to python-gdcm, which throws a C++ gdcm::Exception
# that nothing catches (std::terminate -> SIGABRT: the whole process dies) when the frame does
# not fit the header. Found empirically (tests/edge_node/ingest/test_fuzz_dicom.py), gdcm aborts on:
#   - JPEG-LS: Rows or Columns larger than the frame's SOF height / width;
#   - JPEG Lossless: BitsAllocated 32 or 64; BitsAllocated 8 with BitsStored below the SOF
#     precision (an 8-bit frame declared 1..7 bits).
# Everything else that disagrees raised a Python error or decoded junk. check_jpeg_frames
# refuses a superset: any SOF/header disagreement, so no variant of these reaches gdcm.
GDCM_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (SV1)
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    }
)
# SOF0/SOF1 (baseline / extended DCT: some writers mislabel), SOF3 (lossless), SOF55 (JPEG-LS).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC3, 0xF7})
# Markers that stand alone (no length field): TEM, RSTn, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})
_SOS = 0xDA


@dataclass(frozen=True)
class JpegFrameHeader:
    """What a JPEG SOF segment says about one frame."""

    marker: int  # 0xC0, 0xC1, 0xC3 or 0xF7
    precision: int  # P, bits per sample
    rows: int  # Y; 0 means "defined later by a DNL marker"
    columns: int  # X
    components: int  # Nf


def jpeg_frame_header(frame: bytes) -> JpegFrameHeader | None:
    """The SOF of a JPEG / JPEG-LS codestream (the first fragment of a frame is enough: the
    marker segments before the scan are small); None when there is none before the scan."""
    if frame[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(frame)
    while i + 2 <= n:
        if frame[i] != 0xFF:
            return None  # junk between marker segments
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if i + 4 > n:
            return None
        (length,) = struct.unpack_from(">H", frame, i + 2)
        if marker in _SOF_MARKERS:
            if length < 8 or i + 10 > n:
                return None
            p, y, x, nf = struct.unpack_from(">BHHB", frame, i + 4)
            return JpegFrameHeader(marker, p, y, x, nf)
        if marker == _SOS or length < 2:
            return None  # the scan began (or a broken length) without a frame header
        i += 2 + length
    return None


def check_jpeg_frames(ds: Dataset) -> None:
    """Refuse (PixelDecodeError "jpeg_header_mismatch") a JPEG Lossless / JPEG-LS object whose
    frames gdcm could abort on: each frame's first fragment must hold a SOF whose height, width,
    component count match Rows, Columns, SamplesPerPixel, whose precision fits BitsAllocated
    (8 or 16: what gdcm's JPEG codecs produce), and, for 8-bit data, BitsStored must not be
    below that precision. A SOF height of 0 (height given by a DNL marker after the scan) cannot
    be checked against Rows without decoding, so it is refused too: safe over lenient.
    """
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        spp = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"image geometry missing: {_short(exc)}"
        ) from exc
    if bits_allocated not in (8, 16):
        raise _mismatch(f"BitsAllocated {bits_allocated} (JPEG lossless decodes to 8 or 16)")
    n = number_of_frames(ds)
    try:
        frames = list(generate_fragmented_frames(ds.PixelData, number_of_frames=n))
    except _DECODE_ERRORS as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"encapsulated frames unreadable: {_short(exc)}"
        ) from exc
    if len(frames) < n:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"{len(frames)} encapsulated frames of {n}"
        )
    for index, fragments in enumerate(frames[:n]):
        sof = jpeg_frame_header(fragments[0]) if fragments else None
        if sof is None:
            raise _mismatch(f"frame {index}: no JPEG frame header (SOF)")
        problems = []
        if sof.rows == 0:
            problems.append("height deferred to a DNL marker (unverifiable)")
        elif sof.rows != rows:
            problems.append(f"height {sof.rows} != Rows {rows}")
        if sof.columns != cols:
            problems.append(f"width {sof.columns} != Columns {cols}")
        if sof.components != spp:
            problems.append(f"{sof.components} components != SamplesPerPixel {spp}")
        if not 2 <= sof.precision <= bits_allocated:
            problems.append(f"precision {sof.precision} vs BitsAllocated {bits_allocated}")
        elif bits_allocated == 8 and bits_stored < sof.precision:
            problems.append(f"precision {sof.precision} > BitsStored {bits_stored} (8-bit)")
        if problems:
            raise _mismatch(f"frame {index}: " + "; ".join(problems))


# JPEG 2000 (incl. HTJ2K) and JPEG baseline / extended: the decoders (openjpeg, libjpeg via
# pylibjpeg or Pillow) allocate the image size their codestream declares, not Rows x Columns.
# A 100 KB JPEG 2000 frame whose SIZ said 20000 x 20000 made openjpeg decode 400 M pixels
# (2.3 GB peak) before pydicom refused the shape. check_frame_sizes refuses any frame whose
# codestream size differs from the header, so max_pixels bounds the decoders too.
J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 multi-component lossless
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
JPEG_DCT_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
SIZED_SYNTAXES = J2K_SYNTAXES | JPEG_DCT_SYNTAXES
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the start of every J2K codestream


def j2k_frame_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment (a raw
    codestream, or one inside a JP2 file); None when there is none."""
    i = frame.find(_J2K_SIZ, 0, 4096)
    if i < 0 or len(frame) < i + 4 + 38:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, i + 8)
    (csiz,) = struct.unpack_from(">H", frame, i + 4 + 36)
    if xsiz <= xosiz or ysiz <= yosiz or csiz == 0:
        return None  # not a valid SIZ
    return ysiz - yosiz, xsiz - xosiz, csiz


def check_frame_sizes(ds: Dataset, ts: str) -> None:
    """Refuse (PixelDecodeError ``j2k_header_mismatch`` / ``jpeg_header_mismatch``) a JPEG 2000
    or JPEG baseline / extended object with a frame whose codestream declares another size
    (rows, columns, components) than Rows, Columns, SamplesPerPixel (``pixel_decode`` when a
    frame has no SIZ / SOF before its data: not a codestream)."""
    try:
        want = (int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1))
    except (AttributeError, TypeError, ValueError) as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"image geometry missing: {_short(exc)}"
        ) from exc
    n = number_of_frames(ds)
    try:
        frames = list(generate_fragmented_frames(ds.PixelData, number_of_frames=n))
    except _DECODE_ERRORS as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"encapsulated frames unreadable: {_short(exc)}"
        ) from exc
    j2k = ts in J2K_SYNTAXES
    reason = "j2k_header_mismatch" if j2k else "jpeg_header_mismatch"
    for index, fragments in enumerate(frames[:n]):
        first = fragments[0] if fragments else b""
        if j2k:
            got = j2k_frame_size(first)
        else:
            sof = jpeg_frame_header(first)
            got = (sof.rows, sof.columns, sof.components) if sof is not None else None
        if got is None:  # not a codestream at all: a corrupt stream, as the decoder would say
            raise input_error(PixelDecodeError, "pixel_decode", f"frame {index}: no SIZ / SOF")
        if got != want:
            raise input_error(
                PixelDecodeError,
                reason,
                f"frame {index}: codestream {got[0]}x{got[1]}x{got[2]} != header "
                f"{want[0]}x{want[1]}x{want[2]} (rows x columns x samples)",
            )


def _mismatch(message: str) -> PixelDecodeError:
    return input_error(PixelDecodeError, "jpeg_header_mismatch", message)


def _frames_first(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    spp = int(ds.get("SamplesPerPixel") or 1)
    n = number_of_frames(ds)
    single_ndim = 2 if spp == 1 else 3
    if arr.ndim == single_ndim:
        arr = arr[np.newaxis]
    if arr.ndim != single_ndim + 1 or arr.shape[0] != n:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"decoded shape {arr.shape} does not match header"
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _is_encapsulated(ds: Dataset, ts: str) -> bool:
    try:
        return bool(UID(ts).is_encapsulated)
    except ValueError:  # not a transfer syntax pydicom knows: trust the element encoding
        return bool(ds["PixelData"].is_undefined_length)


def _check_native_length(ds: Dataset) -> None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"image geometry missing: {_short(exc)}"
        ) from exc
    n_bits = rows * cols * spp * number_of_frames(ds) * bits
    expected = (n_bits + 7) // 8
    got = len(ds.PixelData)
    if got < expected:
        raise input_error(
            NotDicomError, "truncated", f"pixel data {got} of {expected} bytes: file cut off"
        )


def _inflate_frames(ds: Dataset) -> None:
    """Deflated Image Frame Compression: each fragment-frame is raw deflate of native bytes,
    inflated with a cap of the frame size its header gives (a frame bomb stops there)."""
    n = number_of_frames(ds)
    try:
        bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        frame_bytes = (bits * int(ds.BitsAllocated) + 7) // 8
    except (*_PARSE_ERRORS, AttributeError) as exc:
        raise input_error(
            PixelDecodeError, "pixel_decode", f"image geometry missing: {_short(exc)}"
        ) from exc
    try:
        frames = [
            inflate(f, frame_bytes, "deflated frame")
            for f in generate_frames(ds.PixelData, number_of_frames=n)
        ]
    except NotDicomError as exc:
        if exc.reason == "limit:inflated":
            raise
        raise input_error(PixelDecodeError, "pixel_decode", f"deflate: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise input_error(PixelDecodeError, "pixel_decode", f"deflate: {_short(exc)}") from exc
    ds.PixelData = b"".join(frames)
    elem = ds["PixelData"]
    elem.is_undefined_length = False
    elem.VR = "OB" if int(ds.get("BitsAllocated") or 8) <= 8 else "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _check_native_length(ds)


def _ts_name(ts: str) -> str:
    name = UID(ts).name
    return name if name and name != ts else ts


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:160]
