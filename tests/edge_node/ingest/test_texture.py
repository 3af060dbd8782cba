"""GLCM + LBP texture features: same vector every time, right size, finite and bounded."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from edge_node.ingest.preprocess import PreprocessParams, prepare
from edge_node.ingest.texture import (
    FEATURE_NAMES,
    GLCM_LEVELS,
    LBP_BINS,
    TEXTURE_DIM,
    texture_batch,
    texture_features,
)
from tests.helpers.dicom_factory import CT_SAMPLE, CT_SAMPLE_J2K, ENHANCED_CT_SAMPLE, sample_path

CONTRAST_D1 = FEATURE_NAMES.index("glcm_contrast_d1")
CONTRAST_D2 = FEATURE_NAMES.index("glcm_contrast_d2")
HOMOGENEITY_D1 = FEATURE_NAMES.index("glcm_homogeneity_d1")
LBP = slice(TEXTURE_DIM - LBP_BINS, TEXTURE_DIM)


def _ct_frames() -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    for name in (CT_SAMPLE, ENHANCED_CT_SAMPLE):
        frames += prepare(sample_path(name), PreprocessParams()).frames
    return frames


def test_dimension_and_names() -> None:
    """12 GLCM values (6 properties x 2 distances) and a 10-bin uniform LBP histogram."""
    assert TEXTURE_DIM == 22 == len(FEATURE_NAMES) == len(set(FEATURE_NAMES))
    assert FEATURE_NAMES[0] == "glcm_contrast_d1" and FEATURE_NAMES[-1] == "lbp_u9"


def test_real_ct_slices_give_finite_bounded_distinct_vectors() -> None:
    """Real lung-windowed CT (plain and Enhanced CT frames): finite, in [-1, 1], per-slice."""
    frames = _ct_frames()
    assert len(frames) == 3
    feats = [texture_features(f) for f in frames]
    for v in feats:
        assert v.dtype == np.float32 and v.shape == (TEXTURE_DIM,)
        assert np.all(np.isfinite(v)) and np.all(np.abs(v) <= 1.0)
        assert math.isclose(float(v[LBP].sum()), 1.0, rel_tol=1e-5)
        assert v[CONTRAST_D2] > v[CONTRAST_D1] > 0  # further apart, less alike
    assert not np.allclose(feats[0], feats[1])


def test_deterministic_and_same_for_lossless_variants() -> None:
    """The same slice always gives the same vector, also when it arrives JPEG 2000 lossless."""
    raw = prepare(sample_path(CT_SAMPLE), PreprocessParams()).frames[0]
    j2k = prepare(sample_path(CT_SAMPLE_J2K), PreprocessParams()).frames[0]
    first = texture_features(raw)
    assert np.array_equal(first, texture_features(raw.copy()))
    assert np.array_equal(first, texture_features(raw[None]))  # (1, H, W) is accepted too
    assert np.array_equal(first, texture_features(j2k))


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_constant_images_are_finite(value: float) -> None:
    """A blank slice (undefined GLCM correlation) still gives finite, bounded features."""
    v = texture_features(np.full((224, 224), value, np.float32))
    assert np.all(np.isfinite(v)) and np.all(np.abs(v) <= 1.0)
    assert v[CONTRAST_D1] == 0.0 and v[HOMOGENEITY_D1] == pytest.approx(1.0)


def test_nan_and_out_of_range_pixels_do_not_leak() -> None:
    """NaN / inf / out-of-range pixels are clamped, never propagated into the features."""
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    img[0, 0], img[1, 1], img[2, 2], img[3, 3] = np.nan, np.inf, -3.0, 7.0
    assert np.all(np.isfinite(texture_features(img)))


def test_checkerboard_contrast_matches_hand_computation() -> None:
    """A 0/1 checkerboard: horizontal and vertical neighbours differ by 31 levels, diagonals match.

    Distance 1, mean over 0/45/90/135 degrees = (31^2 + 0 + 31^2 + 0) / 4; at distance 2 every
    offset lands on the same colour, so contrast is 0.
    """
    board = (np.indices((32, 32)).sum(axis=0) % 2).astype(np.float32)
    v = texture_features(board)
    top = (GLCM_LEVELS - 1) ** 2
    assert v[CONTRAST_D1] == pytest.approx(math.log1p(top / 2) / math.log1p(top), rel=1e-6)
    assert v[CONTRAST_D2] == 0.0


def test_batch_helper_matches_single_slices() -> None:
    frames = np.stack(_ct_frames())
    expected = np.stack([texture_features(f) for f in frames])
    assert np.array_equal(texture_batch(frames), expected)
    assert np.array_equal(texture_batch(frames[:, None]), expected)
    assert texture_batch(np.zeros((0, 224, 224), np.float32)).shape == (0, TEXTURE_DIM)
    with pytest.raises(ValueError):
        texture_features(np.zeros((2, 224, 224), np.float32))


def test_module_does_not_import_torch() -> None:
    """The inference path computes texture features without torch."""
    code = "import sys, edge_node.ingest.texture; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_lbp_codes_equal_scikit_image() -> None:
    """The vectorised LBP gives scikit-image's uniform codes bit for bit (ties included)."""
    from skimage.feature import local_binary_pattern

    from edge_node.ingest.texture import uniform_lbp

    rng = np.random.default_rng(7)
    images = [np.round(f * 255).astype(np.uint8) for f in _ct_frames()]
    for k in range(40):
        img = rng.integers(0, 256, tuple(rng.integers(3, 50, 2))).astype(np.uint8)
        images.append(img // 85 * 85 if k % 2 else img)  # few grey levels: many equal neighbours
    images.append(np.zeros((5, 7), np.uint8))
    for img in images:
        expected = local_binary_pattern(img, 8, 1, method="uniform")
        assert np.array_equal(uniform_lbp(img), expected)
