"""edge_node.ingest.preprocess on real files: HU, lung window, Enhanced CT, MONOCHROME1, display
path, broken inputs, metadata, resize. Transfer syntaxes are in test_transfer_syntaxes.py."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence

from edge_node.config import PreprocessConfig
from edge_node.errors import ConfigError, NotDicomError, PixelDecodeError, SkippedInput
from edge_node.ingest.dicom_decode import decode_pixels, read_dataset
from edge_node.ingest.preprocess import (
    PreprocessParams,
    apply_window,
    patient_key,
    prepare,
    read_meta,
    resize,
    to_hu,
)
from tests.helpers.dicom_factory import (
    CT_SAMPLE,
    CT_SAMPLE_J2K,
    ENHANCED_CT_SAMPLE,
    ct_phantom,
    sample_path,
    truncated_copy,
    with_photometric,
    write_ct,
    write_garbage,
    write_secondary_capture,
)

ANY = PreprocessParams(modalities=("*",))


def _hu_of(path: Path) -> np.ndarray:
    ds = read_dataset(path)
    return to_hu(ds, decode_pixels(ds))


# --- parameters -------------------------------------------------------------------------


def test_params_defaults_match_the_contract_and_validate() -> None:
    """The defaults are the lung window of the contract; nonsense is a ConfigError."""
    p = PreprocessParams()
    assert (p.window_center, p.window_width, p.size, p.modalities) == (-600, 1500, 224, ("CT",))
    with pytest.raises(ConfigError):
        PreprocessParams(window_width=0)
    with pytest.raises(ConfigError):
        PreprocessParams(size=8)
    with pytest.raises(ConfigError):
        PreprocessParams(modalities=())
    assert PreprocessParams(modalities=("ct", "mr")).modalities == ("CT", "MR")


def test_params_from_node_config() -> None:
    """The node's [preprocess] section converts one to one."""
    cfg = PreprocessConfig(window_center=-500, window_width=1200, size=128, modalities=("CT",))
    p = PreprocessParams.from_config(cfg)
    assert (p.window_center, p.window_width, p.size, p.modalities) == (-500, 1200, 128, ("CT",))


# --- HU and the lung window on a real CT ---------------------------------------------------


def test_real_ct_slice_prepares_to_one_224_frame_in_unit_range() -> None:
    """The real 512x512 CT gives one float32 224x224 frame in [0, 1] and full metadata."""
    path = sample_path(CT_SAMPLE)
    out = prepare(path)
    ds = pydicom.dcmread(path)
    assert len(out.frames) == 1
    frame = out.frames[0]
    assert frame.dtype == np.float32 and frame.shape == (224, 224)
    assert float(frame.min()) >= 0.0 and float(frame.max()) <= 1.0
    assert float(frame.min()) == 0.0 and float(frame.max()) == 1.0  # air and bone saturate
    m = out.meta
    assert m.sop_instance_uid == ds.SOPInstanceUID
    assert m.series_instance_uid == ds.SeriesInstanceUID
    assert m.study_instance_uid == ds.StudyInstanceUID
    assert m.patient_key == hashlib.sha256(str(ds.PatientID).encode()).hexdigest()
    assert (m.modality, m.n_frames, m.rows, m.cols) == ("CT", 1, 512, 512)
    assert (m.photometric, m.pipeline) == ("MONOCHROME2", "hu")
    assert m.transfer_syntax == "1.2.840.10008.1.2.1"


def test_hu_matches_pydicom_modality_lut_on_classic_ct() -> None:
    """For a classic CT our HU equal pydicom's own modality LUT (slope/intercept)."""
    path = sample_path(CT_SAMPLE)
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    assert float(ds.RescaleIntercept) == -1024.0
    np.testing.assert_array_equal(_hu_of(path)[0], expected)


def test_window_maps_the_lung_window_linearly() -> None:
    """W1500/L-600: -1350 HU -> 0, -600 -> 0.5, +150 -> 1, beyond clipped."""
    hu = np.array([[-2000.0, -1350.0, -600.0, 150.0, 3000.0]], dtype=np.float32)
    np.testing.assert_allclose(apply_window(hu, -600, 1500), [[0, 0, 0.5, 1, 1]], atol=1e-6)
    np.testing.assert_allclose(apply_window(hu, 40, 400), [[0, 0, 0, 0.775, 1]], atol=1e-6)
    with pytest.raises(ValueError):
        apply_window(hu, 0, 0)


