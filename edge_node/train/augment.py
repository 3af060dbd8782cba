"""The paper's augmentation: random rotation, flips, zoom and shift, as one affine resample.

Torch ops on a batch ``[N, 1, H, W]``; every random draw comes from the caller's
``torch.Generator``, so a seeded training run is reproducible and a resumed one continues the
same sequence (the generator state is checkpointed). Pixels moved in from outside the slice are
0 (air / black), which is what the lung window gives outside the body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentParams:
    rotation_deg: float = 15.0  # uniform in [-r, r]
    zoom: tuple[float, float] = (0.9, 1.1)  # scale factor range (>1 enlarges)
    shift: float = 0.1  # translation up to this fraction of the side, each axis
    hflip: float = 0.5  # probability of a left-right flip
    vflip: float = 0.0  # probability of an up-down flip (off: CT slices have a fixed up)

    def __post_init__(self) -> None:
        lo, hi = self.zoom
        if not 0 < lo <= hi:
            raise ValueError("zoom must be (low, high) with 0 < low <= high")
        if self.rotation_deg < 0 or not 0 <= self.shift < 1:
            raise ValueError("rotation_deg must be >= 0 and shift in [0, 1)")
        if not (0 <= self.hflip <= 1 and 0 <= self.vflip <= 1):
            raise ValueError("flip probabilities must be in [0, 1]")


def random_affine(n: int, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """``[n, 2, 3]`` matrices for ``F.affine_grid`` (output -> input normalised coordinates)."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    angle = (u[:, 0] * 2 - 1) * math.radians(params.rotation_deg)
    lo, hi = params.zoom
    scale = lo + u[:, 1] * (hi - lo)
    tx = (u[:, 2] * 2 - 1) * 2 * params.shift  # the side spans 2 in normalised coordinates
    ty = (u[:, 3] * 2 - 1) * 2 * params.shift
    fx = torch.where(u[:, 4] < params.hflip, -1.0, 1.0)
    fy = torch.where(u[:, 5] < params.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * fx, -sin * fy, tx], dim=1),
            torch.stack([sin * fx, cos * fy, ty], dim=1),
        ],
        dim=1,
    )
    return theta.to(torch.float32)


def augment_batch(images: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """A randomly rotated / flipped / zoomed / shifted copy of ``images`` (stays in [0, 1])."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    theta = random_affine(images.shape[0], params, generator)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)
