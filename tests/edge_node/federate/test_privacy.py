"""Differential privacy on updates: clipping bound, noise scale, accounted epsilon, the
update_sender hook (off by default: the delta the coordinator decodes is bit-identical)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant

from edge_node.config import config_from_dict
from edge_node.errors import ConfigError
from edge_node.federate.privacy import (
    RDP_ORDERS,
    DpParams,
    PrivacyLedger,
    clip,
    epsilon,
    l2_norm,
    privatize,
)
from fl_protocol.transport import MemoryBroker
from tests.helpers.federation import FED, ROUND, Clock, FakeCoordinator, Setup, connect


def delta_of(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.normal(0, scale, (8, 3, 3, 3))).astype(np.float32),
        "head.bias": (rng.normal(0, scale, (2,))).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }


def test_clipping_bounds_the_global_norm_and_keeps_small_updates() -> None:
    big = delta_of(0, scale=1.0)
    assert l2_norm(big) > 5.0
    clipped, norm = clip(big, 0.5)
    assert norm == pytest.approx(l2_norm(big))
    assert l2_norm(clipped) == pytest.approx(0.5, rel=1e-5)
    # the direction is kept (one common scale), integer counters are not sent
    ratio = clipped["conv.weight"] / big["conv.weight"]
    assert np.allclose(ratio, 0.5 / norm, rtol=1e-4)
    assert clipped["bn.num_batches_tracked"] == 0
    small = delta_of(1, scale=1e-3)
    kept, _ = clip(small, 0.5)
    np.testing.assert_array_equal(kept["conv.weight"], small["conv.weight"])


def test_noise_std_is_multiplier_times_clip_and_seeded() -> None:
    zero = {"w": np.zeros((200_000,), np.float32)}
    params = DpParams(clip=0.2, noise_multiplier=1.5)
    noisy, outcome = privatize(zero, params, np.random.default_rng(7))
    assert outcome.sigma == pytest.approx(0.3)
    assert float(np.std(noisy["w"])) == pytest.approx(0.3, rel=0.01)
    assert abs(float(np.mean(noisy["w"]))) < 0.003
    again, _ = privatize(zero, params, np.random.default_rng(7))
    np.testing.assert_array_equal(noisy["w"], again["w"])
    other, _ = privatize(zero, params, np.random.default_rng(8))
    assert not np.array_equal(noisy["w"], other["w"])


def test_epsilon_matches_the_rdp_accountant_and_grows_with_rounds() -> None:
    def reference(z: float, rounds: int, delta: float) -> float:
        acc = RdpAccountant(list(RDP_ORDERS))
        acc.compose(SelfComposedDpEvent(GaussianDpEvent(z / 2.0), rounds))  # sensitivity 2C
        return float(acc.get_epsilon(delta))

    for z, rounds in [(2.0, 1), (4.0, 3), (8.0, 10)]:
        assert epsilon(z, rounds, 1e-5) == pytest.approx(reference(z, rounds, 1e-5), rel=1e-9)
    # known value, independent of our wrapper: a single Gaussian with sigma/sensitivity = 1 at
    # delta 1e-5 is about epsilon 4.4 (RDP bound; the tight analytic value is ~4.2)
    assert 4.0 < epsilon(2.0, 1, 1e-5) < 5.0
    eps = [epsilon(4.0, r, 1e-5) for r in (1, 2, 5, 20)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert epsilon(4.0, 3, 1e-3) < epsilon(4.0, 3, 1e-6)  # looser delta, smaller epsilon
    assert epsilon(4.0, 0, 1e-5) == 0.0
    assert math.isinf(epsilon(0.0, 1, 1e-5))  # clipping alone is no DP


def test_ledger_counts_each_round_once_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger(path)
    ledger.record(1, 4.0)
    ledger.record(2, 4.0)
    ledger.record(2, 4.0)  # the same round again (resend) is not a second release
    assert PrivacyLedger(path).epsilon(1e-5) == pytest.approx(epsilon(4.0, 2, 1e-5))
    assert json.loads(path.read_text()) == {"rounds": {"1": 4.0, "2": 4.0}}


def test_config_validates_the_dp_fields(tmp_path: Path) -> None:
    def fed(**kw: object) -> object:
        raw = {"node_id": "n", "paths": {"inbox": "i", "state_dir": "s",
               "quarantine_dir": "q", "model_dir": "m"}, "federation": kw}  # fmt: skip
        return config_from_dict(raw, tmp_path).federation

    off = fed()
    assert (off.dp_clip, off.dp_noise_multiplier, off.dp_delta) == (None, 0.0, 1e-5)  # type: ignore[attr-defined]
    assert fed(dp_clip=1.0, dp_noise_multiplier=0.8, dp_delta=1e-6).dp_clip == 1.0  # type: ignore[attr-defined]
    for bad in (
        {"dp_clip": 0.0},
        {"dp_clip": -1.0},
        {"dp_clip": 1.0, "dp_noise_multiplier": -0.1},
        {"dp_noise_multiplier": 1.0},  # noise without a clip has no scale
        {"dp_clip": 1.0, "dp_delta": 0.0},
        {"dp_clip": 1.0, "dp_delta": 1.0},
    ):
        with pytest.raises(ConfigError):
            fed(**bad)


def sent_delta(root: Path, **fed: Any) -> tuple[dict[str, np.ndarray], Setup, object]:
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.open_round = ROUND
    setup = Setup(root, **fed)
    sender = connect(broker, setup, Clock())
    assert sender.send(sender.build(setup.manifest, setup.result, setup.global_path))
    return coord.delta(ROUND, "n1"), setup, sender


def test_dp_off_by_default_sends_the_delta_bit_identical(tmp_path: Path) -> None:
    delta, setup, sender = sent_delta(tmp_path)
    for k in setup.base:
        expected = setup.local[k].astype(np.float32) - setup.base[k].astype(np.float32)
        np.testing.assert_array_equal(delta[k], expected)
    assert sender.dp_epsilon is None  # type: ignore[attr-defined]
    assert not (tmp_path / "state" / "federation" / "privacy.json").exists()


def test_dp_on_clips_and_noises_what_the_coordinator_receives(tmp_path: Path) -> None:
    plain, _, _ = sent_delta(tmp_path / "plain")
    raw_norm = l2_norm(plain)
    clip_to = raw_norm / 4
    # no noise: the coordinator gets exactly the clipped delta
    clipped, _, sender = sent_delta(tmp_path / "clip", dp_clip=clip_to)
    assert l2_norm(clipped) == pytest.approx(clip_to, rel=1e-4)
    assert math.isinf(sender.dp_epsilon)  # type: ignore[attr-defined]
    # noise: sigma = z * clip per element, epsilon reported as a number in the log/ledger
    noisy, _, sender = sent_delta(tmp_path / "noisy", dp_clip=clip_to, dp_noise_multiplier=2.0)
    n = sum(v.size for v in noisy.values() if v.dtype.kind == "f")
    diff = np.concatenate(
        [(noisy[k] - clipped[k]).ravel() for k in noisy if noisy[k].dtype.kind == "f"]
    )
    assert float(np.std(diff)) == pytest.approx(2.0 * clip_to, rel=0.05) and n > 1000
    assert sender.dp_epsilon == pytest.approx(epsilon(2.0, 1, 1e-5))  # type: ignore[attr-defined]
    ledger = json.loads((tmp_path / "noisy" / "state" / "federation" / "privacy.json").read_text())
    assert ledger == {"rounds": {str(ROUND): 2.0}}