def test_written_hu_come_back_through_the_whole_pipeline(tmp_path: Path) -> None:
    """A file written with known HU regions gives the windowed values where regions are flat."""
    hu = np.full((512, 512), -1000.0, dtype=np.float32)
    hu[:, 256:] = -600.0  # right half at the window centre
    hu[200:300, 50:150] = 40.0
    out = prepare(write_ct(tmp_path / "a.dcm", hu=hu))
    f = out.frames[0]
    assert f[112, 200] == pytest.approx(0.5, abs=1e-5)  # -600 HU
    assert f[10, 10] == pytest.approx((-1000 + 1350) / 1500, abs=1e-5)
    assert f[110, 44] == pytest.approx((40 + 1350) / 1500, abs=1e-5)


def test_window_parameters_change_the_output(tmp_path: Path) -> None:
    """A mediastinal window (L40/W400) saturates the lungs that the lung window shows."""
    path = write_ct(tmp_path / "a.dcm", hu=ct_phantom(512, 512))
    lung = prepare(path).frames[0]
    soft = prepare(path, PreprocessParams(window_center=40, window_width=400)).frames[0]
    assert float(lung[112, 70]) > 0.2  # lung parenchyma visible in the lung window
    assert float(soft[112, 70]) == 0.0  # black in the soft-tissue window


# --- Enhanced CT ------------------------------------------------------------------------


def _fg_rescale(item: Dataset) -> tuple[float, float]:
    pvt = item.PixelValueTransformationSequence[0]
    return float(pvt.RescaleSlope), float(pvt.RescaleIntercept)


def test_enhanced_ct_rescale_from_shared_functional_groups() -> None:
    """eCT_Supplemental has no top-level rescale; the shared group says slope 1, intercept
    -1024, which pydicom does not apply and we do, on both frames."""
    path = sample_path(ENHANCED_CT_SAMPLE)
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds
    slope, intercept = _fg_rescale(ds.SharedFunctionalGroupsSequence[0])
    assert (slope, intercept) == (1.0, -1024.0)
    stored = ds.pixel_array.astype(np.float32)  # (2, 512, 512)
    hu = _hu_of(path)
    assert hu.shape == (2, 512, 512)
    np.testing.assert_array_equal(hu, stored * slope + intercept)
    out = prepare(path)
    assert len(out.frames) == 2 and out.meta.n_frames == 2 and out.meta.pipeline == "hu"
    assert not np.array_equal(out.frames[0], out.frames[1])


def test_enhanced_ct_per_frame_groups_override_shared(tmp_path: Path) -> None:
    """Per-frame Pixel Value Transformation wins over the shared one, frame by frame."""
    ds = pydicom.dcmread(sample_path(ENHANCED_CT_SAMPLE))
    per_frame = [(2.0, -2048.0), (1.0, -1000.0)]
    for item, (slope, intercept) in zip(
        ds.PerFrameFunctionalGroupsSequence, per_frame, strict=True
    ):
        pvt = Dataset()
        pvt.RescaleSlope = f"{slope:g}"
        pvt.RescaleIntercept = f"{intercept:g}"
        pvt.RescaleType = "HU"
        item.PixelValueTransformationSequence = Sequence([pvt])
    path = tmp_path / "ect_per_frame.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = ds.pixel_array.astype(np.float32)
    hu = _hu_of(path)
    for i, item in enumerate(pydicom.dcmread(path).PerFrameFunctionalGroupsSequence):
        slope, intercept = _fg_rescale(item)  # read back from the file, by hand
        np.testing.assert_array_equal(hu[i], stored[i] * slope + intercept)
    assert not np.array_equal(hu[0] - stored[0], hu[1] - stored[1])


# --- MONOCHROME1 ------------------------------------------------------------------------


def test_monochrome1_ct_with_same_hu_gives_the_monochrome2_image(tmp_path: Path) -> None:
    """HU are physical: a real CT relabelled MONOCHROME1 keeps its HU and is not inverted."""
    src = sample_path(CT_SAMPLE)
    ref = prepare(src).frames[0]
    relabelled = with_photometric(src, tmp_path / "m1.dcm", "MONOCHROME1")
    out = prepare(relabelled)
    assert out.meta.photometric == "MONOCHROME1" and out.meta.pipeline == "hu"
    np.testing.assert_array_equal(out.frames[0], ref)


