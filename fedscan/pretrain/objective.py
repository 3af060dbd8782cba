"""The SimCLR objective: a projection head over the backbone's embedding, and the NT-Xent loss.

The projection head is trained with the backbone and thrown away afterwards (only the backbone
is written out): the loss shapes the projection, the layer below it keeps the more general
features (Chen et al. 2020, section 4.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJ_HIDDEN = 256
PROJ_DIM = 128


class Projector(nn.Module):
    """``[N, F]`` backbone features -> ``[N, 128]``: Linear(F, 256) -> ReLU -> Linear(256, 128)."""

    def __init__(self, in_features: int, hidden: int = PROJ_HIDDEN, out: int = PROJ_DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Normalised-temperature cross-entropy over ``2N`` embeddings (``z1[i]``, ``z2[i]``: the two
    views of image ``i``): each embedding must pick its partner among the other ``2N - 1`` by
    cosine similarity / temperature. Unrelated embeddings score about ``log(2N - 1)``."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"need two [N, D] batches with N >= 2, got {z1.shape} and {z2.shape}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)
