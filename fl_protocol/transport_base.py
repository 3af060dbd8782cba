"""The narrow MQTT interface the daemons program against, shared by every implementation.

``Transport`` is all the coordinator and the edge node see of MQTT; ``PahoTransport`` (real
broker) and ``MemoryTransport`` (in-process, for unit tests) implement it with the same
semantics: QoS 1 at-least-once, retained messages replayed to new subscriptions, ``+`` / ``#``
filters, a last will on abrupt disconnection, and handlers that run outside the network loop
(they may publish; an exception in one is logged and never stops delivery).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from paho.mqtt.client import topic_matches_sub

from fl_protocol.errors import TransportError

log = logging.getLogger(__name__)

MAX_PAYLOAD = 2 * 1024 * 1024  # the broker's max packet size; chunks are <= 1 MiB


@dataclass(frozen=True)
class Message:
    """One received MQTT message; ``retain`` is True when replayed from the retained store."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


Handler = Callable[[Message], None]


@runtime_checkable
class Transport(Protocol):
    """What the daemons need from MQTT, and nothing more."""

    def connect(self) -> None:
        """Connect (and keep reconnecting); TransportError if the broker refuses or is absent."""

    def disconnect(self) -> None:
        """Leave cleanly: the last will is not published."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send; with qos 1 return only once the broker acknowledged (TransportError if not)."""

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Call ``handler`` for every message matching ``topic_filter`` (QoS 1), from now on
        and after every reconnect. Register before ``connect()`` so that messages the broker
        queued for this client while it was offline find their handler."""

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter`` and forget its handlers."""

    def set_will(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Message the broker publishes if this client vanishes; used from the next connect."""

    def add_connect_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (outside the network loop) after every successful (re)connect."""

    @property
    def is_connected(self) -> bool:
        """Whether the client is connected right now."""


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker; TLS is on when ``ca_file`` is set."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # stable per participant: the broker keeps its session (QoS 1 queue)
    keepalive: int = 30  # seconds between pings; the will fires after ~1.5x this
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # CA that signed the broker certificate (enables TLS)
    cert_file: str | None = None  # this participant's client certificate
    key_file: str | None = None  # its private key
    tls_check_hostname: bool = True  # the broker certificate must name ``host``
    clean_session: bool = False  # False: the broker queues QoS 1 messages while we are away
    connect_timeout_s: float = 10.0  # connect(): how long to wait for the first CONNACK
    publish_timeout_s: float = 30.0  # publish(): how long to wait for a PUBACK
    reconnect_min_s: int = 1  # reconnect back-off, doubling up to reconnect_max_s
    reconnect_max_s: int = 30
    max_payload: int = MAX_PAYLOAD  # larger incoming messages are dropped and logged

    def __post_init__(self) -> None:
        if not self.client_id or len(self.client_id) > 128 or not self.client_id.isprintable():
            raise TransportError("mqtt: client_id must be 1-128 printable characters")
        if not 0 < self.port < 65536 or self.keepalive < 5:
            raise TransportError("mqtt: port must be 1-65535 and keepalive >= 5 s")
        if self.connect_timeout_s <= 0 or self.publish_timeout_s <= 0:
            raise TransportError("mqtt: timeouts must be > 0")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise TransportError("mqtt: need 1 <= reconnect_min_s <= reconnect_max_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise TransportError("mqtt: cert_file and key_file go together")
        if self.cert_file is not None and self.ca_file is None:
            raise TransportError("mqtt: a client certificate needs ca_file (TLS)")

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @classmethod
    def from_url(cls, url: str, client_id: str, **kwargs: object) -> MqttSettings:
        """``mqtt://host:port`` (default 1883) or ``mqtts://host:port`` (default 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise TransportError(f"broker URL must be mqtt://host:port or mqtts://host:port: {url}")
        if parts.scheme == "mqtts" and kwargs.get("ca_file") is None:
            raise TransportError("mqtts:// needs ca_file")
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        return cls(host=parts.hostname, port=port, client_id=client_id, **kwargs)  # type: ignore[arg-type]


def check_topic(topic: str) -> None:
    """A publish topic: non-empty, no wildcards, no NUL, at most 65535 UTF-8 bytes."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise TransportError(f"invalid publish topic {topic[:80]!r}")
    if len(topic.encode("utf-8")) > 65535:
        raise TransportError("topic too long")


def check_filter(topic_filter: str) -> None:
    """A subscription filter: ``+`` alone in a level, ``#`` alone in the last level."""
    levels = topic_filter.split("/") if topic_filter else []
    ok = bool(levels) and "\x00" not in topic_filter
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            ok = False
        if level == "#" and i != len(levels) - 1:
            ok = False
    if not ok:
        raise TransportError(f"invalid topic filter {topic_filter[:80]!r}")


class HandlerTable:
    """Handlers by topic filter; dispatch calls each matching one, logging its exceptions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[str, list[Handler]] = {}

    def add(self, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._handlers.setdefault(topic_filter, []).append(handler)

    def remove(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)

    def filters(self) -> list[str]:
        with self._lock:
            return list(self._handlers)

    def dispatch(self, message: Message) -> list[BaseException]:
        """Deliver ``message``; returns the exceptions handlers raised (already logged)."""
        with self._lock:
            matching = [
                h
                for f, hs in self._handlers.items()
                if topic_matches_sub(f, message.topic)
                for h in hs
            ]
        if not matching:
            log.debug("no handler for %s", message.topic)
        errors: list[BaseException] = []
        for handler in matching:
            try:
                handler(message)
            except Exception as exc:
                log.exception("handler for %s failed", message.topic)
                errors.append(exc)
        return errors
