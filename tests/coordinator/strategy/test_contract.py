"""Every registered strategy keeps the same contract, whatever its math: built by name with its
defaults, it returns every key of the global model with its shape and dtype, leaves the global
model alone when all nodes send zero deltas, streams the same result as it aggregates, never
modifies its inputs, and its state survives a restart through state_dict."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pytest

from coordinator.strategy import Strategy, create_strategy, list_strategies

NODES = 4  # enough for the trimmed mean to trim


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(2,)).astype(np.float32),
    }


def _deltas(scale: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in _global().items()}
        for _ in range(NODES)
    ]


def _run(strategy: Strategy, deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    strategy.begin_round(_global())
    for i, delta in enumerate(deltas):
        strategy.accumulate(delta, 10 + i)
    return dict(strategy.finish())


class _Source:
    """An in-memory update (the UpdateSource protocol the spool implements)."""

    def __init__(self, delta: Mapping[str, np.ndarray], num_samples: int) -> None:
        self.delta = dict(delta)
        self.num_samples = num_samples

    def keys(self) -> list[str]:
        return list(self.delta)

    def tensor(self, key: str) -> np.ndarray:
        return self.delta[key]

    def load(self) -> dict[str, np.ndarray]:
        return dict(self.delta)


@pytest.mark.parametrize("name", list_strategies())
def test_built_by_name_with_defaults(name: str) -> None:
    """create_strategy(name) gives a Strategy whose name is that name; its round config for the
    nodes is plain JSON."""
    strategy = create_strategy(name)
    assert isinstance(strategy, Strategy) and strategy.name == name
    json.dumps(strategy.round_config())


@pytest.mark.parametrize("name", list_strategies())
def test_zero_deltas_keep_the_global_model(name: str) -> None:
    """Nodes that all send zero deltas leave every weight as it was (shape and dtype too)."""
    out = _run(create_strategy(name), _deltas(0.0))
    assert set(out) == set(_global())
    for key, want in _global().items():
        assert out[key].shape == want.shape and out[key].dtype == want.dtype
        np.testing.assert_allclose(out[key], want, atol=1e-6)


@pytest.mark.parametrize("name", list_strategies())
def test_inputs_untouched_and_result_finite(name: str) -> None:
    """Aggregating real deltas modifies neither the global weights nor the deltas, and every
    new weight is finite."""
    deltas = _deltas(0.1)
    copies = [{k: v.copy() for k, v in d.items()} for d in deltas]
    strategy = create_strategy(name)
    glob = _global()
    strategy.begin_round(glob)
    for i, delta in enumerate(deltas):
        strategy.accumulate(delta, 10 + i)
    out = strategy.finish()
    for key, value in _global().items():
        np.testing.assert_array_equal(glob[key], value)
    for delta, copy in zip(deltas, copies, strict=True):
        for key in delta:
            np.testing.assert_array_equal(delta[key], copy[key])
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("name", list_strategies())
def test_aggregate_over_sources_equals_streaming(name: str) -> None:
    """aggregate() over update sources gives what begin_round/accumulate/finish give."""
    deltas = _deltas(0.1)
    streamed = _run(create_strategy(name), deltas)
    sources = [_Source(d, 10 + i) for i, d in enumerate(deltas)]
    aggregated = create_strategy(name).aggregate(_global(), sources)
    for key in streamed:
        np.testing.assert_allclose(aggregated[key], streamed[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list_strategies())
def test_state_survives_a_restart(name: str) -> None:
    """A strategy restored from state_dict after round 1 computes the same round 2 as the one
    that kept running."""
    running = create_strategy(name)
    _run(running, _deltas(0.1))
    restored = create_strategy(name)
    restored.load_state_dict(running.state_dict())
    second = _deltas(0.05)
    a, b = _run(running, second), _run(restored, second)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)
