"""Transport scenarios run against every real broker (Mosquitto and the embedded broker).

Each function takes a broker object with ``port``, ``start()`` and ``stop()`` (the Mosquitto
harness and ``EmbeddedBroker`` both qualify) and asserts what the daemons rely on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

import pytest

from fl_protocol.errors import TransportError
from fl_protocol.transport import Message, MqttSettings, PahoTransport
from tests.helpers.wait import eventually


class BrokerLike(Protocol):
    port: int

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Inbox:
    """Thread-safe message collector with a bounded wait."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._cv = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self._cv:
            self.messages.append(message)
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[list[Message]], bool], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def payloads(self) -> list[bytes]:
        with self._cv:
            return [m.payload for m in self.messages]


def client(port: int, client_id: str, **kw: object) -> PahoTransport:
    opts: dict[str, object] = {"reconnect_min_s": 1, "reconnect_max_s": 2, "keepalive": 10}
    opts.update(kw)
    return PahoTransport(MqttSettings(port=port, client_id=client_id, **opts))  # type: ignore[arg-type]


def retained_reaches_late_subscriber(broker: BrokerLike) -> None:
    """The coordinator's retained manifest is what a node that connects later receives."""
    coord = client(broker.port, "coord")
    coord.connect()
    node = client(broker.port, "node-late")
    try:
        coord.publish("fl/d/global/current", b"manifest v1", retain=True)
        coord.publish("fl/d/global/current", b"manifest v2", retain=True)
        inbox = Inbox()
        node.subscribe("fl/d/global/#", inbox)
        node.connect()
        assert inbox.wait_for(lambda ms: len(ms) >= 1)
        assert inbox.messages[0].payload == b"manifest v2" and inbox.messages[0].retain
    finally:
        node.disconnect()
        coord.disconnect()


def restart_reconnects_and_resubscribes(broker: BrokerLike) -> None:
    """A broker restart: both clients reconnect on their own and the subscription works."""
    sub = client(broker.port, "sub-restart")
    pub = client(broker.port, "pub-restart")
    connects = []
    sub.add_connect_callback(lambda: connects.append(time.monotonic()))
    inbox = Inbox()
    sub.subscribe("fl/d/round/+/update/#", inbox)
    sub.connect()
    pub.connect()
    try:
        pub.publish("fl/d/round/1/update/a/manifest", b"before")
        assert inbox.wait_for(lambda ms: b"before" in [m.payload for m in ms])
        broker.stop()
        assert eventually(lambda: not sub.is_connected and not pub.is_connected)
        with pytest.raises(TransportError, match="not connected"):
            pub.publish("fl/d/round/1/update/a/chunk/0", b"while down")
        broker.start()
        assert eventually(lambda: sub.is_connected and pub.is_connected)
        assert eventually(lambda: len(connects) == 2)
        pub.publish("fl/d/round/1/update/a/chunk/0", b"after")
        assert inbox.wait_for(lambda ms: b"after" in [m.payload for m in ms])
    finally:
        pub.disconnect()
        sub.disconnect()


def one_mib_chunk_passes(broker: BrokerLike) -> None:
    """A full 1 MiB chunk goes through; more than the 2 MiB limit is refused before sending."""
    pub = client(broker.port, "pub-big")
    sub = client(broker.port, "sub-big")
    inbox = Inbox()
    sub.subscribe("fl/d/global/7/chunk/+", inbox)
    sub.connect()
    pub.connect()
    try:
        chunk = bytes(range(256)) * 4096
        assert len(chunk) == 1024 * 1024
        pub.publish("fl/d/global/7/chunk/0", chunk, retain=True)
        assert inbox.wait_for(lambda ms: len(ms) == 1)
        assert inbox.messages[0].payload == chunk
        with pytest.raises(TransportError, match="over"):
            pub.publish("fl/d/global/7/chunk/1", b"x" * (2 * 1024 * 1024 + 1))
        assert pub.is_connected
    finally:
        pub.disconnect()
        sub.disconnect()


def offline_node_gets_queued_qos1(broker: BrokerLike) -> None:
    """A node away for a moment (same client id, persistent session) gets its ack later."""
    node = client(broker.port, "node-away")
    inbox = Inbox()
    node.subscribe("fl/d/round/+/ack/node-away", inbox)
    node.connect()
    node.disconnect()
    coord = client(broker.port, "coord-q")
    coord.connect()
    try:
        coord.publish("fl/d/round/3/ack/node-away", b"complete")
        back = client(broker.port, "node-away")
        inbox2 = Inbox()
        back.subscribe("fl/d/round/+/ack/node-away", inbox2)
        back.connect()
        try:
            assert inbox2.wait_for(lambda ms: b"complete" in [m.payload for m in ms])
        finally:
            back.disconnect()
    finally:
        coord.disconnect()


def will_on_abrupt_loss(broker: BrokerLike) -> None:
    """A node whose connection dies is reported offline by its last will."""
    watcher = client(broker.port, "watcher")
    inbox = Inbox()
    watcher.subscribe("fl/d/node/+/status", inbox)
    watcher.connect()
    node = client(broker.port, "node-will")
    node.set_will("fl/d/node/node-will/status", b"offline", retain=True)
    node.connect()
    try:
        node.publish("fl/d/node/node-will/status", b"online", retain=True)
        assert inbox.wait_for(lambda ms: b"online" in [m.payload for m in ms])
        sock = node._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the link dies without a DISCONNECT
        assert inbox.wait_for(lambda ms: b"offline" in [m.payload for m in ms])
    finally:
        node.disconnect()
        watcher.disconnect()


def handlers_publish_and_survive_errors(broker: BrokerLike) -> None:
    """A handler that publishes (an ack) works; a handler that raises stops nothing."""
    coord = client(broker.port, "coord-h")
    node = client(broker.port, "node-h")
    acks = Inbox()
    calls = []

    def on_manifest(m: Message) -> None:
        calls.append(m.payload)
        if m.payload == b"boom":
            raise RuntimeError("handler bug")
        coord.publish("fl/d/round/1/ack/n", b"ack:" + m.payload)  # waits for PUBACK

    coord.subscribe("fl/d/round/+/update/+/manifest", on_manifest)
    node.subscribe("fl/d/round/+/ack/n", acks)
    coord.connect()
    node.connect()
    try:
        node.publish("fl/d/round/1/update/n/manifest", b"boom")
        node.publish("fl/d/round/1/update/n/manifest", b"m1")
        assert acks.wait_for(lambda ms: len(ms) == 1)
        assert acks.payloads() == [b"ack:m1"] and calls == [b"boom", b"m1"]
    finally:
        node.disconnect()
        coord.disconnect()


def unreachable_broker_raises(broker: BrokerLike) -> None:
    """connect() to nothing raises TransportError after its timeout instead of hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    t = client(dead_port, "nobody", connect_timeout_s=1.0)
    with pytest.raises(TransportError, match="cannot connect"):
        t.connect()
    assert not t.is_connected
    background = client(dead_port, "patient")
    background.connect(wait=False)  # a daemon started before its broker keeps trying
    assert not background.is_connected
    background.disconnect()


SCENARIOS = [
    retained_reaches_late_subscriber,
    restart_reconnects_and_resubscribes,
    one_mib_chunk_passes,
    offline_node_gets_queued_qos1,
    will_on_abrupt_loss,
    handlers_publish_and_survive_errors,
    unreachable_broker_raises,
]
