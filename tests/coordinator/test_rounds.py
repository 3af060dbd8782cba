"""Whole rounds over MemoryTransport: simulated nodes send real encoded, chunked deltas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.reports import round_summaries
from fl_protocol import codecs, topics
from tests.coordinator.fakes import (
    HEAD_KEYS,
    make_delta,
    tiny_weights,
)
from tests.coordinator.world import World, expected_fedavg


def test_two_fedavg_rounds_with_three_nodes(tmp_path: Path) -> None:
    """Three nodes report in each of two rounds: each round closes as soon as all expected
    nodes reported, the new version is the sample-weighted mean, old chunks are retired."""
    w = World(tmp_path)
    w.service.start()
    a, b, c = (w.nodes[n] for n in "abc")
    assert a.manifest.version == 0 and a.manifest.round is not None
    assert a.manifest.round.round == 1 and a.manifest.round.codec == "fp32"
    base = a.global_weights()
    for key, value in tiny_weights().items():
        np.testing.assert_array_equal(base[key], value)

    versions = [base]
    for round_id in (1, 2):
        deltas = [(make_delta(round_id * 10 + i), n) for i, n in enumerate((10, 30, 35))]
        for node, (delta, n) in zip((a, b, c), deltas, strict=True):
            node.send_update(delta, n)
        w.step()
        for node in (a, b, c):
            ack = node.last_ack(round_id)
            assert ack is not None and ack.status == "complete"
        assert a.manifest.version == round_id
        got = a.global_weights()
        want = expected_fedavg(versions[-1], deltas)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
        versions.append(got)

    assert w.service.done and a.manifest.round is None and a.manifest.version == 2
    # v0's retained chunks were cleared when v2 went out; v1 (previous) and v2 stay
    retained_versions = {topics.parse_topic(t).version for t in w.broker.retained if "/chunk/" in t}
    assert retained_versions == {1, 2}
    rounds = round_summaries(w.service.state)
    assert [(r["round"], r["outcome"], r["version_out"]) for r in rounds] == [
        (1, "aggregated", 1),
        (2, "aggregated", 2),
    ]
    assert rounds[0]["counted"] == ["a", "b", "c"] and rounds[0]["samples"] == 75
    assert not any(w.service.state.spool.glob("round_*/*"))  # spooled deltas removed


def test_duplicated_reordered_and_early_chunks_count_once(tmp_path: Path) -> None:
    """Chunks in reverse order, every chunk twice, chunks before the manifest, a manifest
    resent after acceptance: one accepted update per node, the same result as clean sends."""
    w = World(tmp_path, expected_nodes=(), num_rounds=1)
    w.service.receiver.in_memory_max_bytes = 0  # a's transfer through the disk spool
    w.service.start()
    a, b = w.nodes["a"], w.nodes["b"]
    da, db = make_delta(1), make_delta(2)
    n_chunks = len(codecs.encode(da, "fp32")) // 256 + 1
    order = [i for i in reversed(range(n_chunks)) for _ in range(2)]
    a.send_update(da, 5, order=order)
    b.send_update(db, 7, manifest_last=True)  # every chunk arrives before the manifest
    w.step()
    assert a.last_ack(1).status == "complete" and b.last_ack(1).status == "complete"  # type: ignore[union-attr]
    assert w.service.receiver.active == 0 and w.service.receiver.early_bytes == 0
    for i in range(n_chunks):  # late QoS 1 redeliveries of finished chunks are not held
        a.send_chunk(1, i)
    w.step()
    assert w.service.receiver.early_bytes == 0
    a.resend(1)  # e.g. the node missed the ack
    w.step()
    assert a.last_ack(1).status == "complete"  # type: ignore[union-attr]
    a.send_update(make_delta(3), 5)  # a second, different update for the same round
    w.step()
    assert a.last_ack(1).status == "duplicate"  # type: ignore[union-attr]
    w.clock.advance(61)
    w.step()
    assert a.manifest.version == 1
    # two nodes: the weight cap (no node above half) makes their weights equal
    want = expected_fedavg(tiny_weights(), [(da, 1), (db, 1)])
    got = a.global_weights()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_missing_chunks_are_asked_for_after_the_timeout(tmp_path: Path) -> None:
    """A node whose chunks 1 and 3 were lost gets an ack listing them, resends, is accepted
    (reassembled through the disk spool, as payloads over 1 MiB are)."""
    w = World(tmp_path)
    w.service.receiver.in_memory_max_bytes = 0
    w.service.start()
    a = w.nodes["a"]
    a.send_update(make_delta(1), 5, skip=(1, 3))
    w.step()
    assert a.last_ack(1) is None
    assert len(list((w.cfg.state_dir / "incoming" / "round_1" / "a").glob("*.chunk"))) > 0
    w.clock.advance(5.1)
    w.step()
    ack = a.last_ack(1)
    assert ack is not None and ack.status == "missing" and ack.missing == (1, 3)
    for i in ack.missing:
        a.send_chunk(1, i)
    w.step()
    assert a.last_ack(1).status == "complete"  # type: ignore[union-attr]
    assert not any((w.cfg.state_dir / "incoming").glob("round_1/*"))  # spooled chunks removed


def test_stale_and_refused_updates_are_acked_with_reasons(tmp_path: Path) -> None:
    """Wrong round -> stale; unknown node, bad base version, wrong shapes, NaN, huge norm,
    unknown codec -> rejected with the reason; none of them counts."""
    w = World(tmp_path, expected_nodes=("a", "b", "c"))
    w.service.start()
    a, b, c, d = (w.nodes[n] for n in "abcd")
    a.send_update(make_delta(1), 5, round_id=2)
    d.send_update(make_delta(1), 5)
    b.send_update(make_delta(1), 5, base_version=3)
    bad_shape = make_delta(1)
    bad_shape["head.bias"] = np.zeros(3, np.float32)
    c.send_update(bad_shape, 5)
    w.step()
    assert a.last_ack(2).status == "stale"  # type: ignore[union-attr]
    reasons = {n.node: n.last_ack(1).reason.split(":")[0] for n in (d, b, c)}  # type: ignore[union-attr]
    assert reasons == {"d": "unknown_node", "b": "base_version", "c": "shape"}
    assert all(n.last_ack(1).status == "rejected" for n in (d, b, c))  # type: ignore[union-attr]

    c.send_update(make_delta(1, scale=100.0), 5)  # norm far above the global weights' norm
    w.step()
    assert c.last_ack(1).reason.startswith("norm")  # type: ignore[union-attr]
    nan_payload = bytearray(codecs.encode(make_delta(1), "fp32"))
    nan_payload[-4:] = np.array([np.nan], np.float32).tobytes()
    c.send_update({}, 5, payload=bytes(nan_payload))
    w.step()
    assert c.last_ack(1).status == "rejected"  # type: ignore[union-attr]
    assert c.last_ack(1).reason.startswith("codec")  # type: ignore[union-attr]  # decode refuses NaN

    state = w.service.state
    rows = {u.node: u for u in state.updates(1)}
    assert not any(u.accepted for u in rows.values())
    assert rows["c"].reason == "codec" and rows["d"].reason == "unknown_node"
    # a rejected node may send a good update afterwards; it then counts
    c.send_update(make_delta(1), 5)
    a.send_update(make_delta(2), 5)
    w.step()
    assert {u.node for u in state.updates(1, accepted=True)} == {"a", "c"}


def test_deadline_without_quorum_extends_once_then_closes_without_a_version(tmp_path: Path) -> None:
    """One report with quorum two: the deadline is extended once (manifest republished with the
    new deadline), then the round closes unchanged and round 2 opens on the same version."""
    w = World(tmp_path, expected_nodes=(), num_rounds=2)
    w.service.start()
    a = w.nodes["a"]
    first_deadline = a.manifest.round.deadline_ts  # type: ignore[union-attr]
    a.send_update(make_delta(1), 5)
    w.clock.advance(61)
    w.step()
    assert a.manifest.round.round == 1  # type: ignore[union-attr]
    assert a.manifest.round.deadline_ts == first_deadline + 60  # type: ignore[union-attr]
    w.clock.advance(60)
    w.step()
    assert a.manifest.round.round == 2 and a.manifest.version == 0  # type: ignore[union-attr]
    r1 = w.service.state.round(1)
    assert (r1.status, r1.outcome, r1.version_out, r1.extended) == (
        "closed",
        "no_quorum",
        None,
        True,
    )
    a.send_update(make_delta(1), 5, round_id=1)  # too late now
    w.step()
    assert a.last_ack(1).status == "stale"  # type: ignore[union-attr]


def test_quorum_waits_for_the_deadline_when_no_node_list_is_given(tmp_path: Path) -> None:
    """Without expected_nodes, quorum alone does not close the round before its deadline."""
    w = World(tmp_path, expected_nodes=(), num_rounds=1)
    w.service.start()
    for i, n in enumerate("abc"):
        w.nodes[n].send_update(make_delta(i), 5)
    w.step()
    assert w.service.state.round(1).status == "collecting"
    w.clock.advance(60)
    w.step()
    assert w.service.state.round(1).outcome == "aggregated" and w.service.done


def test_trainable_only_round_accepts_head_tensors_only(tmp_path: Path) -> None:
    """A head-only round: updates carry only head tensors; the backbone stays bit-identical."""
    w = World(tmp_path, trainable_only=True, train_mode="head", num_rounds=1)
    w.service.start()
    assert w.nodes["a"].manifest.round.trainable_only  # type: ignore[union-attr]
    full = w.nodes["c"]
    full.send_update(make_delta(9), 5)
    for i, n in enumerate("ab"):
        w.nodes[n].send_update(make_delta(i, keys=HEAD_KEYS), 5)
    w.step()
    assert full.last_ack(1).reason.startswith("unknown_keys")  # type: ignore[union-attr]
    w.clock.advance(61)
    w.step()
    got = w.nodes["a"].global_weights()
    base = tiny_weights()
    np.testing.assert_array_equal(got["backbone.conv.weight"], base["backbone.conv.weight"])
    assert not np.array_equal(got["head.weight"], base["head.weight"])


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "trimmed_mean"])
def test_other_strategies_run_a_round(tmp_path: Path, strategy: str) -> None:
    """Every registered strategy completes a round end to end on int8 updates (spooled
    encoded, decoded tensor by tensor for the trimmed mean); fedprox's mu reaches nodes."""
    min_nodes = 3 if strategy == "trimmed_mean" else 2  # a trimmed mean needs 3 (one cut)
    w = World(
        tmp_path, strategy=strategy, mu=0.1, num_rounds=1, codec="int8_channel", min_nodes=min_nodes
    )
    w.service.start()
    assert w.nodes["a"].manifest.round.strategy == strategy  # type: ignore[union-attr]
    if strategy == "fedprox":
        assert w.nodes["a"].manifest.round.mu == 0.1  # type: ignore[union-attr]
    for i, n in enumerate("abc"):
        w.nodes[n].send_update(make_delta(i), 5)
    w.step()
    assert w.service.done and w.nodes["a"].manifest.version == 1
    if strategy == "fedadam":
        assert (w.service.state.checkpoints / "strategy_v1.safetensors").exists()


