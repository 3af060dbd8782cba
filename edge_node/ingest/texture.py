"""GLCM + LBP texture features of a preprocessed slice (the paper's hand-crafted features).

Torch-free (numpy + scikit-image): the trainer and the edge inference path call the same
``texture_features`` on the same preprocessed ``(224, 224)`` float32 slice in [0, 1], and the
model concatenates the vector to its CNN embedding before the classifier.

Vector layout (``TEXTURE_DIM`` = 22, names in ``FEATURE_NAMES``):

* GLCM, 12 values: the slice quantised to 32 grey levels; symmetric, normalised co-occurrence
  matrices at distances 1 and 2 pixels and angles 0, 45, 90, 135 degrees; for each distance the
  properties contrast, dissimilarity, homogeneity, energy, correlation and ASM, averaged over
  the four angles (rotation-tolerant).
* LBP, 10 values: uniform rotation-invariant local binary patterns (P=8 neighbours, radius 1)
  of the slice as 8-bit values; histogram of the P+2 = 10 codes as fractions of the pixels.
  The codes are exactly scikit-image's ``local_binary_pattern(..., method="uniform")`` (same
  bilinear neighbours in float64, same zero border, same transition count; the tests check
  bit-equality), computed with whole-array numpy operations: ~2.3 ms instead of ~5 ms CPU per
  224x224 slice, which matters on the inference path.

Scaling, so no feature swamps the CNN embedding (fixed constants, no dataset statistics):
contrast (0 .. 31^2) -> log1p(c) / log1p(31^2); dissimilarity (0 .. 31) -> d / 31; homogeneity,
energy, ASM and the LBP fractions are already in [0, 1]; correlation is in [-1, 1] (a constant
image, whose correlation is undefined, gives 1.0 as scikit-image defines it). Every feature is
therefore in [-1, 1] and finite for any input, NaN pixels included (they count as 0).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.feature import graycomatrix, graycoprops

GLCM_LEVELS = 32  # grey levels after quantisation (the matrix is 32 x 32)
GLCM_DISTANCES: tuple[int, ...] = (1, 2)  # pixel offsets
GLCM_ANGLES: tuple[float, ...] = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_PROPS: tuple[str, ...] = (
    "contrast",
    "dissimilarity",
    "homogeneity",
    "energy",
    "correlation",
    "ASM",
)
LBP_POINTS = 8  # P: neighbours on the circle
LBP_RADIUS = 1.0  # R: circle radius in pixels
LBP_BINS = LBP_POINTS + 2  # uniform patterns 0..P plus one bin for all non-uniform ones

FEATURE_NAMES: tuple[str, ...] = (
    *(f"glcm_{prop.lower()}_d{d}" for prop in GLCM_PROPS for d in GLCM_DISTANCES),
    *(f"lbp_u{i}" for i in range(LBP_BINS)),
)
TEXTURE_DIM = len(FEATURE_NAMES)  # 22

_MAX_LEVEL = GLCM_LEVELS - 1
_SCALE = {
    "contrast": lambda v: np.log1p(v) / math.log1p(_MAX_LEVEL**2),
    "dissimilarity": lambda v: v / _MAX_LEVEL,
}


def _as_unit_slice(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 3:
        raise ValueError(f"texture_features needs one 2-D slice, got shape {arr.shape}")
    return np.clip(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def glcm_features(image: np.ndarray) -> np.ndarray:
    """The 12 scaled GLCM values (property-major, then distance) of a [0, 1] slice."""
    arr = _as_unit_slice(image)
    levels = np.minimum((arr * GLCM_LEVELS).astype(np.uint8), _MAX_LEVEL)
    glcm = graycomatrix(
        levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True
    )
    out = []
    for prop in GLCM_PROPS:
        per_distance = graycoprops(glcm, prop).mean(axis=1)  # (distances, angles) -> distances
        scale = _SCALE.get(prop)
        out.append(scale(per_distance) if scale else per_distance)
    return np.nan_to_num(np.concatenate(out), nan=0.0).astype(np.float32)


_K = np.arange(LBP_POINTS, dtype=np.float64)
# neighbour offsets exactly as scikit-image computes them (rounded to 5 decimals)
_LBP_DR = np.round(-LBP_RADIUS * np.sin(2 * np.pi * _K / LBP_POINTS), 5)
_LBP_DC = np.round(LBP_RADIUS * np.cos(2 * np.pi * _K / LBP_POINTS), 5)


def uniform_lbp(gray: np.ndarray) -> np.ndarray:
    """Uniform LBP codes (0..P+1) of a 2-D image, equal to scikit-image's
    ``local_binary_pattern(gray, 8, 1, method="uniform")``.

    Like scikit-image: neighbour i is the bilinear interpolation (float64, zero outside the
    image) at ``(r + dr_i, c + dc_i)``; bit i is ``neighbour - centre >= 0``; a pattern with at
    most 2 changes between consecutive bits 0..P-1 gets its number of ones, any other P + 1.
    """
    img = np.asarray(gray, dtype=np.float64)
    h, w = img.shape
    reach = math.ceil(LBP_RADIUS)
    pad = np.zeros((h + 2 * reach, w + 2 * reach))
    pad[reach : reach + h, reach : reach + w] = img

    def shifted(dr: int, dc: int) -> np.ndarray:
        return pad[reach + dr : reach + dr + h, reach + dc : reach + dc + w]

    rows = np.arange(h, dtype=np.float64)[:, None]
    cols = np.arange(w, dtype=np.float64)[None, :]
    ones = np.zeros((h, w), np.uint8)
    changes = np.zeros((h, w), np.uint8)
    prev: np.ndarray | None = None
    for dr_off, dc_off in zip(_LBP_DR, _LBP_DC, strict=True):
        rr, cc = rows + dr_off, cols + dc_off  # per-row / per-column, rounded as in C
        fr, fc = np.floor(rr), np.floor(cc)
        wr, wc = rr - fr, cc - fc  # interpolation weights
        r0, r1 = math.floor(dr_off), math.ceil(dr_off)
        c0, c1 = math.floor(dc_off), math.ceil(dc_off)
        if r0 == r1 and c0 == c1:  # on the pixel grid: no interpolation
            bit = shifted(r0, c0) >= img
        else:
            top = (1 - wc) * shifted(r0, c0) + wc * shifted(r0, c1)
            bottom = (1 - wc) * shifted(r1, c0) + wc * shifted(r1, c1)
            bit = ((1 - wr) * top + wr * bottom) - img >= 0
        ones += bit
        if prev is not None:
            changes += bit != prev
        prev = bit
    return np.where(changes <= 2, ones, LBP_POINTS + 1).astype(np.uint8)


def lbp_histogram(image: np.ndarray) -> np.ndarray:
    """Fractions of pixels per uniform LBP code (P=8, R=1) of a [0, 1] slice, 10 values."""
    arr = _as_unit_slice(image)
    # 8-bit values: LBP on floats flips bits on tiny differences between neighbours
    gray = np.round(arr * 255.0).astype(np.uint8)
    codes = uniform_lbp(gray)
    hist = np.bincount(codes.ravel(), minlength=LBP_BINS)[:LBP_BINS]
    return (hist / codes.size).astype(np.float32)


def texture_features(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` (or ``(1, H, W)``) float32 slice in [0, 1] -> float32 ``(TEXTURE_DIM,)``."""
    return np.concatenate([glcm_features(image), lbp_histogram(image)]).astype(np.float32)


def texture_batch(images: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` or ``[N, 1, H, W]`` slices -> float32 ``[N, TEXTURE_DIM]``."""
    arr = np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"texture_batch needs [N, H, W] or [N, 1, H, W], got {arr.shape}")
    if len(arr) == 0:
        return np.zeros((0, TEXTURE_DIM), np.float32)
    return np.stack([texture_features(a) for a in arr])
