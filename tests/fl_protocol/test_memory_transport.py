"""MemoryBroker / MemoryTransport: the in-process MQTT the daemons' unit tests run on."""

from __future__ import annotations

import pytest

from fl_protocol.errors import TransportError
from fl_protocol.transport import MemoryBroker, MemoryTransport, Message, Transport


def collect(t: MemoryTransport, topic_filter: str) -> list[Message]:
    got: list[Message] = []
    t.subscribe(topic_filter, got.append)
    return got


def test_it_is_a_transport() -> None:
    assert isinstance(MemoryBroker().transport("a"), Transport)


def test_retained_message_reaches_a_late_subscriber_and_empty_payload_clears() -> None:
    broker = MemoryBroker()
    pub = broker.transport("coordinator")
    pub.connect()
    pub.publish("fl/d/global/current", b"v1", retain=True)
    pub.publish("fl/d/global/current", b"v2", retain=True)
    late = broker.transport("node")
    got = collect(late, "fl/d/global/#")
    late.connect()
    assert [(m.payload, m.retain) for m in got] == [(b"v2", True)]
    pub.publish("fl/d/global/current", b"", retain=True)
    assert got[-1].payload == b"" and not got[-1].retain
    again = broker.transport("node2")
    got_again = collect(again, "fl/d/global/#")
    again.connect()
    assert got_again == [] and broker.retained == {}


def test_wildcards_route_only_matching_topics() -> None:
    broker = MemoryBroker()
    sub = broker.transport("s")
    plus = collect(sub, "fl/d/round/+/update/a/manifest")
    hash_ = collect(sub, "fl/d/round/#")
    sub.connect()
    pub = broker.transport("p")
    pub.connect()
    pub.publish("fl/d/round/1/update/a/manifest", b"1")
    pub.publish("fl/d/round/1/update/b/manifest", b"2")
    pub.publish("fl/d/global/current", b"3")
    assert [m.payload for m in plus] == [b"1"]
    assert [m.payload for m in hash_] == [b"1", b"2"]


def test_qos1_messages_queue_for_an_offline_persistent_client() -> None:
    """A node briefly offline (clean_session=False) gets what was published meanwhile."""
    broker = MemoryBroker()
    node = broker.transport("node-a")
    got = collect(node, "fl/d/round/+/ack/node-a")
    node.connect()
    node.disconnect()
    coord = broker.transport("coord")
    coord.connect()
    coord.publish("fl/d/round/1/ack/node-a", b"ack", qos=1)
    coord.publish("fl/d/round/1/ack/node-a", b"qos0 is dropped", qos=0)
    assert got == []
    restarted = broker.transport("node-a")  # a new process with the same client id
    got2 = collect(restarted, "fl/d/round/+/ack/node-a")
    restarted.connect()
    assert [m.payload for m in got2] == [b"ack"]


def test_clean_session_client_gets_nothing_queued() -> None:
    broker = MemoryBroker()
    t = broker.transport("x", clean_session=True)
    collect(t, "a/#")
    t.connect()
    t.disconnect()
    p = broker.transport("p")
    p.connect()
    p.publish("a/b", b"1")
    t2 = broker.transport("x", clean_session=True)
    got = collect(t2, "a/#")
    t2.connect()
    assert got == []


def test_will_is_published_on_drop_not_on_disconnect() -> None:
    broker = MemoryBroker()
    watcher = broker.transport("coord")
    status = collect(watcher, "fl/d/node/+/status")
    watcher.connect()
    node = broker.transport("node-a")
    node.set_will("fl/d/node/node-a/status", b"offline", retain=True)
    node.connect()
    node.disconnect()
    assert status == []
    node.connect()
    node.drop()
    assert [m.payload for m in status] == [b"offline"]
    assert broker.retained["fl/d/node/node-a/status"].payload == b"offline"


def test_handlers_may_publish_without_reentrancy_and_errors_do_not_stop_delivery() -> None:
    broker = MemoryBroker()
    a, b = broker.transport("a"), broker.transport("b")
    depth = [0]
    order: list[str] = []

    def ping(m: Message) -> None:
        depth[0] += 1
        assert depth[0] == 1, "handler re-entered"
        order.append(m.topic)
        if m.topic == "t/1":
            a.publish("t/2", b"")
            order.append("after publish")
        depth[0] -= 1

    def boom(m: Message) -> None:
        raise RuntimeError("handler bug")

    b.subscribe("t/#", boom)
    b.subscribe("t/#", ping)
    a.connect()
    b.connect()
    a.publish("t/1", b"")
    assert order == ["t/1", "after publish", "t/2"]
    assert len(broker.handler_errors) == 2


def test_connect_callback_runs_on_every_connect() -> None:
    broker = MemoryBroker()
    t = broker.transport("n")
    calls: list[bool] = []
    t.add_connect_callback(lambda: calls.append(t.is_connected))
    t.connect()
    t.drop()
    t.connect()
    assert calls == [True, True]


def test_publish_checks() -> None:
    broker = MemoryBroker(max_payload=10)
    t = broker.transport("n")
    with pytest.raises(TransportError, match="not connected"):
        t.publish("a", b"")
    t.connect()
    for bad in ("", "a/+", "a/#"):
        with pytest.raises(TransportError):
            t.publish(bad, b"")
    with pytest.raises(TransportError, match="exceeds"):
        t.publish("a", b"x" * 11)
    for bad_filter in ("", "a/#/b", "a+/b", "a/b#"):
        with pytest.raises(TransportError):
            t.subscribe(bad_filter, lambda m: None)


def test_takeover_by_same_client_id_publishes_the_old_will() -> None:
    broker = MemoryBroker()
    w = broker.transport("w")
    got = collect(w, "status")
    w.connect()
    old = broker.transport("node")
    old.set_will("status", b"offline")
    old.connect()
    new = broker.transport("node")
    new.connect()
    assert not old.is_connected and new.is_connected
    assert [m.payload for m in got] == [b"offline"]