def test_monochrome1_ct_with_flipped_stored_values_gives_the_monochrome2_image(
    tmp_path: Path,
) -> None:
    """Stored values flipped with a negative slope (same HU): still the same dense-bright
    image, so the output follows HU, not the stored values."""
    src = sample_path(CT_SAMPLE)
    ref = prepare(src).frames[0]
    flipped = with_photometric(src, tmp_path / "m1f.dcm", "MONOCHROME1", invert_stored=True)
    assert float(pydicom.dcmread(flipped).RescaleSlope) == -1.0
    np.testing.assert_array_equal(_hu_of(flipped), _hu_of(src))
    np.testing.assert_allclose(prepare(flipped).frames[0], ref, atol=1e-6)


def test_monochrome1_display_image_is_inverted(tmp_path: Path) -> None:
    """Display path: an 8-bit capture (real vlut_04.dcm) written MONOCHROME1 with inverted
    stored values looks like the original; relabelled only, it comes out inverted."""
    src = sample_path("vlut_04.dcm")
    ref = prepare(src, ANY)
    assert ref.meta.pipeline == "display"
    same_look = with_photometric(src, tmp_path / "inv.dcm", "MONOCHROME1", invert_stored=True)
    np.testing.assert_allclose(prepare(same_look, ANY).frames[0], ref.frames[0], atol=1e-6)
    relabelled = with_photometric(src, tmp_path / "lab.dcm", "MONOCHROME1")
    np.testing.assert_allclose(prepare(relabelled, ANY).frames[0], 1.0 - ref.frames[0], atol=1e-6)


# --- display path -----------------------------------------------------------------------


def test_secondary_capture_gray_takes_the_display_path(tmp_path: Path) -> None:
    """An 8-bit gray SC (a PNG converted to DICOM) is value / 255, no HU window."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(300, 400), dtype=np.uint8)
    out = prepare(write_secondary_capture(tmp_path / "sc.dcm", pixels))
    assert out.meta.pipeline == "display" and out.meta.modality == "CT"
    expected = resize(pixels.astype(np.float32) / 255.0, 224)
    np.testing.assert_allclose(out.frames[0], expected, atol=1e-6)


def test_secondary_capture_rgb_becomes_luminance(tmp_path: Path) -> None:
    """RGB SC -> Rec. 601 luminance, the same weights as PIL's convert("L")."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    out = prepare(write_secondary_capture(tmp_path / "rgb.dcm", rgb))
    pil_gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255.0
    assert out.meta.pipeline == "display" and out.meta.photometric == "RGB"
    np.testing.assert_allclose(out.frames[0], pil_gray, atol=1.0 / 255 + 1e-6)


def test_real_palette_secondary_capture_goes_through_its_lut() -> None:
    """OT-PAL-8-face (no preamble, PALETTE COLOR, SC) parses and maps through its palette."""
    out = prepare(sample_path("OT-PAL-8-face.dcm"), ANY)
    assert out.meta.pipeline == "display" and out.meta.photometric == "PALETTE COLOR"
    assert 0.1 < float(out.frames[0].mean()) < 0.9


# --- patient key and privacy ------------------------------------------------------------


def test_patient_key_hashes_patient_id_or_study_uid(tmp_path: Path) -> None:
    """sha256 of PatientID; with an empty PatientID, of the StudyInstanceUID."""
    assert patient_key("P1") == hashlib.sha256(b"P1").hexdigest()
    assert patient_key("", "1.2.3") == hashlib.sha256(b"1.2.3").hexdigest()
    a = write_ct(tmp_path / "a.dcm", patient_id="", study_uid="1.2.826.0.1.99", rows=32, cols=32)
    b = write_ct(tmp_path / "b.dcm", patient_id="", study_uid="1.2.826.0.1.99", rows=32, cols=32)
    assert read_meta(a).patient_key == read_meta(b).patient_key == patient_key("", "1.2.826.0.1.99")


def test_errors_never_carry_patient_identifiers(tmp_path: Path) -> None:
    """Skip/decode messages and reasons mention no PatientID or PatientName."""
    path = write_ct(tmp_path / "mr.dcm", patient_id="SECRET-ID-42", modality="MR", rows=32, cols=32)
    with pytest.raises(SkippedInput) as info:
        prepare(path)
    assert info.value.reason == "modality:MR"
    text = f"{info.value} {info.value.reason}"
    assert "SECRET" not in text and "Test^Patient" not in text and "Patient" not in text


# --- unusable and broken input ----------------------------------------------------------


def test_non_ct_is_skipped_with_its_modality_unless_allowed() -> None:
    """A real MR is skipped by default with reason modality:MR, prepared when allowed."""
    path = sample_path("emri_small.dcm")
    with pytest.raises(SkippedInput) as info:
        prepare(path)
    assert info.value.reason == "modality:MR"
    assert len(prepare(path, PreprocessParams(modalities=("CT", "MR"))).frames) == 10


