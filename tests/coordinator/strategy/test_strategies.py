"""Aggregation strategies: exact math against hand computations, streaming memory, robustness."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.errors import ConfigError, StateError, UnknownStrategyError
from coordinator.spool import SpoolFile, load_tensors, save_tensors
from coordinator.strategy import Strategy, create_strategy, list_strategies
from coordinator.strategy.fedadam import FedAdam
from coordinator.strategy.fedavg import FedAvg
from coordinator.strategy.trimmed_mean import TrimmedMean
from fl_protocol import codecs


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "fc.bias": rng.normal(size=(2,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _delta(rng: np.random.Generator, scale: float = 0.1, batches: int = 3) -> dict[str, np.ndarray]:
    return {
        "conv.weight": (scale * rng.normal(size=(4, 3))).astype(np.float32),
        "fc.bias": (scale * rng.normal(size=(2,))).astype(np.float32),
        "bn.num_batches_tracked": np.array(batches, dtype=np.float32),
    }


class _Generated:
    """An update source that builds its delta only when loaded (for memory measurements)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, n: int) -> None:
        self.shapes, self.seed, self._n = shapes, seed, n

    @property
    def num_samples(self) -> int:
        return self._n

    def keys(self) -> list[str]:
        return list(self.shapes)

    def tensor(self, key: str) -> np.ndarray:
        rng = np.random.default_rng((self.seed, list(self.shapes).index(key)))
        return rng.normal(size=self.shapes[key]).astype(np.float32)

    def load(self) -> dict[str, np.ndarray]:
        return {k: self.tensor(k) for k in self.shapes}


def test_registry_lists_the_builtins_and_refuses_unknown_names() -> None:
    """Every built-in is registered; an unknown name says which names exist."""
    assert {"fedavg", "fedprox", "fedadam", "trimmed_mean"} <= set(list_strategies())
    with pytest.raises(UnknownStrategyError, match=r"fedavg.*trimmed_mean"):
        create_strategy("krum")
    with pytest.raises(ConfigError, match="bad arguments"):
        create_strategy("fedavg", trim_ratio=0.1)
    with pytest.raises(ConfigError):
        create_strategy("trimmed_mean", trim_ratio=0.7)


def test_fedavg_is_the_sample_weighted_mean_computed_by_hand() -> None:
    """Three nodes with 10, 30 and 60 samples: new = global + (10 d1 + 30 d2 + 60 d3) / 100."""
    rng = np.random.default_rng(0)
    g = _model(rng)
    deltas = [_delta(rng, batches=b) for b in (2, 5, 3)]
    ns = [10, 30, 60]
    s = create_strategy("fedavg")
    s.begin_round(g)
    for d, n in zip(deltas, ns, strict=True):
        s.accumulate(d, n)
    out = s.finish()
    for key in ("conv.weight", "fc.bias"):
        by_hand = g[key] + (10 * deltas[0][key] + 30 * deltas[1][key] + 60 * deltas[2][key]) / 100
        np.testing.assert_allclose(out[key], by_hand, rtol=1e-6, atol=1e-7)
        assert out[key].dtype == np.float32
    # the counter advances by the largest number of batches any node ran, stays an integer
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert int(out["bn.num_batches_tracked"]) == 7 + 5
    # the global weights handed in are not modified
    assert int(g["bn.num_batches_tracked"]) == 7


