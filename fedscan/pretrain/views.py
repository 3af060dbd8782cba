"""The two random views of each slice that the contrastive objective pulls together.

Per view and image: a random resized crop (area 0.35-1 of the slice, aspect 3/4-4/3, anywhere
inside it), a rotation of up to 15 degrees about the crop's centre and a left-right flip with
p = 0.5, all as one affine resample (the style of ``edge_node.train.augment``: pixels from
outside the slice are 0, air); then brightness +-0.2 and contrast x 0.7-1.3 about the slice's
mean, gaussian noise (std 0.03) with p = 0.5, and a clamp to [0, 1].

Every draw comes from the caller's ``torch.Generator`` and the number of draws does not depend
on their values, so a seeded run is reproducible and a resumed one continues the same sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_SCALE = (0.35, 1.0)  # area of the crop as a fraction of the slice
CROP_ASPECT = (3 / 4, 4 / 3)  # width / height, drawn log-uniformly
ROTATION_DEG = 15.0
HFLIP = 0.5
BRIGHTNESS = 0.2  # added, uniform in [-b, b]
CONTRAST = (0.7, 1.3)  # factor about the slice's mean
NOISE_STD = 0.03
NOISE_P = 0.5


def _affine(u: Tensor) -> Tensor:
    """``[n, 2, 3]`` output -> input matrices (normalised coordinates) from 6 uniforms each."""
    lo, hi = CROP_SCALE
    area = lo + u[:, 0] * (hi - lo)
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    aspect = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    # half-sides of the crop in normalised units (the slice spans [-1, 1]), at most the slice
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (u[:, 2] * 2 - 1) * (1 - w)
    cy = (u[:, 3] * 2 - 1) * (1 - h)
    angle = (u[:, 4] * 2 - 1) * math.radians(ROTATION_DEG)
    flip = torch.where(u[:, 5] < HFLIP, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input = R(angle) @ diag(w * flip, h) @ output + centre
    theta = torch.stack(
        [
            torch.stack([cos * w * flip, -sin * h, cx], dim=1),
            torch.stack([sin * w * flip, cos * h, cy], dim=1),
        ],
        dim=1,
    )
    return theta.to(torch.float32)


def _view(images: Tensor, generator: torch.Generator) -> Tensor:
    n = images.shape[0]
    u = torch.rand(n, 9, generator=generator, dtype=torch.float64)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    grid = F.affine_grid(_affine(u[:, :6]), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shape = (n, 1, 1, 1)
    brightness = ((u[:, 6] * 2 - 1) * BRIGHTNESS).to(images.dtype).view(shape)
    contrast = (CONTRAST[0] + u[:, 7] * (CONTRAST[1] - CONTRAST[0])).to(images.dtype).view(shape)
    noisy = (u[:, 8] < NOISE_P).to(images.dtype).view(shape)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness + noise * (NOISE_STD * noisy)
    return out.clamp_(0.0, 1.0)


def two_views(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two independent random views of ``images`` ``[N, C, H, W]`` in [0, 1] (same shape)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    return _view(images, generator), _view(images, generator)
