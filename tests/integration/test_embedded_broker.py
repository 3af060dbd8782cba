"""The pure-Python EmbeddedBroker, exercised by real paho clients over loopback sockets.

The same transport scenarios as on Mosquitto, plus broker-level behaviour: retained and
wildcards with raw paho clients, wills, 1 MiB payloads, 50 concurrent clients, oversized and
malformed packets, QoS 2 downgrade, persistent sessions, and the ``python -m`` entry point.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from fl_protocol.broker import EmbeddedBroker
from tests.integration.mqtt_raw import Raw
from tests.integration.transport_scenarios import SCENARIOS, BrokerLike, Inbox, client

pytestmark = pytest.mark.integration


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_paho_transport_on_embedded_broker(
    broker: EmbeddedBroker, scenario: Callable[[BrokerLike], None]
) -> None:
    scenario(broker)


def test_retained_and_wildcards_with_raw_paho(broker: EmbeddedBroker) -> None:
    """Retained messages replay to matching new subscriptions; + and # route correctly."""
    pub = Raw(broker.port, "pub")
    pub.c.publish("fl/d/global/current", b"m", qos=1, retain=True).wait_for_publish(5)
    pub.c.publish("fl/d/global/3/chunk/0", b"c0", qos=1, retain=True).wait_for_publish(5)
    pub.c.publish("fl/d/node/a/status", b"on", qos=1, retain=True).wait_for_publish(5)
    sub = Raw(broker.port, "sub")
    sub.sub("fl/d/global/+/chunk/+")
    got = sub.wait(1)
    assert [(m.topic, m.payload, m.retain) for m in got] == [("fl/d/global/3/chunk/0", b"c0", True)]
    sub.sub("fl/d/#")
    assert len(sub.wait(4)) == 4  # the three retained again (new subscription), routed once
    pub.c.publish("fl/d/round/1/update/a/manifest", b"u", qos=1).wait_for_publish(5)
    pub.c.publish("other/topic", b"x", qos=1).wait_for_publish(5)
    got = sub.wait(5)
    assert got[-1].topic == "fl/d/round/1/update/a/manifest" and not got[-1].retain
    pub.c.publish("fl/d/global/current", b"", qos=1, retain=True).wait_for_publish(5)
    late = Raw(broker.port, "late")
    late.sub("fl/d/global/current")
    time.sleep(0.3)
    assert late.got == []  # the empty retained message cleared it
    for c in (pub, sub, late):
        c.close()


def test_will_on_abrupt_disconnect_not_on_clean_one(broker: EmbeddedBroker) -> None:
    watch = Raw(broker.port, "watch")
    watch.sub("fl/d/node/+/status")
    clean = Raw(broker.port, "n1", topic="fl/d/node/n1/status", payload=b"offline", qos=1)
    clean.close()
    abrupt = Raw(broker.port, "n2", topic="fl/d/node/n2/status", payload=b"offline", retain=True)
    time.sleep(0.2)
    abrupt.c.loop_stop()
    sock = abrupt.c.socket()
    assert isinstance(sock, socket.socket)
    sock.close()
    got = watch.wait(1)
    assert [(m.topic, m.payload) for m in got] == [("fl/d/node/n2/status", b"offline")]
    watch.close()


def test_fifty_concurrent_clients(broker: EmbeddedBroker) -> None:
    """50 nodes subscribe to their own ack topic; each gets exactly its own ack and status."""
    nodes = [Raw(broker.port, f"node-{i}") for i in range(50)]
    for i, n in enumerate(nodes):
        n.sub(f"fl/d/round/+/ack/node-{i}")
        n.c.subscribe("fl/d/global/current", 1)
    coord = Raw(broker.port, "coord")
    coord.sub("fl/d/round/+/update/+/manifest")
    for i, n in enumerate(nodes):
        n.c.publish(f"fl/d/round/1/update/node-{i}/manifest", f"m{i}".encode(), qos=1)
    assert len(coord.wait(50)) == 50
    for i in range(50):
        coord.c.publish(f"fl/d/round/1/ack/node-{i}", f"ack{i}".encode(), qos=1)
    coord.c.publish("fl/d/global/current", b"v2", qos=1, retain=True)
    for i, n in enumerate(nodes):
        got = sorted(m.payload for m in n.wait(2))
        assert got == sorted([f"ack{i}".encode(), b"v2"])
    for c in [*nodes, coord]:
        c.close()


def test_one_mib_payload_and_oversized_packet_drops_only_that_client(
    broker: EmbeddedBroker,
) -> None:
    sub = Raw(broker.port, "sub")
    sub.sub("big/#")
    pub = Raw(broker.port, "pub")
    blob = bytes(range(256)) * 4096
    pub.c.publish("big/1", blob, qos=1).wait_for_publish(10)
    assert sub.wait(1)[0].payload == blob
    # a raw client sends a PUBLISH header announcing 3 MiB: the broker drops it at once
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(_connect_packet(b"hostile"))
        assert s.recv(4)[:1] == b"\x20"
        s.sendall(b"\x30" + bytes([0x80, 0x80, 0xC0, 0x01]))  # remaining length 3 MiB
        s.settimeout(5)
        assert s.recv(10) == b""  # closed by the broker
    pub.c.publish("big/2", b"still fine", qos=1).wait_for_publish(5)
    assert sub.wait(2)[1].payload == b"still fine"
    sub.close()
    pub.close()


