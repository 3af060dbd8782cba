"""FedAvgM: server momentum on the weighted mean delta, checkpointable."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.errors import ConfigError
from coordinator.strategy import create_strategy, list_strategies


def _round(strategy, x, deltas):  # type: ignore[no-untyped-def]
    strategy.begin_round(x)
    for d, n in deltas:
        strategy.accumulate(d, n)
    return strategy.finish()


def test_two_rounds_follow_the_momentum_formula_and_survive_a_restart() -> None:
    """Two rounds of weighted deltas: v1 = d1, x1 = x0 + lr v1; v2 = beta v1 + d2; a fresh
    strategy loaded from state_dict continues identically; beta 0, lr 1 is plain FedAvg."""
    assert "fedavgm" in list_strategies()
    x0 = {"w": np.array([1.0, 2.0], np.float32)}
    r1 = [
        ({"w": np.array([1.0, 0.0], np.float32)}, 1),
        ({"w": np.array([0.0, 3.0], np.float32)}, 3),
    ]
    r2 = [({"w": np.array([2.0, 2.0], np.float32)}, 2)]
    s = create_strategy("fedavgm", beta=0.5, server_lr=2.0)
    x1 = _round(s, x0, r1)
    d1 = np.array([0.25, 2.25], np.float32)
    np.testing.assert_allclose(x1["w"], x0["w"] + 2.0 * d1)
    restarted = create_strategy("fedavgm", beta=0.5, server_lr=2.0)
    restarted.load_state_dict(s.state_dict())
    x2 = _round(restarted, x1, r2)
    np.testing.assert_allclose(x2["w"], x1["w"] + 2.0 * (0.5 * d1 + np.array([2.0, 2.0])))
    plain = _round(create_strategy("fedavgm", beta=0.0, server_lr=1.0), x0, r1)
    fedavg = _round(create_strategy("fedavg"), x0, r1)
    np.testing.assert_allclose(plain["w"], fedavg["w"])
    with pytest.raises(ConfigError):
        create_strategy("fedavgm", beta=1.0)