def test_fedavg_unweighted_and_partial_updates() -> None:
    """A tensor sent by only some nodes is averaged over those; one sent by none is unchanged."""
    g = {"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32)}
    s = FedAvg(weighted=False)
    s.begin_round(g)
    s.accumulate({"a": np.full(3, 1.0, np.float32)}, 100)
    s.accumulate({"a": np.full(3, 3.0, np.float32)}, 1)
    out = s.finish()
    np.testing.assert_allclose(out["a"], 2.0)
    np.testing.assert_array_equal(out["b"], g["b"])


def test_fedprox_aggregates_like_fedavg_and_sends_mu() -> None:
    """FedProx is FedAvg on the server; its mu goes into the round config for the nodes."""
    rng = np.random.default_rng(1)
    g = _model(rng)
    deltas = [_delta(rng) for _ in range(3)]
    prox, avg = create_strategy("fedprox", mu=0.05), create_strategy("fedavg")
    assert prox.round_config() == {"mu": 0.05}
    assert avg.round_config() == {}
    results = []
    for s in (prox, avg):
        s.begin_round(g)
        for i, d in enumerate(deltas):
            s.accumulate(d, i + 1)
        results.append(s.finish())
    for key in g:
        np.testing.assert_array_equal(results[0][key], results[1][key])


def test_fedadam_steps_match_the_papers_formula() -> None:
    """Two server steps of Reddi et al. Algorithm 2, written out independently here."""
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x = np.array([1.0, -2.0, 0.5], np.float32)
    g: dict[str, np.ndarray] = {"w": x, "steps": np.array(0, np.int64)}
    s = FedAdam(eta=eta, beta1=b1, beta2=b2, tau=tau)
    m = np.zeros(3)
    v = np.full(3, tau**2)
    xs = x.astype(np.float64)
    rounds = [
        [(np.array([0.2, 0.0, -0.1]), 1), (np.array([0.4, 0.1, -0.3]), 3)],
        [(np.array([-0.1, 0.2, 0.0]), 2), (np.array([0.3, 0.2, 0.1]), 2)],
    ]
    for updates in rounds:
        s.begin_round(g)
        for d, n in updates:
            s.accumulate({"w": d.astype(np.float32)}, n)
        out = s.finish()
        mean_delta = sum(d * n for d, n in updates) / sum(n for _, n in updates)
        m = b1 * m + (1 - b1) * mean_delta  # paper: m_t with Delta_t = mean delta
        v = b2 * v + (1 - b2) * mean_delta**2
        xs = xs + eta * m / (np.sqrt(v) + tau)  # x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
        np.testing.assert_allclose(out["w"], xs, rtol=1e-5, atol=1e-6)
        g = {"w": out["w"], "steps": out["steps"]}
    assert s.steps == 2


def test_fedadam_moments_survive_a_restart_through_state_dict(tmp_path: Path) -> None:
    """A new FedAdam loaded from the checkpointed state continues the same trajectory."""
    rng = np.random.default_rng(2)
    g = _model(rng)
    d1, d2 = _delta(rng), _delta(rng)
    a = FedAdam()
    a.begin_round(g)
    a.accumulate(d1, 5)
    g1 = a.finish()
    save_tensors(tmp_path / "strategy.safetensors", a.state_dict())
    a.begin_round(g1)
    a.accumulate(d2, 5)
    expected = a.finish()

    b = FedAdam()
    b.load_state_dict(SpoolFile(tmp_path / "strategy.safetensors", 1).load())
    b.begin_round(g1)
    b.accumulate(d2, 5)
    got = b.finish()
    for key in g:
        np.testing.assert_array_equal(got[key], expected[key])


def test_trimmed_mean_ignores_one_poisoned_update() -> None:
    """Four honest nodes and one sending 1e6: trimmed mean stays near the honest mean, FedAvg
    does not."""
    rng = np.random.default_rng(3)
    g = {"w": np.zeros(1000, np.float32)}
    honest = [{"w": (0.01 + 0.001 * rng.normal(size=1000)).astype(np.float32)} for _ in range(4)]
    poisoned = {"w": np.full(1000, 1e6, np.float32)}
    trimmed, avg = TrimmedMean(trim_ratio=0.2), FedAvg()
    for s in (trimmed, avg):
        s.begin_round(g)
        for d in [*honest[:2], poisoned, *honest[2:]]:
            s.accumulate(d, 10)
    robust, naive = trimmed.finish()["w"], avg.finish()["w"]
    assert np.abs(robust - 0.01).max() < 0.005
    assert naive.min() > 1e5


def test_trimmed_mean_from_the_spool_equals_in_memory(tmp_path: Path) -> None:
    """Tensor-by-tensor aggregation from spool files gives the in-memory result."""
    rng = np.random.default_rng(4)
    g = _model(rng)
    deltas = [_delta(rng, batches=i) for i in range(6)]
    files = []
    for i, d in enumerate(deltas):
        save_tensors(tmp_path / f"n{i}.safetensors", d)
        files.append(SpoolFile(tmp_path / f"n{i}.safetensors", 10 + i))
    s = TrimmedMean(trim_ratio=0.2)
    from_disk = s.aggregate(g, files)
    s.begin_round(g)
    for d in deltas:
        s.accumulate(d, 1)
    in_memory = s.finish()
    for key in g:
        np.testing.assert_array_equal(from_disk[key], in_memory[key])
    stack = np.sort(np.stack([d["fc.bias"] for d in deltas]), axis=0)
    np.testing.assert_allclose(from_disk["fc.bias"], g["fc.bias"] + stack[1:5].mean(0), rtol=1e-6)
    assert int(from_disk["bn.num_batches_tracked"]) == 7 + 5


def _peak_bytes(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fedavg_streaming_memory_does_not_grow_with_nodes() -> None:
    """Peak memory of FedAvg over 2 or 16 generated updates differs by far less than a model."""
    shapes: dict[str, tuple[int, ...]] = {f"t{i}": (50_000,) for i in range(8)}
    model_bytes = sum(4 * s[0] for s in shapes.values())
    g = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    def run(nodes: int) -> None:
        create_strategy("fedavg").aggregate(g, [_Generated(shapes, i, 10) for i in range(nodes)])

    few, many = _peak_bytes(lambda: run(2)), _peak_bytes(lambda: run(16))
    assert many - few < 0.25 * model_bytes
    # accumulator (which becomes the result) + one tensor being folded, never a whole delta
    assert many < 1.5 * model_bytes


# resnet-like proportions: one tensor is a fifth of the model, a few are medium, many are tiny
_SPOOL_SHAPES: dict[str, tuple[int, ...]] = {
    "layer4.conv.weight": (64, 64, 3, 3),
    "layer3.conv.weight": (32, 64, 3, 3),
    "layer2.conv.weight": (32, 32, 3, 3),
    **{f"layer{i}.conv2.weight": (48, 48, 3, 3) for i in range(1, 5)},
    **{f"layer{i}.bn.weight": (64,) for i in range(1, 9)},
    "fc.weight": (2, 512),
    "fc.bias": (2,),
}


def _spool(
    tmp_path: Path, codec: str, nodes: int, partial_every: int = 0
) -> tuple[dict[str, np.ndarray], list[SpoolFile]]:
    """A global checkpoint (with a float32 batch counter) and ``nodes`` encoded spool files;
    every ``partial_every``-th node sends the head only (a "trainable only" update)."""
    rng = np.random.default_rng(7)
    g = {k: rng.normal(size=s).astype(np.float32) for k, s in _SPOOL_SHAPES.items()}
    g["bn.num_batches_tracked"] = np.array(40.0, np.float32)
    save_tensors(tmp_path / "global.safetensors", g)
    files = []
    for i in range(nodes):
        delta = {k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()} | {
            "bn.num_batches_tracked": np.array(float(3 + i % 4), np.float32)
        }
        head_only = partial_every and i % partial_every == 1
        keys = ("fc.weight", "fc.bias") if head_only else None
        path = tmp_path / f"{codec}-{i}.safetensors"
        path.write_bytes(codecs.encode(delta, codec, keys))
        files.append(SpoolFile(path, 5 + 7 * i))
    return g, files


def _whole_update_fold(
    strategy: Strategy, g: dict[str, np.ndarray], files: list[SpoolFile]
) -> dict[str, np.ndarray]:
    """The former streaming path: every update decoded whole (``SpoolFile.load``), then folded."""
    strategy.begin_round(g)
    for f in files:
        strategy.accumulate(f.load(), f.num_samples)
    return strategy.finish()


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "int8_channel"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("fedavg", {}),
        ("fedavg", {"weighted": False}),
        ("fedprox", {"mu": 0.1}),
        ("fedadam", {"eta": 0.05}),
    ],
)
def test_tensor_by_tensor_fold_is_bit_identical_to_whole_update_fold(
    tmp_path: Path, codec: str, name: str, kwargs: dict[str, Any]
) -> None:
    """Folding each spooled update tensor by tensor (``aggregate``) gives exactly the bytes of
    decoding every update whole and folding it, head-only updates and counters included; for
    FedAdam over two rounds, moments included."""
    g, files = _spool(tmp_path, codec, nodes=7, partial_every=3)
    per_tensor, whole = create_strategy(name, **kwargs), create_strategy(name, **kwargs)
    for _ in range(2):
        got = per_tensor.aggregate(g, files)
        expected = _whole_update_fold(whole, g, files)
        assert sorted(got) == sorted(expected) == sorted(g)
        for key in g:
            assert got[key].dtype == expected[key].dtype == g[key].dtype
            assert got[key].tobytes() == expected[key].tobytes(), key
        assert float(got["bn.num_batches_tracked"]) == float(g["bn.num_batches_tracked"]) + 6
        assert not np.array_equal(got["layer4.conv.weight"], g["layer4.conv.weight"])
        g = got
    ours, theirs = per_tensor.state_dict(), whole.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].tobytes() == theirs[key].tobytes(), key


