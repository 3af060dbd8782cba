"""Every real sample in pydicom-data through edge_node.ingest.preprocess, and lossless variants of
the same image decoding to the same values (pixels, HU and prepared frames).

Small samples live in tests/fixtures/dicom (MIT, licence beside them); large ones are read from
../shared/data/dicom-samples and the test is skipped, saying so, when that folder is absent.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    RLELossless,
)

from edge_node.errors import InputError, NotDicomError, PixelDecodeError, SkippedInput
from edge_node.ingest.dicom_decode import DEFLATED_IMAGE_FRAME, decode_pixels, read_dataset
from edge_node.ingest.preprocess import PreprocessParams, prepare, to_hu
from tests.helpers.dicom_factory import CT_SAMPLE, SHARED_SAMPLES_DIR, sample_path

ANY = PreprocessParams(modalities=("*",))

# name -> (pipeline, frames) when it prepares, else (error class, reason), with a wide
# modality allow-list. Comments say what each file exercises.
EXPECTED: dict[str, tuple[object, object]] = {
    "693_J2KR.dcm": ("hu", 1),  # CT, JPEG 2000 lossless (openjpeg), codestream 16 vs BitsStored 14
    "693_UNCI.dcm": ("hu", 1),  # CT, explicit LE (uncompressed copy of a lossy J2K)
    "693_UNCR.dcm": ("hu", 1),  # CT, explicit LE
    "HTJ2KLossless_08_RGB.dcm": ("display", 1),  # HTJ2K lossless, RGB secondary capture
    "HTJ2K_08_RGB.dcm": ("display", 1),  # HTJ2K lossy, RGB secondary capture
    "JLSL_08_07_0_1F.dcm": ("display", 1),  # JPEG-LS P=6: gdcm refuses, pyjpegls (MIT) decodes
    "JLSL_16_15_1_1F.dcm": ("display", 1),  # JPEG-LS lossless 16-bit gray capture (gdcm)
    "JLSL_RGB_ILV0.dcm": (NotDicomError, "missing_uid"),  # raw dataset, no preamble, no UID
    "JLSL_RGB_ILV1.dcm": (NotDicomError, "missing_uid"),
    "JLSL_RGB_ILV2.dcm": (NotDicomError, "missing_uid"),
    "JLSN_RGB_ILV0.dcm": (NotDicomError, "missing_uid"),
    "JPEG-LL.dcm": ("display", 1),  # NM capture, JPEG Lossless SV1 (gdcm)
    "JPEG2000_UNC.dcm": ("display", 1),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ("display", 1),  # US 8-bit gray, JPEG Lossless (gdcm)
    "MR-SIEMENS-DICOM-WithOverlays.dcm": ("hu", 1),
    "MR2_J2KI.dcm": ("hu", 1),  # JPEG 2000 lossy
    "MR2_J2KR.dcm": ("hu", 1),
    "MR2_UNCI.dcm": ("hu", 1),
    "MR2_UNCR.dcm": ("hu", 1),
    "OBXXXX1A.dcm": (SkippedInput, "color:PALETTE_COLOR"),  # US palette colour
    "OBXXXX1A_2frame.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "OBXXXX1A_expb.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "OBXXXX1A_expb_2frame.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "OBXXXX1A_rle.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "OBXXXX1A_rle_2frame.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "OT-PAL-8-face.dcm": ("display", 1),  # no preamble (ACR-NEMA style), palette capture
    "RG1_J2KI.dcm": ("hu", 1),  # CR MONOCHROME1, 1955x1841
    "RG3_J2KI.dcm": ("hu", 1),
    "RG3_J2KR.dcm": ("hu", 1),
    "SC_rgb.dcm": ("display", 1),
    "SC_rgb_16bit.dcm": ("display", 1),
    "SC_rgb_16bit_2frame.dcm": ("display", 2),
    "SC_rgb_2frame.dcm": ("display", 2),
    "SC_rgb_32bit.dcm": ("display", 1),
    "SC_rgb_32bit_2frame.dcm": ("display", 2),
    "SC_rgb_dcmtk_ebcr_dcmd.dcm": ("display", 1),
    "SC_rgb_dcmtk_ebcyn1_dcmd.dcm": ("display", 1),
    "SC_rgb_dcmtk_ebcyn2_dcmd.dcm": ("display", 1),
    "SC_rgb_dcmtk_ebcynp_dcmd.dcm": ("display", 1),
    "SC_rgb_dcmtk_ebcys2_dcmd.dcm": ("display", 1),
    "SC_rgb_dcmtk_ebcys4_dcmd.dcm": ("display", 1),
    "SC_rgb_expb.dcm": ("display", 1),  # big endian
    "SC_rgb_expb_16bit.dcm": ("display", 1),
    "SC_rgb_expb_16bit_2frame.dcm": ("display", 2),
    "SC_rgb_expb_2frame.dcm": ("display", 2),
    "SC_rgb_expb_32bit.dcm": ("display", 1),
    "SC_rgb_expb_32bit_2frame.dcm": ("display", 2),
    "SC_rgb_gdcm2k_uncompressed.dcm": ("display", 1),
    "SC_ybr_full_uncompressed.dcm": ("display", 1),  # YBR_FULL converted to RGB
    "US1_J2KI.dcm": (SkippedInput, "color:YBR_ICT"),
    "US1_J2KR.dcm": (SkippedInput, "color:YBR_RCT"),
    "US1_UNCI.dcm": (SkippedInput, "color:RGB"),
    "US1_UNCR.dcm": (SkippedInput, "color:RGB"),
    "bad_sequence.dcm": ("hu", 1),  # CT, JPEG Lossless, SQ stored as UN (pydicom #1067)
    "color-pl.dcm": (SkippedInput, "color:RGB"),
    "color-px.dcm": (SkippedInput, "color:RGB"),
    "eCT_Supplemental.dcm": ("hu", 2),  # Enhanced CT, rescale in functional groups
    "emri_small.dcm": ("hu", 10),
    "emri_small_RLE.dcm": ("hu", 10),
    "emri_small_big_endian.dcm": ("hu", 10),
    "emri_small_jpeg_2k_lossless.dcm": ("hu", 10),
    "emri_small_jpeg_2k_lossless_too_short.dcm": (NotDicomError, "truncated"),
    "emri_small_jpeg_ls_lossless.dcm": ("hu", 10),
    "explicit_VR-UN.dcm": ("hu", 1),  # CT, J2K, elements with VR UN
    "gdcm-US-ALOKA-16.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "gdcm-US-ALOKA-16_big.dcm": (SkippedInput, "color:PALETTE_COLOR"),
    "liver.dcm": (SkippedInput, "segmentation"),
    "liver_deflate.dcm": (SkippedInput, "segmentation"),  # Deflated Image Frame Compression
    "liver_expb.dcm": (SkippedInput, "segmentation"),
    "liver_j2k.dcm": (SkippedInput, "segmentation"),
    "liver_nonbyte_aligned.dcm": (SkippedInput, "segmentation"),
    "liver_nonbyte_aligned_deflate.dcm": (SkippedInput, "segmentation"),
    "liver_nonbyte_aligned_j2k.dcm": (SkippedInput, "segmentation"),
    "liver_nonbyte_aligned_rle.dcm": (SkippedInput, "segmentation"),
    "liver_rle.dcm": (SkippedInput, "segmentation"),
    "mlut_18.dcm": ("hu", 1),  # Modality LUT Sequence (pydicom applies it)
    "parametric_map_double_float.dcm": ("hu", 1),  # Double Float Pixel Data
    "parametric_map_float.dcm": ("hu", 1),  # Float Pixel Data
    "vlut_04.dcm": ("display", 1),
}

# Parse but cannot be decoded with the plugins we ship (no GPL libjpeg; pydicom 3.0's RLE
# decoders reject these 1-bit SEG frames).
UNDECODABLE = {"liver_rle.dcm", "liver_nonbyte_aligned_rle.dcm"}


def test_every_shared_sample_is_in_the_table() -> None:
    """A new file in the shared folder must get an expectation here, not be silently ignored."""
    if not SHARED_SAMPLES_DIR.is_dir():
        pytest.skip(f"{SHARED_SAMPLES_DIR} absent: only the fixture copies are tested")
    names = {p.name for p in SHARED_SAMPLES_DIR.glob("*.dcm")}
    assert names - EXPECTED.keys() == set()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_prepares_or_fails_as_expected(name: str) -> None:
    """Each real sample gives its pipeline and frame count, or its error class and reason;
    frames are float32 224x224 in [0, 1]."""
    path = sample_path(name)
    first, second = EXPECTED[name]
    if isinstance(first, type) and issubclass(first, InputError):
        with pytest.raises(first) as info:
            prepare(path, ANY)
        assert info.value.reason == second
        return
    out = prepare(path, ANY)
    assert (out.meta.pipeline, len(out.frames), out.meta.n_frames) == (first, second, second)
    for frame in out.frames:
        assert frame.dtype == np.float32 and frame.shape == (224, 224)
        assert float(frame.min()) >= 0.0 and float(frame.max()) <= 1.0
        assert np.isfinite(frame).all()


@pytest.mark.parametrize(
    "name",
    sorted(n for n, (cls, _) in EXPECTED.items() if cls is SkippedInput and n not in UNDECODABLE),
)
def test_skipped_samples_still_decode(name: str) -> None:
    """Skipping is a policy, not a decode failure: their transfer syntaxes decode too."""
    ds = read_dataset(sample_path(name))
    pixels = decode_pixels(ds)
    assert pixels.shape[0] == int(ds.get("NumberOfFrames") or 1)
    assert pixels.shape[1:3] == (ds.Rows, ds.Columns)


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_samples_are_pixel_decode_errors(name: str) -> None:
    """Known gaps are clean PixelDecodeErrors, never crashes."""
    with pytest.raises(PixelDecodeError):
        decode_pixels(read_dataset(sample_path(name)))


LOSSLESS_PAIRS = [
    ("693_UNCR.dcm", "693_J2KR.dcm"),
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
    ("emri_small.dcm", "emri_small_RLE.dcm"),
    ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"),
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"),
    ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm"),
    ("OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm"),
    ("SC_rgb_16bit_2frame.dcm", "SC_rgb_expb_16bit_2frame.dcm"),
    ("SC_rgb_32bit_2frame.dcm", "SC_rgb_expb_32bit_2frame.dcm"),
    ("SC_rgb.dcm", "SC_rgb_gdcm2k_uncompressed.dcm"),
    ("US1_UNCR.dcm", "US1_J2KR.dcm"),
    ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"),
    ("liver.dcm", "liver_expb.dcm"),
    ("liver.dcm", "liver_j2k.dcm"),
    ("liver.dcm", "liver_deflate.dcm"),
]


@pytest.mark.parametrize(("ref", "other"), LOSSLESS_PAIRS, ids=[b for _, b in LOSSLESS_PAIRS])
def test_lossless_variants_decode_to_the_same_values(ref: str, other: str) -> None:
    """Same stored values, same HU, and (when usable) the same prepared frames."""
    a_ds, b_ds = read_dataset(sample_path(ref)), read_dataset(sample_path(other))
    a, b = decode_pixels(a_ds), decode_pixels(b_ds)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)
    if a.ndim == 3 and int(a_ds.BitsAllocated) > 1:
        np.testing.assert_array_equal(to_hu(a_ds, a), to_hu(b_ds, b))
    if EXPECTED[ref][0] in ("hu", "display"):
        fa, fb = prepare(sample_path(ref), ANY).frames, prepare(sample_path(other), ANY).frames
        for x, y in zip(fa, fb, strict=True):
            np.testing.assert_array_equal(x, y)


def test_jpeg_ls_rgb_interleave_modes_decode_alike() -> None:
    """The raw JPEG-LS RGB datasets (ILV 0/1/2 lossless) decode to one image; the
    near-lossless one (error bound 3) stays within 3."""

    def pixels(name: str) -> np.ndarray:
        return decode_pixels(pydicom.dcmread(sample_path(name), force=True))

    ref = pixels("JLSL_RGB_ILV0.dcm")
    for name in ("JLSL_RGB_ILV1.dcm", "JLSL_RGB_ILV2.dcm"):
        np.testing.assert_array_equal(pixels(name), ref)
    near = pixels("JLSN_RGB_ILV0.dcm").astype(np.int16)
    assert int(np.abs(near - ref.astype(np.int16)).max()) <= 3


# --- the real CT slice re-encoded in syntaxes that have no real CT sample ----------------------


def _ct_reference() -> tuple[np.ndarray, np.ndarray]:
    path = sample_path(CT_SAMPLE)
    ds = read_dataset(path)
    return to_hu(ds, decode_pixels(ds)), prepare(path).frames[0]


def _assert_same_ct(path_or_bytes: Path | bytes, syntax: str) -> None:
    hu_ref, frame_ref = _ct_reference()
    ds = read_dataset(path_or_bytes)
    assert str(ds.file_meta.TransferSyntaxUID) == syntax
    np.testing.assert_array_equal(to_hu(ds, decode_pixels(ds)), hu_ref)
    out = prepare(path_or_bytes)
    assert out.meta.transfer_syntax == syntax and out.meta.pipeline == "hu"
    np.testing.assert_array_equal(out.frames[0], frame_ref)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_real_ct_recompressed_keeps_its_hu(syntax: UID) -> None:
    """The real CT compressed by pydicom's encoders (RLE, openjpeg) gives the same HU."""
    ds = pydicom.dcmread(sample_path(CT_SAMPLE))
    ds.compress(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    _assert_same_ct(buf.getvalue(), str(syntax))


def test_real_ct_deflated_explicit_vr_keeps_its_hu() -> None:
    """Deflated Explicit VR Little Endian (whole dataset deflated)."""
    ds = pydicom.dcmread(sample_path(CT_SAMPLE))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert len(buf.getvalue()) < sample_path(CT_SAMPLE).stat().st_size
    _assert_same_ct(buf.getvalue(), str(DeflatedExplicitVRLittleEndian))


def test_real_ct_deflated_image_frame_keeps_its_hu() -> None:
    """Deflated Image Frame Compression (1.2.840.10008.1.2.8.1, each frame raw deflate),
    which pydicom 3.0 cannot decode and edge_node.ingest.dicom_decode inflates itself."""
    ds = pydicom.dcmread(sample_path(CT_SAMPLE))
    raw = ds.PixelData
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    ds.PixelData = encapsulate([packer.compress(raw) + packer.flush()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    # pydicom 3.0 refuses to write a syntax it does not know: write as JPEG 2000 Lossless
    # (also encapsulated explicit VR LE, and the same padded UID length) and swap the UID.
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    placeholder = str(JPEG2000Lossless).encode()
    assert len(placeholder) == len(DEFLATED_IMAGE_FRAME) + 1
    data = buf.getvalue().replace(placeholder, DEFLATED_IMAGE_FRAME.encode() + b"\0", 1)
    _assert_same_ct(data, DEFLATED_IMAGE_FRAME)


def test_real_ct_big_endian_keeps_its_hu(tmp_path: Path) -> None:
    """Explicit VR Big Endian (retired, still found in archives): bytes swapped on disk."""
    ds = pydicom.dcmread(sample_path(CT_SAMPLE))
    pixels = ds.pixel_array
    ds.PixelData = pixels.astype(">i2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = tmp_path / "be.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False)
    _assert_same_ct(path, str(ExplicitVRBigEndian))


def test_cut_anywhere_is_refused_or_complete() -> None:
    """A real file cut at any of many offsets is NotDicomError (truncated / not_dicom), or,
    when only the trailing sequence delimiter is missing, gives exactly the full frames."""
    for name in (CT_SAMPLE, "693_J2KR.dcm", "eCT_Supplemental.dcm", "emri_small_RLE.dcm"):
        data = sample_path(name).read_bytes()
        full = prepare(data, ANY).frames
        cuts = set(range(0, 2400, 61)) | set(np.linspace(2400, len(data) - 1, 25).astype(int))
        cuts |= {len(data) - k for k in range(1, 10)}
        for n in sorted(cuts):
            try:
                frames = prepare(data[:n], ANY).frames
            except NotDicomError as exc:
                assert exc.reason in ("truncated", "not_dicom"), (name, n, exc.reason)
                continue
            assert len(data) - n <= 8, (name, n)  # only the delimiter item may be missing
            for x, y in zip(frames, full, strict=True):
                np.testing.assert_array_equal(x, y)
