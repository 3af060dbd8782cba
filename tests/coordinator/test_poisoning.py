"""One participant trying to poison the global model (issue 14), over MemoryBroker with real
encoded and chunked updates: each attack is refused (or bounded to its capped weight share),
nothing of the honest nodes is lost, and the round completes from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import RoundsConfig, ValidationConfig
from coordinator.errors import ConfigError, StateError
from coordinator.state import State
from coordinator.strategy.utils import capped_weights, l2_norm, trim_count
from coordinator.validate import contribution_outliers
from tests.coordinator.fakes import make_delta, tiny_weights
from tests.coordinator.world import World, expected_fedavg

COUNTER = "backbone.bn.num_batches_tracked"
ATOL = 1e-6


def shaped_like_global(fill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A full delta: the given tensors, zeros everywhere else (counters 0)."""
    return {k: fill.get(k, np.zeros_like(v)) for k, v in tiny_weights().items()}


def outcome(w: World, round_id: int) -> tuple[str | None, int | None]:
    rnd = w.service.state.round(round_id)
    return rnd.outcome, rnd.version_out


def rejected(w: World, round_id: int) -> dict[str, str | None]:
    return {u.node: u.reason for u in w.service.state.updates(round_id) if not u.accepted}


def assert_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=ATOL, err_msg=key)


def test_a_million_sample_claim_that_shrinks_the_model_is_refused(tmp_path: Path) -> None:
    """Two honest nodes (100 samples) and one claiming 1,000,000 samples with delta = -0.99 x the
    global weights (it passes the per-update norm cap: smaller than the model). FedAvg used to
    apply it 100%; now its claim is capped to half of the weight and its weighted contribution
    is far above the others', so it is refused and v1 is the mean of the honest two."""
    w = World(tmp_path, num_rounds=1)
    w.service.start()
    base = tiny_weights()
    hostile = shaped_like_global({k: (-0.99 * v).astype(np.float32) for k, v in base.items()})
    hostile[COUNTER] = np.array(0.0, np.float32)
    da, db = make_delta(1), make_delta(2)
    w.nodes["a"].send_update(da, 100)
    w.nodes["b"].send_update(db, 100)
    w.nodes["c"].send_update(hostile, 1_000_000)
    w.step()
    assert w.nodes["c"].last_ack(1).status == "complete"  # type: ignore[union-attr]
    assert outcome(w, 1) == ("aggregated", 1)
    assert rejected(w, 1) == {"c": "norm_outlier"}
    got = w.nodes["a"].global_weights()
    assert_weights(got, expected_fedavg(base, [(da, 1), (db, 1)]))
    assert l2_norm(got) > 0.95 * l2_norm(base)  # the model was not shrunk to 1%


def test_two_nodes_one_hostile_keeps_the_model_and_the_federation(tmp_path: Path) -> None:
    """Two nodes, quorum 2: the hostile 1,000,000-sample shrink update is refused; the round
    cannot reach its quorum, so it closes without a new version after its extension; v0 is
    still the published model and round 2 opens on it (nothing lost, federation alive)."""
    w = World(tmp_path, num_rounds=2, expected_nodes=("a", "c"))
    w.service.start()
    base = tiny_weights()
    hostile = shaped_like_global({k: (-0.99 * v).astype(np.float32) for k, v in base.items()})
    hostile[COUNTER] = np.array(0.0, np.float32)
    w.nodes["a"].send_update(make_delta(1), 100)
    w.nodes["c"].send_update(hostile, 1_000_000)
    w.step()
    # every expected node reported, but what would count is one update: no early close
    assert w.service.state.round(1).status == "collecting"
    w.clock.advance(61)
    w.step()
    w.clock.advance(61)
    w.step()
    assert outcome(w, 1) == ("no_quorum", None)
    assert rejected(w, 1) == {"c": "norm_outlier"}
    a = w.nodes["a"]
    assert a.manifest.version == 0 and a.manifest.round is not None
    assert a.manifest.round.round == 2
    assert_weights(a.global_weights(), base)