def test_a_corrupt_spooled_tensor_is_refused_when_read_alone(tmp_path: Path) -> None:
    """A spooled tensor that decodes to inf is refused tensor by tensor as the whole decode
    refuses it (StateError naming the file, not a silently poisoned model)."""
    g, files = _spool(tmp_path, "fp16", nodes=2)
    bad = tmp_path / "bad.safetensors"
    tensors, meta = load_tensors(files[1].path)
    tensors["fc.bias"] = np.array([0.5, np.inf], np.float16)
    save_tensors(bad, tensors, meta)
    with pytest.raises(StateError, match=r"bad\.safetensors.*NaN or inf"):
        create_strategy("fedavg").aggregate(g, [files[0], SpoolFile(bad, 3)])


@pytest.mark.parametrize("nodes", [2, 24])
def test_fedavg_from_the_spool_peaks_below_three_models(tmp_path: Path, nodes: int) -> None:
    """The aggregation step as the coordinator runs it (load the global checkpoint, fold every
    spooled fp16 update, return the new weights) peaks below 3x one model, whatever N: global
    + accumulator + one decoded tensor, never a whole update's bytes and decoded copy."""
    _g, files = _spool(tmp_path, "fp16", nodes)
    model_bytes = sum(v.nbytes for v in _g.values())
    del _g

    def step() -> None:
        g, _meta = load_tensors(tmp_path / "global.safetensors")
        out = create_strategy("fedavg").aggregate(g, files)
        assert len(out) == len(g)

    peak = _peak_bytes(step)
    assert peak < 3 * model_bytes, peak / model_bytes


