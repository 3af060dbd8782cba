"""SQLite state and checkpoints: rows round-trip, one update per (round, node), atomic commit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import StateError
from coordinator.state import MetricsRow, State, UpdateRow


def _update(node: str, accepted: bool = True, reason: str | None = None) -> UpdateRow:
    return UpdateRow(
        round=1,
        node=node,
        nonce="ab" * 16,
        num_samples=10,
        accepted=accepted,
        reason=reason,
        norm=0.5,
        spool_path=f"spool/round_1/{node}.safetensors" if accepted else None,
        counted_in_aggregate=False,
        received_at=1.0,
    )


def test_checkpoint_round_trip_keeps_dtypes_shapes_and_metadata(tmp_path: Path) -> None:
    """Version files hold float32 weights, 0-d integer counters and the contract metadata."""
    state = State(tmp_path)
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(4, np.int64)}
    sha = state.write_checkpoint(
        0, weights, {"arch": "cnn2d", "texture_dim": "0"}, {"m/w": weights["w"]}
    )
    state.add_version(0, sha)
    loaded, meta = state.load_checkpoint(0)
    assert meta == {"arch": "cnn2d", "texture_dim": "0", "version": "0"}
    assert loaded["n"].shape == () and loaded["n"].dtype == np.int64
    np.testing.assert_array_equal(loaded["w"], weights["w"])
    assert set(state.load_strategy_state(0)) == {"m/w"}
    assert state.load_strategy_state(1) == {}
    latest = state.latest_version()
    assert latest is not None and latest.version == 0 and latest.sha256 == sha
    assert not list(state.checkpoints.glob("*.tmp"))


def test_an_accepted_update_is_final_a_rejected_one_can_be_replaced(tmp_path: Path) -> None:
    """(round, node) is the key: a second accepted update would be double counting."""
    state = State(tmp_path)
    state.open_round(1, {"round": 1}, opened_at=0.0, deadline=10.0, version_in=0)
    state.record_update(_update("a"))
    with pytest.raises(StateError, match="already counted"):
        state.record_update(_update("a"))
    state.record_update(_update("b", accepted=False, reason="norm"))
    state.record_update(_update("b"))
    assert [u.node for u in state.updates(1, accepted=True)] == ["a", "b"]


def test_commit_aggregate_closes_round_versions_and_marks_counted(tmp_path: Path) -> None:
    """One transaction: version row, outlier refused, counted marks, round closed."""
    state = State(tmp_path)
    state.open_round(1, {"round": 1}, opened_at=0.0, deadline=10.0, version_in=0)
    for node in ("a", "b", "c"):
        state.record_update(_update(node))
    state.set_status(1, "aggregating")
    state.commit_aggregate(
        1, 1, "0" * 64, counted=["a", "b"], outliers={"c": "norm_outlier"}, closed_at=5.0
    )
    rnd = state.round(1)
    assert (rnd.status, rnd.outcome, rnd.version_out, rnd.closed_at) == (
        "closed",
        "aggregated",
        1,
        5.0,
    )
    rows = {u.node: u for u in state.updates(1)}
    assert rows["a"].counted_in_aggregate and rows["b"].counted_in_aggregate
    assert not rows["c"].accepted and rows["c"].reason == "norm_outlier"
    assert [v.version for v in state.versions()] == [1]


def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    """commit_aggregate for an existing version fails as a whole: the round stays open."""
    state = State(tmp_path)
    state.add_version(1, "0" * 64)
    state.open_round(1, {}, opened_at=0.0, deadline=1.0, version_in=0)
    state.record_update(_update("a"))
    with pytest.raises(StateError):
        state.commit_aggregate(1, 1, "1" * 64, counted=["a"], outliers={}, closed_at=2.0)
    assert state.round(1).status == "open"
    assert not state.updates(1)[0].counted_in_aggregate


def test_metrics_and_readonly_view(tmp_path: Path) -> None:
    """Metrics rows round-trip; a read-only State sees what the writer committed."""
    state = State(tmp_path)
    state.open_round(1, {"lr": 0.1}, opened_at=0.0, deadline=1.0, version_in=0)
    state.record_metrics(MetricsRow(1, "a", 0, {"accuracy": 0.75}, 40, 3.0))
    state.record_metrics(MetricsRow(1, "a", 0, {"accuracy": 0.8}, 40, 4.0))  # resend replaces
    reader = State(tmp_path, readonly=True)
    assert [m.metrics for m in reader.metrics(1)] == [{"accuracy": 0.8}]
    assert reader.rounds()[0].config == {"lr": 0.1}
    with pytest.raises(StateError, match="no coordinator state"):
        State(tmp_path / "empty", readonly=True)