def test_a_big_claim_gets_at_most_half_of_the_weight(tmp_path: Path) -> None:
    """A node claiming 1,000,000 samples with an ordinary update is counted, but with half of
    the weight (its claim is cut to the two others' total), not 99.98%."""
    w = World(tmp_path, num_rounds=1)
    w.service.start()
    base = tiny_weights()
    da, db, dc = make_delta(1), make_delta(2), make_delta(3)
    w.nodes["a"].send_update(da, 1_000_000)
    w.nodes["b"].send_update(db, 100)
    w.nodes["c"].send_update(dc, 100)
    w.step()
    assert outcome(w, 1) == ("aggregated", 1) and rejected(w, 1) == {}
    assert_weights(
        w.nodes["a"].global_weights(), expected_fedavg(base, [(da, 2), (db, 1), (dc, 1)])
    )


@pytest.mark.parametrize(
    ("claim", "ratio", "refused"),
    [
        (1_000_000, 9.9, True),  # the attack: 99.99% applied before
        (100, 10.5, True),  # over the bound with an honest claim
        (100, 9.9, False),  # just under the bound: counted with a third of the weight
    ],
)
def test_a_head_bias_attack_is_refused_or_bounded_by_its_share(
    tmp_path: Path, claim: int, ratio: float, refused: bool
) -> None:
    """Three nodes; the hostile one puts its whole update on the head bias (a logit shift for
    every slice) at ``ratio`` x the honest norm. Refused when its weighted contribution is more
    than 10 x the others' (the round completes from the two honest nodes); otherwise it moves
    the bias by exactly its weight share (1/3) of its delta, never more."""
    w = World(tmp_path, num_rounds=1)
    w.service.start()
    base = tiny_weights()
    da, db = make_delta(1), make_delta(2)
    honest_norm = (l2_norm(da) + l2_norm(db)) / 2  # median of the two others
    bias = np.array([1.0, -1.0], np.float32) / np.sqrt(2) * ratio * honest_norm
    hostile = shaped_like_global({"head.bias": bias.astype(np.float32)})
    w.nodes["a"].send_update(da, 100)
    w.nodes["b"].send_update(db, 100)
    w.nodes["c"].send_update(hostile, claim)
    w.step()
    assert outcome(w, 1) == ("aggregated", 1)
    got = w.nodes["a"].global_weights()
    if refused:
        assert rejected(w, 1) == {"c": "norm_outlier"}
        assert_weights(got, expected_fedavg(base, [(da, 1), (db, 1)]))
    else:
        assert rejected(w, 1) == {}
        assert_weights(got, expected_fedavg(base, [(da, 1), (db, 1), (hostile, 1)]))
        shift = got["head.bias"] - (base["head.bias"] + (da["head.bias"] + db["head.bias"]) / 3)
        np.testing.assert_allclose(shift, bias / 3, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize(
    "counter",
    [float(np.finfo(np.float32).max), -5.0, 2.5, 1e7],
    ids=["f32max", "neg", "frac", "big"],
)
def test_a_hostile_batch_counter_is_refused_and_the_round_completes(
    tmp_path: Path, counter: float
) -> None:
    """num_batches_tracked skips the norm test; a node setting it to float32 max used to give a
    global v2 full of inf that every node refused. A counter delta must be a whole number in
    [0, max_counter_step]: the update is refused at once ("counter"), v1 is made from the two
    others and every tensor of it is finite."""
    w = World(tmp_path, num_rounds=1)
    w.service.start()
    da, db = make_delta(1), make_delta(2)
    bad = make_delta(3)
    bad[COUNTER] = np.array(counter, np.float32)
    w.nodes["a"].send_update(da, 10)
    w.nodes["b"].send_update(db, 10)
    w.nodes["c"].send_update(bad, 10)
    w.step()
    ack = w.nodes["c"].last_ack(1)
    assert ack is not None and ack.status == "rejected" and ack.reason.startswith("counter")
    assert outcome(w, 1) == ("aggregated", 1)
    got = w.nodes["a"].global_weights()
    assert all(np.isfinite(v).all() for v in got.values())
    assert_weights(got, expected_fedavg(tiny_weights(), [(da, 10), (db, 10)]))


def test_no_checkpoint_with_nan_or_inf_is_written(tmp_path: Path) -> None:
    """The last lock: State refuses to write a global checkpoint holding inf or NaN."""
    state = State(tmp_path / "state")
    try:
        weights = tiny_weights()
        weights["backbone.bn.running_mean"][3] = np.inf
        with pytest.raises(StateError, match="NaN or inf"):
            state.write_checkpoint(7, weights, {})
        assert not state.checkpoint_path(7).exists()
    finally:
        state.close()


def test_trimmed_mean_needs_three_nodes_and_always_cuts_one(tmp_path: Path) -> None:
    """trimmed_mean with a quorum of 2 is refused at start; with 3 updates (trim_ratio 0.2 gave
    floor(0.6) = 0 before) one value is cut at each end: the result is the coordinate median,
    so an accepted but hostile update does not move the model beyond the honest ones."""
    with pytest.raises(ConfigError, match="min_nodes >= 3"):
        RoundsConfig(strategy="trimmed_mean", min_nodes=2)
    assert [trim_count(n, 0.2) for n in (2, 3, 4, 5, 10)] == [0, 1, 1, 1, 2]
    w = World(tmp_path, num_rounds=1, strategy="trimmed_mean", min_nodes=3)
    w.service.start()
    deltas = [make_delta(1), make_delta(2), make_delta(3, scale=0.05)]  # 5x: accepted
    for node, delta in zip("abc", deltas, strict=True):
        w.nodes[node].send_update(delta, 10)
    w.step()
    assert outcome(w, 1) == ("aggregated", 1) and rejected(w, 1) == {}
    got, base = w.nodes["a"].global_weights(), tiny_weights()
    for key, value in base.items():
        if key == COUNTER:
            continue
        median = np.median(np.stack([d[key] for d in deltas]), axis=0)
        np.testing.assert_allclose(got[key], value + median, rtol=1e-5, atol=ATOL, err_msg=key)


def test_capped_weights_water_filling() -> None:
    """No weight above the share; claims under the ceiling are kept; too few nodes: equal."""
    assert capped_weights([1_000_000, 100, 100], 0.5) == [200, 100, 100]
    assert capped_weights([10, 30, 35], 0.5) == [10, 30, 35]  # already under the cap
    assert capped_weights([1_000_000, 7], 0.5) == [7, 7]  # two nodes: equal weights
    assert capped_weights([5, 7], 1.0) == [5, 7]  # cap off
    got = capped_weights([1000, 900, 10, 10, 10], 0.4)
    assert max(got) / sum(got) == pytest.approx(0.4) and got[2:] == [10, 10, 10]
    assert got[0] == got[1]  # both big claims cut to the same ceiling
    for claims in ([3, 1, 1, 1], [50, 40, 1], [9, 9, 9, 1]):
        share = max(capped_weights(claims, 0.4)) / sum(capped_weights(claims, 0.4))
        assert share <= 0.4 + 1e-12


def test_contribution_outliers_leave_one_out() -> None:
    """Each node against the median of the others: works from two updates on, and the
    hostile node never sits in its own reference."""
    assert contribution_outliers({"a": 1.0, "b": 9.9}, 10.0) == []
    assert contribution_outliers({"a": 1.0, "b": 10.5}, 10.0) == ["b"]
    assert contribution_outliers({"a": 1.0, "b": 1.1, "c": 12.0}, 10.0) == ["c"]
    assert contribution_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0}, 10.0) == ["d"]
    assert contribution_outliers({"a": 0.0, "b": 0.0, "c": 1.0}, 10.0) == []  # no scale
    assert contribution_outliers({"a": 1.0}, 10.0) == []


def test_validation_config_bounds() -> None:
    """The new limits are validated like every other field."""
    with pytest.raises(ConfigError, match="max_weight_share"):
        ValidationConfig(max_weight_share=0.0)
    with pytest.raises(ConfigError, match="max_counter_step"):
        ValidationConfig(max_counter_step=2**24)