def test_eval_reports_are_stored_and_weighted(tmp_path: Path) -> None:
    """Per-node metrics are stored per round; the weighted summary weighs by n_val."""
    w = World(tmp_path, num_rounds=1)
    w.service.start()
    w.nodes["a"].send_eval(1, 0, tn=40, fp=10, fn=0, tp=50)  # n=100, accuracy 0.9
    w.nodes["b"].send_eval(1, 0, tn=5, fp=5, fn=5, tp=5)  # n=20, accuracy 0.5
    w.step()
    (summary,) = round_summaries(w.service.state)
    assert summary["metrics"]["a"]["accuracy"] == pytest.approx(0.9)
    assert summary["weighted"]["accuracy"] == pytest.approx((0.9 * 100 + 0.5 * 20) / 120)
    assert summary["weighted"]["confusion"] == [[45, 15], [5, 55]]
    assert summary["weighted"]["auc"] == pytest.approx(0.9)


def test_broker_outage_during_a_transition_resumes_from_the_state(tmp_path: Path) -> None:
    """The coordinator's connection drops just before the round closes: the aggregation is
    committed, opening round 2 cannot be published; once connected again the service resumes
    from the state and publishes round 2 (updates sent meanwhile were queued by the broker)."""
    w = World(tmp_path, expected_nodes=(), num_rounds=2)
    w.service.start()
    for i, n in enumerate("ab"):
        w.nodes[n].send_update(make_delta(i), 5)
    w.step()
    w.service.transport.drop()  # type: ignore[attr-defined]
    w.clock.advance(61)
    w.step()  # aggregates, then fails to publish
    assert w.service.state.round(1).outcome == "aggregated"
    assert w.nodes["a"].manifest.version == 0  # nothing new reached the nodes
    w.service.transport.connect()
    w.step()
    assert w.nodes["a"].manifest.version == 1 and w.nodes["a"].manifest.round.round == 2  # type: ignore[union-attr]
    assert [r.id for r in w.service.state.rounds()] == [1, 2]


def test_a_cosine_schedule_sends_each_round_its_own_rate(tmp_path: Path) -> None:
    """[rounds] lr_schedule = "cosine": round 1 opens at the base rate, round 2 at the rate of
    step 1 of 2 (what fl_protocol.schedule says), so late rounds take small steps."""
    from fl_protocol.schedule import scheduled_lr

    w = World(tmp_path, lr=0.01, lr_schedule="cosine")
    w.service.start()
    a, b, c = (w.nodes[n] for n in "abc")
    assert a.manifest.round is not None and a.manifest.round.lr == pytest.approx(0.01)
    for i, node in enumerate((a, b, c)):
        node.send_update(make_delta(10 + i), 10)
    w.step()
    assert a.manifest.round is not None and a.manifest.round.round == 2
    assert a.manifest.round.lr == pytest.approx(scheduled_lr(0.01, "cosine", 1, 2))
    assert a.manifest.round.lr < 0.01