def test_trimmed_mean_memory_is_one_tensor_per_node_not_one_model(tmp_path: Path) -> None:
    """Reading the spool tensor by tensor keeps 12 nodes x 10 tensors far below 12 models."""
    shapes: dict[str, tuple[int, ...]] = {f"t{i}": (50_000,) for i in range(10)}
    model_bytes = sum(4 * s[0] for s in shapes.values())
    g = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    files = []
    for i in range(12):
        save_tensors(tmp_path / f"{i}.safetensors", _Generated(shapes, i, 1).load())
        files.append(SpoolFile(tmp_path / f"{i}.safetensors", 1))
    peak = _peak_bytes(lambda: TrimmedMean(0.2).aggregate(g, files))
    # result (1 model) + one stack (12 tensors = 1.2 models) + f64 temporaries of one tensor
    assert peak < 3 * model_bytes


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "trimmed_mean"])
def test_float32_batch_counters_are_counters_not_averaged(name: str) -> None:
    """export.weights stores num_batches_tracked as float32: it still advances by the largest
    node delta (an integral value), in every strategy."""
    g = {"w": np.zeros(2, np.float32), "bn.num_batches_tracked": np.array(10.0, np.float32)}
    s = create_strategy(name)
    s.begin_round(g)
    for batches in (4.0, 9.0, 6.0):
        s.accumulate(
            {"w": np.ones(2, np.float32), "bn.num_batches_tracked": np.array(batches, np.float32)},
            1,
        )
    out = s.finish()
    assert out["bn.num_batches_tracked"].dtype == np.float32
    assert float(out["bn.num_batches_tracked"]) == 19.0


@pytest.mark.parametrize("codec", ["fp16", "int8", "int8_channel"])
def test_spooled_wire_payloads_decode_whole_or_tensor_by_tensor(tmp_path: Path, codec: str) -> None:
    """The spool keeps the encoded wire bytes; one tensor decoded alone equals the same tensor
    of the whole decode, so trimmed mean and FedAvg agree with the in-memory results."""
    rng = np.random.default_rng(5)
    g = _model(rng)
    deltas = [_delta(rng, batches=i) for i in range(5)]
    deltas = [{**d, "bn.num_batches_tracked": np.array(i, np.int64)} for i, d in enumerate(deltas)]
    files = []
    for i, d in enumerate(deltas):
        (tmp_path / f"{i}.st").write_bytes(codecs.encode(d, codec))
        files.append(SpoolFile(tmp_path / f"{i}.st", 3 + i))
    decoded = [codecs.decode((tmp_path / f"{i}.st").read_bytes()) for i in range(5)]
    assert sorted(files[0].keys()) == sorted(g)
    for key in g:
        np.testing.assert_array_equal(files[0].tensor(key), decoded[0][key])
        np.testing.assert_array_equal(files[0].load()[key], decoded[0][key])
    for name in ("trimmed_mean", "fedavg"):
        s = create_strategy(name)
        from_spool = s.aggregate(g, files)
        s.begin_round(g)
        for i, d in enumerate(decoded):
            s.accumulate(d, 3 + i)
        in_memory = s.finish()
        for key in g:
            np.testing.assert_allclose(from_spool[key], in_memory[key], rtol=1e-6)
