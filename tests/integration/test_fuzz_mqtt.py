"""Fuzzing the MQTT side: garbage at both daemons' handlers, then a valid round still completes.

- In-process: the coordinator service over ``fl_protocol``'s MemoryBroker takes random and
  truncated update manifests, manifests with one field replaced by arbitrary JSON or made
  inconsistent (wrong round, node, base version, sizes), chunks with random bytes and indices,
  chunks without a manifest, eval reports and node status messages of the same kinds, on its
  real topics and on near-miss topics. ``step()`` never raises, no handler error is logged by
  the broker, and afterwards three honest nodes complete both rounds, each counted once.
- Real processes over Mosquitto: a rogue client floods `fedscan coordinator run` with the same
  garbage (some of it retained); the rounds complete, the process exits 0, nothing is counted
  twice. A `fedscan node run` daemon with federation enabled gets garbage global manifests
  (retained), chunks and acks: it stays up, serves its model unchanged, and keeps predicting.

(The node's federation client alone is fuzzed over MemoryTransport in
tests/edge_node/federate/test_client.py.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from fedscan.brokers.mosquitto import Mosquitto
from fl_protocol.chunking import split
from fl_protocol.schemas import EvalReport, NodeStatus, UpdateManifest
from fl_protocol.signing import generate_keypair, save_public_key
from tests.conftest import ReliabilityProfile
from tests.coordinator.fakes import FEDERATION as MEM_FEDERATION
from tests.coordinator.fakes import FakeNode, NodeThread, make_delta
from tests.coordinator.world import World
from tests.helpers.dicom_factory import write_ct
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.coordinator_harness import (
    FEDERATION,
    all_finished,
    check_federation,
    make_resilient_nodes,
    seed_state,
    start_coordinator,
    start_nodes,
    stop_all,
    write_config,
)
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration

# -- garbage -------------------------------------------------------------------------------------

# What a node may publish (the production ACL): hostile input for the coordinator.
NODE_TOPICS = (
    "fl/{f}/round/{r}/update/{n}/manifest",
    "fl/{f}/round/{r}/update/{n}/chunk/{i}",
    "fl/{f}/round/{r}/metrics/{n}",
    "fl/{f}/node/{n}/status",
    "fl/{f}/round/{r}/update/{n}",  # near misses: wrong shape, bad numbers, other federation
    "fl/{f}/round/{r}/update/{n}/chunk/{i}/x",
    "fl/other/round/{r}/update/{n}/manifest",
    "fl/{f}/round/01/update/{n}/manifest",
    "fl/{f}/round/-1/update/{n}/chunk/{i}",
)
# What only the coordinator may publish: hostile input for a node (a broken coordinator or a
# broker without the ACL).
COORDINATOR_TOPICS = (
    "fl/{f}/global/current",
    "fl/{f}/global/{r}/chunk/{i}",
    "fl/{f}/round/{r}/ack/{n}",
    "fl/{f}/global/{r}/chunk/x",
    "fl/{f}/round/{r}/ack",
)
NODES = ("a", "b", "c", "node1", "zz", "a" * 64)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def good_messages(federation: str, round_: int, node: str) -> dict[str, bytes]:
    """Well-formed messages of each kind (the fuzzer truncates and corrupts these)."""
    payload, _chunks = split(b"\x01" * 3000, 1024)
    manifest = UpdateManifest(
        federation=federation,
        round=round_,
        node=node,
        base_version=round_ - 1,
        codec="fp16",
        num_samples=10,
        payload=payload,
        nonce="0" * 32,  # fixed, so the same draws give the same bytes
        created_at=0.0,
    )
    report = EvalReport(
        round=round_,
        node=node,
        model_version=0,
        n_val=4,
        metrics={"accuracy": 0.5},
        confusion=((1, 1), (1, 1)),
    )
    status = NodeStatus(
        node=node, state="online", model_version=0, capabilities=("predict",), ts=0.0
    )
    return {"manifest": manifest.to_bytes(), "eval": report.to_bytes(), "status": status.to_bytes()}


@st.composite
def garbage(
    draw: st.DrawFn, federation: str, templates: tuple[str, ...] = NODE_TOPICS
) -> tuple[str, bytes, bool]:
    """(topic, payload, retain) of one hostile message on one of ``templates``."""
    template = draw(st.sampled_from(templates))
    node = draw(st.sampled_from(NODES))
    round_ = draw(st.sampled_from([0, 1, 2, 3, 2**53 - 1]))
    index = draw(st.sampled_from([0, 1, 2, 3, 1000, 2**53 - 1]))
    topic = template.format(f=federation, r=round_, n=node, i=index)
    good = good_messages(federation, max(round_, 1) if round_ < 2**52 else 1, node)
    kind = draw(st.sampled_from(["bytes", "truncated", "field", "inconsistent", "empty"]))
    base = good[draw(st.sampled_from(sorted(good)))]
    if kind == "bytes":
        payload = draw(st.binary(max_size=2048))
    elif kind == "truncated":
        payload = base[: draw(st.integers(0, len(base) - 1))]
    elif kind == "field":
        doc = json.loads(base)
        doc[draw(st.sampled_from(sorted(doc)))] = draw(JSON)
        payload = json.dumps(doc).encode()
    elif kind == "inconsistent":
        doc = json.loads(base)
        if "payload" in doc:
            doc["payload"]["total_size"] = draw(st.sampled_from([0, 1, 2**40, 3000]))
            doc["payload"]["chunk_size"] = draw(st.sampled_from([1, 1024, 1 << 20]))
        for key in ("round", "base_version", "num_samples", "model_version", "n_val"):
            if key in doc:
                doc[key] = draw(st.sampled_from([0, 1, 2, 99, 2**53 - 1]))
        payload = json.dumps(doc).encode()
    else:
        payload = b""
    return topic, payload, draw(st.booleans())


# -- in process ----------------------------------------------------------------------------------


def test_garbage_at_the_coordinator_then_rounds_complete_in_memory(
    tmp_path: Path, reliability: ReliabilityProfile
) -> None:
    """Hostile messages on every topic a node may publish: ``step()`` never raises (the
    service's handlers only queue), and both rounds then complete with a, b, c each counted
    once."""
    w = World(tmp_path)
    w.service.start()
    rogue = w.broker.transport("rogue")
    rogue.connect()

    @settings(
        max_examples=reliability.fuzz_examples * 2,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
        derandomize=reliability.name == "quick",
    )
    @given(batch=st.lists(garbage(MEM_FEDERATION), min_size=1, max_size=8))
    def flood(batch: list[tuple[str, bytes, bool]]) -> None:
        for topic, payload, retain in batch:
            rogue.publish(topic, payload, qos=1, retain=retain)
        w.step()  # raises if any message escapes the service's handling
        w.clock.advance(1.0)

    flood()
    for round_id in (1, 2):
        for i, (name, n) in enumerate({"a": 10, "b": 30, "c": 60}.items()):
            node: FakeNode = w.nodes[name]
            node.send_update(make_delta(round_id * 10 + i), n)
        w.step()
        for name in "abc":
            ack = w.nodes[name].last_ack(round_id)
            assert ack is not None and ack.status == "complete", (round_id, name, ack)
    assert w.service.done
    state = w.service.state
    for round_id in (1, 2):
        rnd = state.round(round_id)
        assert (rnd.status, rnd.version_in, rnd.version_out) == ("closed", round_id - 1, round_id)
        counted = [u.node for u in state.updates(round_id, accepted=True)]
        assert counted == ["a", "b", "c"]
        assert all(u.counted_in_aggregate for u in state.updates(round_id, accepted=True))
    assert [v.version for v in state.versions()] == [0, 1, 2]


# -- real processes ------------------------------------------------------------------------------


def rogue_client(port: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rogue", clean_session=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def flood(
    client: mqtt.Client,
    federation: str,
    count: int,
    seed: int,
    templates: tuple[str, ...] = NODE_TOPICS,
) -> None:
    """Publish ``count`` hostile messages (Hypothesis examples, repeatable per ``seed``)."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: publishing is the point, nothing fails here
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(message=garbage(federation, templates))
    def publish(message: tuple[str, bytes, bool]) -> None:
        topic, payload, retain = message
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    publish()


def stop_started(threads: dict[str, NodeThread]) -> None:
    stop_all({k: t for k, t in threads.items() if t.ident is not None})


def test_garbage_at_a_real_coordinator_over_mosquitto(
    tmp_path: Path, mosquitto: Mosquitto, reliability: ReliabilityProfile
) -> None:
    """A rogue client floods `fedscan coordinator run` before and during round 1; honest nodes
    then complete both rounds, the process exits 0 and every update counts once."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}")
    seed_state(config)
    log = tmp_path / "coordinator.log"
    threads = make_resilient_nodes(mosquitto.port)
    proc = start_coordinator(config, log)
    rogue = rogue_client(mosquitto.port)
    try:
        wait_for(lambda: "round 1 opened" in log.read_text(), 60, "round 1")
        flood(rogue, FEDERATION, reliability.fuzz_examples * 4, seed=1)
        start_nodes(threads)
        flood(rogue, FEDERATION, reliability.fuzz_examples * 2, seed=2)
        wait_for(lambda: all_finished(threads) or proc.poll() is not None, 120, "two rounds")
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        rogue.loop_stop()
        rogue.disconnect()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop_started(threads)
    check_federation(config, threads)
    assert "Traceback" not in log.read_text()


def test_garbage_at_a_real_node_with_federation_enabled(
    tmp_path: Path, mosquitto: Mosquitto, reliability: ReliabilityProfile
) -> None:
    """`fedscan node run` follows a federation whose broker carries only garbage (retained
    manifests, chunks, acks for it): it stays up, serves its own model, predicts new files."""
    node = NodeProcess(tmp_path / "node")
    toml = node.toml.read_text()
    toml = toml.replace("enabled = false", "enabled = true")
    toml = toml.replace('federation = "demo"', f'federation = "{FEDERATION}"')
    toml = toml.replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{mosquitto.port}")
    node.toml.write_text(toml)
    (node.folder / "keys").mkdir(exist_ok=True)  # the key line `node init` wrote: no key, no run
    save_public_key(generate_keypair()[1], node.folder / "keys" / "coordinator.pub")
    make_classifier(node.folder / "models" / "current.onnx", version="7")
    rogue = rogue_client(mosquitto.port)
    try:
        hostile = COORDINATOR_TOPICS + NODE_TOPICS
        flood(rogue, FEDERATION, reliability.fuzz_examples * 2, 3, hostile)  # retained ones wait
        node.start()
        flood(rogue, FEDERATION, reliability.fuzz_examples * 2, 4, hostile)
        for i in range(3):
            write_ct(node.inbox / f"s{i}.dcm", rows=64, cols=64, seed=i)
        wait_for(lambda: node.n_predictions() >= 3, 60, "predictions during the flood")
        time.sleep(1.0)
        assert node.alive() and node.health()["model_version"] == "7"
        versions = {r[0] for r in node.query("SELECT model_version FROM predictions")}
        assert versions == {"7"}
        log = node.log.read_text()
        assert "federation" in log and "Traceback" not in log, log[-3000:]
        assert node.terminate() == 0
    finally:
        rogue.loop_stop()
        rogue.disconnect()
        node.kill()