def _connect_packet(client_id: bytes, flags: int = 0x02) -> bytes:
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x0a" + len(client_id).to_bytes(2, "big")
    body += client_id
    return bytes([0x10, len(body)]) + body


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x30\x00",  # PUBLISH before CONNECT
        b"\xff\xff\xff\xff\xff\xff",  # remaining length over 4 bytes
        b"\x10\x03\x00\x04M",  # truncated CONNECT
        _connect_packet(b"x", flags=0x03),  # reserved flag set
        _connect_packet(b"", flags=0x00),  # empty id with persistent session
    ],
)
def test_malformed_clients_are_dropped_and_broker_keeps_working(
    broker: EmbeddedBroker, garbage: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(15)
        while s.recv(100):  # a CONNACK refusal at most, then the close
            pass
    ok = Raw(broker.port, "after")
    ok.sub("t")
    ok.c.publish("t", b"1", qos=1)
    assert ok.wait(1)[0].payload == b"1"
    ok.close()


def test_qos2_is_downgraded_to_qos1(broker: EmbeddedBroker) -> None:
    sub = Raw(broker.port, "sub")
    sub.sub("q/#", qos=2)
    assert sub.subacks[-1] == [1]
    pub = Raw(broker.port, "pub")
    pub.c.publish("q/2", b"exactly once?", qos=2).wait_for_publish(5)
    got = sub.wait(1)
    assert [(m.payload, m.qos) for m in got] == [(b"exactly once?", 1)]
    for c in (sub, pub):
        c.close()


def test_invalid_filter_gets_a_failure_code_in_suback(broker: EmbeddedBroker) -> None:
    """paho refuses to send a bad filter, so a raw client does: a/#/b and a+ fail, a/+ works."""
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
        s.sendall(_connect_packet(b"raw-sub"))
        assert s.recv(4) == b"\x20\x02\x00\x00"
        body = b"\x00\x07"
        for f in (b"a/#/b", b"a+", b"a/+"):
            body += len(f).to_bytes(2, "big") + f + b"\x01"
        s.sendall(bytes([0x82, len(body)]) + body)
        assert s.recv(7) == b"\x90\x05\x00\x07\x80\x80\x01"


def test_persistent_session_queues_while_offline_and_survives_restart(
    broker: EmbeddedBroker,
) -> None:
    node = Raw(broker.port, "node", clean=False)
    node.sub("fl/d/round/+/ack/node")
    node.close()
    coord = Raw(broker.port, "coord")
    coord.c.publish("fl/d/round/2/ack/node", b"complete", qos=1).wait_for_publish(5)
    coord.c.publish("fl/d/round/2/ack/node", b"qos0", qos=0)
    coord.close()
    broker.stop()
    broker.start()  # same object, same port: sessions are kept in memory
    back = Raw(broker.port, "node", clean=False)
    got = back.wait(1)
    time.sleep(0.2)
    assert [m.payload for m in back.got] == [b"complete"] and got
    back.close()


def test_python_dash_m_entry_point() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_protocol.broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == f"listening on 127.0.0.1:{port}"
        t = client(port, "cli-check")
        inbox = Inbox()
        t.subscribe("x", inbox)
        t.connect()
        t.publish("x", b"hi")
        assert inbox.wait_for(lambda ms: len(ms) == 1)
        t.disconnect()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def _read_packet(s: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            part = s.recv(n - len(out))
            assert part, "connection closed"
            out += part
        return out

    first = exactly(1)[0]
    length, mult = 0, 1
    while True:
        b = exactly(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return first >> 4, exactly(length)


def test_a_client_that_does_not_ack_gets_at_most_max_inflight() -> None:
    """Flow control: unacknowledged QoS 1 messages are capped; each PUBACK releases the next,
    in publish order."""
    with (
        EmbeddedBroker(max_inflight=3) as broker,
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s,
    ):
        s.sendall(_connect_packet(b"slow"))
        assert _read_packet(s) == (2, b"\x00\x00")
        body = b"\x00\x01\x00\x03q/+\x01"
        s.sendall(bytes([0x82, len(body)]) + body)
        assert _read_packet(s)[0] == 9
        pub = Raw(broker.port, "pub")
        for i in range(5):
            pub.c.publish(f"q/{i}", b"", qos=1).wait_for_publish(5)
        got = [_read_packet(s) for _ in range(3)]
        assert [body[2:5] for _, body in got] == [b"q/0", b"q/1", b"q/2"]
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)  # nothing more until we acknowledge
        s.settimeout(5)
        pid = got[0][1][5:7]
        s.sendall(b"\x40\x02" + pid)  # PUBACK the first
        kind, body3 = _read_packet(s)
        assert kind == 3 and body3[2:5] == b"q/3"
        pub.close()


def test_connect_can_be_retried_until_the_broker_appears() -> None:
    """A daemon retrying connect() after TransportError gets through once the broker is up,
    with the handlers it registered before the first attempt."""
    from fl_protocol.errors import TransportError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = client(port, "retrier", connect_timeout_s=1.0)
    inbox = Inbox()
    t.subscribe("fl/d/global/current", inbox)
    with pytest.raises(TransportError):
        t.connect()
    with EmbeddedBroker(port=port) as b:
        t.connect()
        try:
            other = client(b.port, "coord")
            other.connect()
            other.publish("fl/d/global/current", b"m", retain=True)
            assert inbox.wait_for(lambda ms: len(ms) == 1)
            other.disconnect()
        finally:
            t.disconnect()
