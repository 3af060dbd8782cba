"""The federation client end to end over the in-process broker: rounds, labels, restarts, wills.

A labelled workstation (real CT slices, real labels in SQLite) follows a scripted coordinator:
it installs the global model, evaluates it, trains cnn2d for real (one epoch, in-process),
and sends its delta; the coordinator decodes it with the real codec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_node.federate.client import FederationClient
from edge_node.ingest.preprocess import patient_key
from edge_node.train.compute_service import InProcessCompute
from edge_node.train.job import TrainJob, TrainResult
from fl_protocol import topics
from fl_protocol.errors import TransportError
from fl_protocol.schemas import Ack, NodeStatus
from fl_protocol.transport import MemoryBroker, MemoryTransport
from tests.helpers.dicom_factory import CT_SAMPLE, sample_path
from tests.helpers.federation import (
    FakeCoordinator,
    cnn2d_weights,
    node_config,
    published_by,
    round_config,
)
from tests.helpers.training import LabelledNode, make_labelled_node, pick_salt, write_slice


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class CountingCompute(InProcessCompute):
    """The real in-process compute, counting the trainings it ran."""

    def __init__(self) -> None:
        self.trained: list[TrainJob] = []

    def train(self, job: TrainJob) -> TrainResult:
        self.trained.append(job)
        return super().train(job)


class Swaps(list[tuple[Path, int]]):
    def __call__(self, path: Path, version: int) -> None:
        self.append((path, version))


class Node:
    def __init__(self, root: Path, broker: MemoryBroker, n_patients: int = 10) -> None:
        self.labelled: LabelledNode = make_labelled_node(root, n_patients=n_patients,
                                                         slices_per_patient=1)  # fmt: skip
        self.root = root
        self.broker = broker
        self.federation = pick_salt(self.labelled, 0.35)
        self.config = node_config(root, federation=self.federation)
        self.swaps = Swaps()
        self.compute = CountingCompute()

    def client(self, transport: MemoryTransport | None = None) -> FederationClient:
        client = FederationClient(
            self.config,
            self.swaps,
            transport or self.broker.transport("node-n1"),
            compute=self.compute,
            can_train=True,
            label_check_s=0.0,
        )
        client.connect()
        client.run_until_idle()
        return client


def identifiers(node: LabelledNode) -> list[bytes]:
    """Everything that must never appear in a published byte."""
    out = [u.encode() for u in node.uids]
    out += [p.encode() for p in node.patients]
    out += [patient_key(p).encode() for p in node.patients]
    out += [str(node.root).encode(), b"PAT-", b".dcm"]
    return out


def test_two_rounds_install_evaluate_train_and_send_with_nothing_identifying(
    tmp_path: Path,
) -> None:
    """v0 with round 1 open: the node serves v0, reports its evaluation, trains and sends a
    delta that is acknowledged; v1 with round 2: again, from v1. No published byte carries a
    UID, patient id or key, or a path."""
    broker = MemoryBroker()
    node = Node(tmp_path, broker)
    coord = FakeCoordinator(broker, node.federation)
    v0 = cnn2d_weights(0)
    coord.publish_global(0, v0, round_config(1))
    client = node.client()

    assert [v for _, v in node.swaps] == [0]
    assert len(node.compute.trained) == 1
    (report,) = coord.eval_reports
    assert (report.round, report.node, report.model_version) == (1, "n1", 0)
    assert report.n_val > 0 and sum(map(sum, report.confusion)) == report.n_val
    upload = coord.uploads[(1, "n1")]
    assert upload.acked == ["complete"] and upload.manifest.base_version == 0
    assert upload.manifest.num_samples >= 1
    delta = coord.delta(1, "n1")
    assert set(delta) == set(v0) and any(np.abs(d).max() > 0 for d in delta.values())
    assert client.sender.pending() == []

    v1 = {k: v + delta[k] for k, v in v0.items()}
    coord.publish_global(1, v1, round_config(2))
    client.run_until_idle()
    assert [v for _, v in node.swaps] == [0, 1]
    assert len(node.compute.trained) == 2
    assert coord.uploads[(2, "n1")].manifest.base_version == 1
    assert coord.uploads[(2, "n1")].acked == ["complete"]
    assert [r.model_version for r in coord.eval_reports] == [0, 1]

    client.run_until_idle()  # nothing more to do in a round already contributed to
    assert len(node.compute.trained) == 2
    client.stop()

    published = published_by(broker, "node-n1")
    assert published
    for msg in published:
        for ident in identifiers(node.labelled):
            assert ident not in msg.payload and ident.decode() not in msg.topic


def test_the_node_waits_for_enough_labels_then_trains(tmp_path: Path) -> None:
    """Fewer labels than the round asks for: no training; once radiologists drop labelled
    slices into inbox/labelled/<class>/, the next tick trains and sends."""
    broker = MemoryBroker()
    node = Node(tmp_path, broker)
    coord = FakeCoordinator(broker, node.federation)
    coord.publish_global(0, cnn2d_weights(0), round_config(1, min_labels=14))
    client = node.client()
    assert node.compute.trained == [] and (1, "n1") not in coord.uploads
    assert [v for _, v in node.swaps] == [0]  # the model is served all the same

    src = sample_path(CT_SAMPLE)
    for i in range(4):
        label = "covid" if i % 2 else "non_covid"
        dst = tmp_path / "inbox" / "labelled" / label / f"extra{i}.dcm"
        write_slice(src, dst, patient_id=f"PAT-X{i}", covid=bool(i % 2), seed=900 + i)
    client.tick()
    assert len(node.compute.trained) == 1
    assert coord.uploads[(1, "n1")].acked == ["complete"]
    client.stop()


def test_no_training_for_a_round_past_its_deadline(tmp_path: Path) -> None:
    broker = MemoryBroker()
    node = Node(tmp_path, broker)
    coord = FakeCoordinator(broker, node.federation)
    coord.publish_global(0, cnn2d_weights(0), round_config(1, deadline_in=-1.0))
    client = node.client()
    assert [v for _, v in node.swaps] == [0]
    assert node.compute.trained == [] and coord.uploads == {}
    client.stop()


class DyingTransport(MemoryTransport):
    """Loses the connection after ``allowed`` publishes (the node dies mid-upload)."""

    def __init__(self, broker: MemoryBroker, client_id: str, allowed: int) -> None:
        super().__init__(broker, client_id)
        self.allowed = allowed

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if "/update/" in topic:
            if self.allowed <= 0:
                self.drop()
                raise TransportError("connection lost")
            self.allowed -= 1
        super().publish(topic, payload, qos, retain)


def test_a_node_that_dies_mid_upload_resends_after_restart_and_counts_once(
    tmp_path: Path,
) -> None:
    """The connection dies after the manifest: the update waits in the outbox. A restarted
    client does not train again; it resends the same update, which the coordinator counts
    once, and the last will said "offline" in between."""
    broker = MemoryBroker()
    node = Node(tmp_path, broker)
    coord = FakeCoordinator(broker, node.federation, chunk_size=64 * 1024)
    coord.publish_global(0, cnn2d_weights(0), round_config(1))
    first = node.client(DyingTransport(broker, "node-n1", allowed=1))
    assert len(node.compute.trained) == 1
    assert coord.counted == {}
    status = NodeStatus.from_bytes(
        broker.retained[topics.node_status(node.federation, "n1")].payload
    )
    assert status.state == "offline"
    (pending,) = first.sender.pending()
    first.sync.close()

    second = node.client()
    assert len(node.compute.trained) == 1  # not trained again
    assert coord.counted == {(1, "n1"): [pending.manifest.nonce]}
    assert second.sender.pending() == []
    status = NodeStatus.from_bytes(
        broker.retained[topics.node_status(node.federation, "n1")].payload
    )
    assert (status.state, status.model_version) == ("online", 0)
    second.stop()
    status = NodeStatus.from_bytes(
        broker.retained[topics.node_status(node.federation, "n1")].payload
    )
    assert status.state == "offline"


def test_a_pending_update_of_a_closed_round_is_dropped(tmp_path: Path) -> None:
    """The coordinator moved on (new version, round 2) while an update for round 1 waited
    unacknowledged: it is dropped, and the node contributes to round 2 instead."""
    broker = MemoryBroker()
    node = Node(tmp_path, broker)
    coord = FakeCoordinator(broker, node.federation)
    coord.ack = lambda *a, **k: None  # type: ignore[method-assign]  # a silent coordinator
    coord.publish_global(0, cnn2d_weights(0), round_config(1))
    client = node.client()
    assert [p.round for p in client.sender.pending()] == [1]
    coord.publish_global(1, cnn2d_weights(1), round_config(2))
    client.run_until_idle()
    assert [p.round for p in client.sender.pending()] == [2]
    assert len(node.compute.trained) == 2
    client.stop()


# -- hostile input -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    topic=st.sampled_from(
        [
            "fl/{f}/global/current",
            "fl/{f}/global/0/chunk/0",
            "fl/{f}/global/9/chunk/1",
            "fl/{f}/round/1/ack/n1",
            "fl/{f}/round/x/ack/n1",
        ]
    ),
)
def test_fuzzed_manifests_chunks_and_acks_never_crash_the_client(
    fuzz_node: tuple[Node, FakeCoordinator, FederationClient], data: st.DataObject, topic: str
) -> None:
    """Random bytes, or a valid message with one field replaced by arbitrary JSON, on every
    topic the node listens to: the client logs and carries on, serving the same model."""
    node, coord, client = fuzz_node
    if data.draw(st.booleans()):
        payload = data.draw(st.binary(max_size=300))
    else:
        base = json.loads(GOOD_MESSAGES[topic.split("/")[2] if "global" in topic else "ack"])
        key = data.draw(st.sampled_from(sorted(base)))
        base[key] = data.draw(JSON)
        payload = json.dumps(base).encode()
    coord.t.publish(topic.format(f=node.federation), payload)
    client.run_until_idle()
    assert [v for _, v in node.swaps] == [0]


GOOD_MESSAGES: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("fuzz")
    broker = MemoryBroker()
    node = Node(root, broker, n_patients=4)
    coord = FakeCoordinator(broker, node.federation)
    manifest = coord.publish_global(0, cnn2d_weights(0))
    GOOD_MESSAGES["global"] = manifest.to_bytes()
    GOOD_MESSAGES["ack"] = Ack(round=1, node="n1", status="missing", missing=(0,)).to_bytes()
    client = node.client()
    assert [v for _, v in node.swaps] == [0]
    yield node, coord, client
    client.stop()
