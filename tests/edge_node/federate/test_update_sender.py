"""Sending an update: delta, codec, outbox before publish, acks, resends, restart, signatures.

The sender runs over the in-process MQTT broker against the scripted coordinator of
``fed_helpers``, which reassembles and decodes what it receives with the real protocol code.
Local "trained" weights are the global weights plus a known perturbation, so the delta the
coordinator decodes can be checked exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_node.errors import TrainingError
from edge_node.federate.update_sender import compute_delta, eval_report
from fl_protocol.metrics import from_confusion
from fl_protocol.signing import generate_keypair, save_private_key, verify_manifest
from fl_protocol.transport import MemoryBroker
from tests.helpers.federation import (
    BASE_VERSION,
    FED,
    ROUND,
    Clock,
    FakeCoordinator,
    Setup,
    connect,
    metrics,
    published_by,
)


def test_delta_is_local_minus_global_and_can_be_restricted_to_trainable_tensors() -> None:
    base: dict[str, np.ndarray] = {"a": np.ones((2, 2), np.float32), "n": np.array(3, np.int64)}
    local: dict[str, np.ndarray] = {"a": np.full((2, 2), 1.5, np.float32), "n": np.array(5)}
    delta = compute_delta(local, base)
    assert np.allclose(delta["a"], 0.5) and delta["n"] == 2 and delta["a"].dtype == np.float32
    assert set(compute_delta(local, base, ["a"])) == {"a"}
    with pytest.raises(TrainingError):
        compute_delta({"a": local["a"]}, base)
    with pytest.raises(TrainingError):
        compute_delta({"a": np.ones((3,), np.float32), "n": base["n"]}, base)


def test_update_is_stored_before_publishing_and_decodes_to_the_delta(tmp_path: Path) -> None:
    """The outbox holds the update before any byte leaves; the coordinator decodes exactly
    local - global (fp32); a complete ack empties the outbox."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.open_round = ROUND
    setup = Setup(tmp_path)
    sender = connect(broker, setup, Clock())
    pending = sender.build(setup.manifest, setup.result, setup.global_path)
    assert sender.has_submitted(ROUND)
    assert [p.round for p in sender.pending()] == [ROUND]
    assert published_by(broker, "node-n1") == []  # nothing published by build()

    assert sender.send(pending)
    delta = coord.delta(ROUND, "n1")
    for k in setup.base:
        np.testing.assert_allclose(delta[k], setup.local[k] - setup.base[k], atol=1e-7)
    m = coord.uploads[(ROUND, "n1")].manifest
    assert (m.base_version, m.num_samples, m.codec) == (BASE_VERSION, 12, "fp32")
    assert coord.uploads[(ROUND, "n1")].acked == ["complete"]
    assert sender.pending() == []


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_round_codec_and_trainable_only_shrink_the_update(tmp_path: Path, codec: str) -> None:
    """A head-only round with a compact codec sends only the head tensors."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.open_round = ROUND
    setup = Setup(tmp_path, codec=codec, trainable_only=True)
    sender = connect(broker, setup, Clock())
    sender.send(sender.build(setup.manifest, setup.result, setup.global_path))
    delta = coord.delta(ROUND, "n1")
    assert set(delta) == {"head.weight", "head.bias"}
    want = setup.local["head.weight"] - setup.base["head.weight"]
    np.testing.assert_allclose(delta["head.weight"], want, atol=np.abs(want).max() / 100)
    assert coord.uploads[(ROUND, "n1")].manifest.codec == codec


def test_missing_chunks_are_resent_and_other_answers_settle_the_update(tmp_path: Path) -> None:
    """ "missing" resends only the listed chunks; "stale" / "rejected" drop the update."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.open_round = ROUND
    answers = iter(["missing:1", "rejected"])
    coord.policy = lambda m, u: next(answers)
    setup = Setup(tmp_path)
    sender = connect(broker, setup, Clock(), chunk_size=64 * 1024)
    pending = sender.build(setup.manifest, setup.result, setup.global_path)
    n = pending.num_chunks
    assert n >= 2
    sender.send(pending)
    topics_out = [m.topic for m in published_by(broker, "node-n1")]
    assert sum(t.endswith("/manifest") for t in topics_out) == 1
    chunk_topics = [t for t in topics_out if "/chunk/" in t]
    assert len(chunk_topics) == n + 1 and chunk_topics[-1].endswith("/chunk/1")
    assert coord.uploads[(ROUND, "n1")].acked == ["missing", "rejected"]
    assert sender.pending() == []

    coord.open_round = ROUND + 1  # now the round is over: the coordinator says stale
    again = Setup(tmp_path / "b", node_id="n1")
    s2 = connect(broker, again, Clock())
    s2.send(s2.build(again.manifest, again.result, again.global_path))
    assert coord.uploads[(ROUND, "n1")].acked[-1] == "stale" and s2.pending() == []