def test_segmentation_is_skipped() -> None:
    """A real SEG (1-bit) is skipped even when its modality is allowed."""
    with pytest.raises(SkippedInput) as info:
        prepare(sample_path("liver.dcm"))
    assert info.value.reason == "modality:SEG"
    with pytest.raises(SkippedInput) as info:
        prepare(sample_path("liver.dcm"), ANY)
    assert info.value.reason == "segmentation"


def test_colour_that_is_not_a_capture_is_skipped() -> None:
    """A real ultrasound in palette colour is not a CT capture: skipped, reason color:..."""
    with pytest.raises(SkippedInput) as info:
        prepare(sample_path("OBXXXX1A.dcm"), ANY)
    assert info.value.reason == "color:PALETTE_COLOR"


def test_object_without_pixels_is_skipped(tmp_path: Path) -> None:
    """A valid non-image object (a Basic Text SR: no Rows, no Pixel Data) is skipped; the same
    header under an image SOP class would mean a cut file."""
    ds = pydicom.dcmread(write_ct(tmp_path / "a.dcm", rows=16, cols=16))
    for kw in ("PixelData", "Rows", "Columns"):
        delattr(ds, kw)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "SR"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(SkippedInput) as info:
        prepare(tmp_path / "sr.dcm", ANY)
    assert info.value.reason == "no_pixel_data"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.save_as(tmp_path / "ct_nopix.dcm", enforce_file_format=True)
    with pytest.raises(NotDicomError) as info2:
        prepare(tmp_path / "ct_nopix.dcm", ANY)
    assert info2.value.reason == "truncated"


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not an image\n" * 50, b"\x89PNG\r\n\x1a\n" + bytes(2000), b"DICM" * 10],
    ids=["empty", "text", "png", "dicm-words"],
)
def test_non_dicom_files_are_not_dicom(tmp_path: Path, content: bytes) -> None:
    """Empty, text, PNG and junk files raise NotDicomError(not_dicom)."""
    path = tmp_path / "x.dcm"
    path.write_bytes(content)
    with pytest.raises(NotDicomError) as info:
        prepare(path)
    assert info.value.reason == "not_dicom"


def test_random_bytes_are_not_dicom(tmp_path: Path) -> None:
    """Random bytes: a forced parse would yield private tags; we refuse them."""
    for seed in range(5):
        with pytest.raises(NotDicomError) as info:
            prepare(write_garbage(tmp_path / f"g{seed}.dcm", 5000, seed=seed))
        assert info.value.reason == "not_dicom"


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, -1], ids=["quarter", "half", "90pc", "minus1"])
def test_truncated_uncompressed_ct_is_truncated(tmp_path: Path, keep: float) -> None:
    """A real CT cut inside its pixel data (a partial write) is NotDicomError(truncated)."""
    src = sample_path(CT_SAMPLE)
    n = src.stat().st_size - 1 if keep == -1 else keep
    path = truncated_copy(src, tmp_path / "t.dcm", n)
    with pytest.raises(NotDicomError) as info:
        prepare(path)
    assert info.value.reason == "truncated"


@pytest.mark.parametrize("keep", [200, 1000, 0.5], ids=["200B", "1000B", "half"])
def test_truncated_jpeg2000_ct_is_truncated(tmp_path: Path, keep: float) -> None:
    """Cut in the header or in the encapsulated fragments: pydicom silently drops what is
    missing; we see the dataset or pixel data gone and say truncated."""
    path = truncated_copy(sample_path(CT_SAMPLE_J2K), tmp_path / "t.dcm", keep)
    with pytest.raises(NotDicomError) as info:
        prepare(path)
    assert info.value.reason == "truncated"


def test_cut_before_the_preamble_ends_is_not_dicom(tmp_path: Path) -> None:
    """Fewer than 132 bytes: no DICM marker yet, nothing to parse."""
    path = truncated_copy(sample_path(CT_SAMPLE), tmp_path / "t.dcm", 100)
    with pytest.raises(NotDicomError) as info:
        prepare(path)
    assert info.value.reason == "not_dicom"


def test_emri_too_short_is_truncated() -> None:
    """emri_small_jpeg_2k_lossless_too_short.dcm lacks the last 8 bytes (the sequence
    delimiter): pydicom warns and returns an empty dataset; we report truncated."""
    with pytest.raises(NotDicomError) as info:
        prepare(sample_path("emri_small_jpeg_2k_lossless_too_short.dcm"), ANY)
    assert info.value.reason == "truncated"


