"""MQTT peers over TLS with client certificates, for the broker security tests."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from fedscan.provision import KIT

WAIT = 5.0  # seconds: upper bound for one broker round trip on a loaded 2-core machine


def tls_context(ca: Path, kit: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if kit is not None:
        ctx.load_cert_chain(kit / KIT.cert, kit / KIT.key)
    return ctx


@dataclass
class Peer:
    """A paho client whose connection outcome and received messages can be awaited."""

    client: mqtt.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    connack: object = None
    disconnects: list[str] = field(default_factory=list)
    error: str | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def topics(self) -> list[str]:
        with self.changed:
            return [t for t, _ in self.messages]

    def wait_topic(self, topic: str) -> bool:
        return self.wait_for(lambda: any(t == topic for t, _ in self.messages))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        return info

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(WAIT), f"no SUBACK for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    port: int,
    ctx: ssl.SSLContext | None,
    *,
    client_id: str = "peer",
    username: str | None = None,
    protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
) -> Peer:
    """Connect and wait for CONNACK or refusal; never reconnects (a kick stays visible)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=False,
    )
    if ctx is not None:
        client.tls_set_context(ctx)
    if username is not None:
        client.username_pw_set(username)
    peer = Peer(client)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        with peer.changed:
            peer.connack = rc
            peer.changed.notify_all()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        with peer.changed:
            peer.disconnects.append(str(rc))
            peer.changed.notify_all()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with peer.changed:
            peer.messages.append((msg.topic, bytes(msg.payload)))
            peer.changed.notify_all()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:  # refused during the TLS handshake
        peer.error = repr(exc)
        return peer
    client.loop_start()
    peer.wait_for(lambda: peer.connack is not None or bool(peer.disconnects))
    return peer


def is_accepted(peer: Peer) -> bool:
    return peer.error is None and str(peer.connack) == "Success" and peer.client.is_connected()