def test_unanswered_update_is_resent_with_backoff_while_its_round_is_open(
    tmp_path: Path,
) -> None:
    """No ack: the whole update is resent after the timeout, then after twice as long; once
    the round closes it is dropped."""
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.open_round = ROUND
    coord.policy = lambda m, u: "silent"
    coord.ack = lambda *a, **k: None  # type: ignore[method-assign]
    setup = Setup(tmp_path)
    clock = Clock()
    sender = connect(broker, setup, clock)
    sender.send(sender.build(setup.manifest, setup.result, setup.global_path))

    def manifests() -> int:
        return sum(m.topic.endswith("/manifest") for m in published_by(broker, "node-n1"))

    sender.service(ROUND)
    assert manifests() == 1
    clock.now += 31
    sender.service(ROUND)
    assert manifests() == 2
    clock.now += 31  # backoff is now 60 s
    sender.service(ROUND)
    assert manifests() == 2
    clock.now += 30
    sender.service(ROUND)
    assert manifests() == 3
    sender.service(ROUND + 1)
    assert sender.pending() == []


def test_a_restarted_node_resends_the_same_update_and_it_counts_once(tmp_path: Path) -> None:
    """Killed after storing (and partly sending) its update, the node sends the very same
    signed manifest (same nonce) after a restart; the coordinator counts it once."""
    key, pub = generate_keypair()
    save_private_key(key, tmp_path / "node.key")
    broker = MemoryBroker()
    coord = FakeCoordinator(broker, FED)
    coord.open_round = ROUND
    setup = Setup(tmp_path, signing_key=str(tmp_path / "node.key"))
    first = connect(broker, setup, Clock())
    pending = first.build(setup.manifest, setup.result, setup.global_path)
    verify_manifest(pending.manifest, pub)
    first.transport.publish(  # the manifest went out, then the process died
        "fl/fedtest/round/3/update/n1/manifest", pending.manifest.to_bytes()
    )
    first.transport.disconnect()

    restarted = connect(broker, setup, Clock())
    assert restarted.has_submitted(ROUND)
    restarted.service(ROUND)
    assert coord.counted == {(ROUND, "n1"): [pending.manifest.nonce]}
    assert restarted.pending() == []
    restarted.service(ROUND)  # nothing left to send
    assert coord.counted == {(ROUND, "n1"): [pending.manifest.nonce]}


def test_killed_between_storing_and_recording_the_update_never_trains_the_round_again(
    tmp_path: Path,
) -> None:
    """The kill lands after the update reached the outbox but before submitted.json was
    written (seen in the three-node Mosquitto test): the restarted node still counts the round
    as submitted, so it resends the stored update instead of training the round again."""
    broker = MemoryBroker()
    setup = Setup(tmp_path)
    first = connect(broker, setup, Clock())
    first.build(setup.manifest, setup.result, setup.global_path)
    first.transport.disconnect()
    first._submitted_path.unlink()  # the write the kill prevented
    restarted = connect(broker, setup, Clock())
    assert restarted.has_submitted(ROUND)
    assert [u.round for u in restarted.pending()] == [ROUND]


def test_eval_report_carries_only_aggregate_numbers(tmp_path: Path) -> None:
    report = eval_report(ROUND, "n1", BASE_VERSION, metrics())
    assert report.n_val == 8 and report.confusion == ((3, 1), (0, 4))
    assert set(report.metrics) == {"accuracy", "precision", "recall", "specificity", "f1", "auc"}
    no_auc = eval_report(ROUND, "n1", BASE_VERSION, from_confusion(2, 0, 0, 0))
    assert "auc" not in no_auc.metrics