def test_bad_sequence_is_a_usable_ct() -> None:
    """bad_sequence.dcm (pydicom issue 1067): a JPEG Lossless CT whose CTDI Phantom Type Code
    Sequence is stored with VR UN in implicit encoding; pydicom recovers the sequence, the file
    is a usable CT (and its de-identified UIDs are hex digests, which we accept)."""
    path = sample_path("bad_sequence.dcm")
    out = prepare(path)
    ds = read_dataset(path)
    assert ds["CTDIPhantomTypeCodeSequence"].VR == "SQ"
    assert ds.CTDIPhantomTypeCodeSequence[0].CodeValue == "113691"
    assert out.meta.modality == "CT" and out.meta.pipeline == "hu" and len(out.frames) == 1
    assert out.meta.transfer_syntax == "1.2.840.10008.1.2.4.70"


def test_six_bit_jpeg_ls_decodes_with_pyjpegls() -> None:
    """JLSL_08_07_0_1F.dcm (JPEG-LS, 6-bit precision): gdcm refuses it, pyjpegls (MIT,
    CharLS; installed with highdicom) decodes it, so it is a real image, not an error."""
    prepared = prepare(sample_path("JLSL_08_07_0_1F.dcm"), ANY)
    assert len(prepared.frames) == 1
    frame = prepared.frames[0]
    assert frame.shape == (224, 224) and 0.0 <= frame.min() < frame.max() <= 1.0


def test_corrupt_compressed_stream_is_a_pixel_decode_error(tmp_path: Path) -> None:
    """Valid structure, garbage inside the JPEG 2000 codestream."""
    ds = pydicom.dcmread(sample_path(CT_SAMPLE_J2K))
    data = bytearray(ds.PixelData)
    data[40:4000] = bytes(len(data[40:4000]))
    ds.PixelData = bytes(data)
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    with pytest.raises(PixelDecodeError) as info:
        prepare(tmp_path / "bad.dcm")
    assert info.value.reason == "pixel_decode"


def test_no_preamble_dataset_without_instance_uid_is_refused() -> None:
    """JLSL_RGB_ILV0.dcm is a raw dataset (no preamble, no SOPInstanceUID): not storable."""
    with pytest.raises(NotDicomError) as info:
        prepare(sample_path("JLSL_RGB_ILV0.dcm"), ANY)
    assert info.value.reason == "missing_uid"


# --- metadata, bytes input, resize, torch-free ---------------------------------------------


def test_read_meta_equals_prepare_meta_for_every_pipeline(tmp_path: Path) -> None:
    """Header-only metadata agrees with the full pass (hu, display, multi-frame)."""
    sc = write_secondary_capture(tmp_path / "sc.dcm", np.zeros((64, 64), dtype=np.uint8))
    for path in (sample_path(CT_SAMPLE), sample_path(ENHANCED_CT_SAMPLE), sc):
        assert read_meta(path) == prepare(path).meta


def test_prepare_accepts_bytes() -> None:
    """Uploads arrive as bytes: same result as from the path."""
    path = sample_path(CT_SAMPLE)
    a = prepare(path)
    b = prepare(path.read_bytes())
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.frames[0], b.frames[0])


def test_resize_is_antialiased_and_keeps_range() -> None:
    """A one-pixel checkerboard shrunk to 224 averages to gray instead of aliasing."""
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    small = resize(checker, 224)
    assert small.shape == (224, 224) and small.dtype == np.float32
    assert abs(float(small.mean()) - 0.5) < 0.01
    assert float(small[8:-8, 8:-8].std()) < 0.05
    ramp = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    out = resize(ramp, 64)
    assert out.shape == (64, 64) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    same = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    np.testing.assert_array_equal(resize(same, 224), same)


def test_output_size_follows_params() -> None:
    """size=128 gives 128x128 frames."""
    out = prepare(sample_path(CT_SAMPLE), PreprocessParams(size=128))
    assert out.frames[0].shape == (128, 128)


def test_bytes_of_a_written_file_round_trip(tmp_path: Path) -> None:
    """write_ct + prepare(bytes) agree with an in-memory BytesIO read by pydicom."""
    path = write_ct(tmp_path / "a.dcm", rows=64, cols=64)
    ds = pydicom.dcmread(io.BytesIO(path.read_bytes()))
    assert prepare(path.read_bytes()).meta.sop_instance_uid == ds.SOPInstanceUID
