"""Optional differential privacy on this node's updates: L2 clipping + Gaussian noise.

Off by default (``[federation] dp_clip`` unset). When on, before the delta is encoded:

1. every tensor that is sent is clipped together: ``delta * min(1, C / ||delta||_2)`` where the
   norm runs over all float tensors of the update (``C = dp_clip``); integer tensors (e.g. batch
   norm step counters) are zeroed, so nothing unclipped and un-noised leaves the node;
2. Gaussian noise ``N(0, sigma^2)`` with ``sigma = dp_noise_multiplier * C`` is added to every
   float element.

The guarantee (what epsilon means). Neighbouring inputs are two arbitrary local datasets of
this node (the node's whole contribution replaced: "node-level" / user-level DP where the user
is the hospital), so the L2 sensitivity of the clipped delta is ``2 C`` and each update is a
Gaussian mechanism with noise multiplier ``sigma / (2 C) = dp_noise_multiplier / 2`` relative
to its sensitivity. Nodes do not subsample (each participating node sends one update per
round), so there is no amplification: the rounds a node participated in compose as that many
Gaussian mechanisms, accounted with ``dp_accounting``'s RDP accountant. The epsilon at
``dp_delta`` covers everything this node published in those rounds (the update; the metrics
reports are counts on the validation split and are NOT covered). Noise is added locally, so the
guarantee holds against the coordinator and the broker too, not only against other nodes.
Record-level DP (one slice or one patient changed) is implied with the same (epsilon, delta).

The noise comes from the operating system's entropy in the daemon; a fixed seed is only for
tests and the benchmark (a known seed would let anyone subtract the noise).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_node.errors import ConfigError

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy.json"
RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256])


@dataclass(frozen=True)
class DpParams:
    """Clip norm C, noise multiplier z (sigma = z * C) and the delta epsilon is reported at."""

    clip: float
    noise_multiplier: float = 0.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        validate(self.clip, self.noise_multiplier, self.delta)

    @property
    def sigma(self) -> float:
        return self.noise_multiplier * self.clip


def validate(clip: float | None, noise_multiplier: float, delta: float) -> None:
    """ConfigError unless clip is None or > 0, noise_multiplier >= 0, 0 < delta < 1."""
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ConfigError("federation: dp_clip must be a positive number (or unset: DP off)")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError("federation: dp_noise_multiplier must be >= 0")
    if clip is None and noise_multiplier > 0:
        raise ConfigError("federation: dp_noise_multiplier needs dp_clip (noise is z * clip)")
    if not 0.0 < delta < 1.0:
        raise ConfigError("federation: dp_delta must be in (0, 1)")


@dataclass(frozen=True)
class DpOutcome:
    """What privatize did: the delta's norm before clipping and the scale applied."""

    norm: float
    scale: float
    sigma: float


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every float tensor (float64 accumulation)."""
    total = 0.0
    for value in delta.values():
        if value.dtype.kind == "f":
            total += float(np.sum(np.square(value, dtype=np.float64)))
    return math.sqrt(total)


def clip(delta: Mapping[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale all float tensors together so their global L2 norm is at most ``bound``; integer
    tensors are zeroed. Returns the clipped delta and the norm before clipping."""
    norm = l2_norm(delta)
    scale = 1.0 if norm <= bound else bound / norm
    out: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        if value.dtype.kind == "f":
            out[name] = (value.astype(np.float64) * scale).astype(value.dtype)
        else:
            out[name] = np.zeros_like(value)
    return out, norm


def privatize(
    delta: Mapping[str, np.ndarray], params: DpParams, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], DpOutcome]:
    """Clip to ``params.clip`` then add N(0, (z * clip)^2) to every float element."""
    clipped, norm = clip(delta, params.clip)
    sigma = params.sigma
    if sigma > 0:
        for name, value in clipped.items():
            if value.dtype.kind == "f":
                noise = rng.normal(0.0, sigma, size=value.shape)
                clipped[name] = (value.astype(np.float64) + noise).astype(value.dtype)
    scale = 1.0 if norm <= params.clip else params.clip / norm
    return clipped, DpOutcome(norm=norm, scale=scale, sigma=sigma)


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` updates with noise multiplier z (sigma = z * C),
    node-level replace adjacency (sensitivity 2C: effective multiplier z / 2), composed by
    the RDP accountant. 0.0 for no round; inf when z == 0 (clipping alone is not DP)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(list(RDP_ORDERS))
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier / 2.0), rounds))
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """The rounds this node sent a DP update in (``<state>/federation/privacy.json``), each
    with its noise multiplier; epsilon composes them. Holds round numbers only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rounds: dict[int, float] = self._load()

    def _load(self) -> dict[int, float]:
        try:
            raw = json.loads(self.path.read_text())
            return {int(r): float(z) for r, z in raw["rounds"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("unreadable %s; privacy ledger restarted", self.path.name)
            return {}

    def record(self, round_: int, noise_multiplier: float) -> None:
        self.rounds[round_] = noise_multiplier
        doc = {"rounds": {str(r): z for r, z in sorted(self.rounds.items())}}
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc) + "\n")
        tmp.replace(self.path)

    def epsilon(self, delta: float) -> float:
        """Epsilon over every recorded round (mixed multipliers compose exactly in RDP)."""
        if not self.rounds:
            return 0.0
        if min(self.rounds.values()) <= 0:
            return math.inf
        from dp_accounting import ComposedDpEvent, GaussianDpEvent
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant(list(RDP_ORDERS))
        events = [GaussianDpEvent(z / 2.0) for z in self.rounds.values()]
        accountant.compose(ComposedDpEvent(events))
        return float(accountant.get_epsilon(delta))
