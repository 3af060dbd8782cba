"""An in-process broker and transport with MQTT semantics, for unit tests without a network.

Same behaviour as a real broker for what the daemons rely on: retained messages (an empty
retained payload clears), ``+`` / ``#`` filters, QoS 1 messages queued for a client with a
persistent session (``clean_session=False``) while it is offline, last will on ``drop()``
(abrupt loss) but not on ``disconnect()``, and handlers run outside the publisher's call stack.

Delivery is synchronous and deterministic: the first ``publish`` on a thread delivers every
message (and every message those handlers publish) before it returns; nested publishes from
handlers are queued, never re-entered. ``MemoryBroker.published`` records every message
published (tests scan it, e.g. for identifiers that must never leave a node).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from fl_protocol.errors import TransportError
from fl_protocol.transport_base import (
    MAX_PAYLOAD,
    Handler,
    HandlerTable,
    Message,
    check_filter,
    check_topic,
)

log = logging.getLogger(__name__)


@dataclass
class _Session:
    client_id: str
    persistent: bool
    filters: set[str] = field(default_factory=set)
    online: MemoryTransport | None = None
    queued: collections.deque[Message] = field(default_factory=collections.deque)


class MemoryBroker:
    """Holds retained messages and sessions; create clients with ``transport(client_id)``."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.retained: dict[str, Message] = {}
        self.published: list[tuple[str, Message]] = []  # (publisher client id, message)
        self.handler_errors: list[BaseException] = []
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.RLock()
        self._deliveries: collections.deque[tuple[_Session, Message]] = collections.deque()
        self._pumping = False

    def transport(self, client_id: str, clean_session: bool = False) -> MemoryTransport:
        return MemoryTransport(self, client_id, clean_session)

    # -- called by MemoryTransport ---------------------------------------------------------

    def _connect(self, client: MemoryTransport) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is not None and session.online is not None:
                session.online._lost(publish_will=True)  # takeover, like a real broker
            if session is None or client.clean_session or not session.persistent:
                session = _Session(client.client_id, persistent=not client.clean_session)
                self._sessions[client.client_id] = session
            session.online = client
            while session.queued:
                self._deliveries.append((session, session.queued.popleft()))
            for topic_filter in client._handlers.filters():
                self._subscribe_locked(session, topic_filter)
        self._pump()

    def _disconnect(self, client: MemoryTransport, will: Message | None) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is not None and session.online is client:
                session.online = None
                if not session.persistent:
                    del self._sessions[client.client_id]
        if will is not None:
            self._publish(client.client_id, will)

    def _subscribe(self, client: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            session = self._sessions[client.client_id]
            self._subscribe_locked(session, topic_filter)
        self._pump()

    def _subscribe_locked(self, session: _Session, topic_filter: str) -> None:
        session.filters.add(topic_filter)
        for topic, msg in sorted(self.retained.items()):
            if topic_matches_sub(topic_filter, topic):
                self._deliveries.append((session, msg))

    def _unsubscribe(self, client: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is not None:
                session.filters.discard(topic_filter)

    def _publish(self, client_id: str, message: Message) -> None:
        with self._lock:
            self.published.append((client_id, message))
            if message.retain:
                if message.payload:
                    self.retained[message.topic] = message
                else:
                    self.retained.pop(message.topic, None)
            live = Message(message.topic, message.payload, retain=False, qos=message.qos)
            for session in self._sessions.values():
                if not any(topic_matches_sub(f, message.topic) for f in session.filters):
                    continue
                if session.online is not None:
                    self._deliveries.append((session, live))
                elif session.persistent and message.qos > 0:
                    session.queued.append(live)
        self._pump()

    def _pump(self) -> None:
        """Deliver queued messages until none is left, unless a delivery is in progress."""
        with self._lock:
            if self._pumping:
                return
            self._pumping = True
        try:
            while True:
                with self._lock:
                    if not self._deliveries:
                        return
                    session, message = self._deliveries.popleft()
                    client = session.online
                    if client is None:
                        if session.persistent and message.qos > 0:
                            session.queued.append(message)
                        continue
                self.handler_errors.extend(client._handlers.dispatch(message))
        finally:
            with self._lock:
                self._pumping = False


class MemoryTransport:
    """A ``Transport`` connected to a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, client_id: str, clean_session: bool = False) -> None:
        if not client_id:
            raise TransportError("client_id must not be empty")
        self.broker = broker
        self.client_id = client_id
        self.clean_session = clean_session
        self._handlers = HandlerTable()
        self._connected = False
        self._will: Message | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        if self._connected:
            return
        self._connected = True
        self.broker._connect(self)
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("connect callback failed")

    def disconnect(self) -> None:
        if self._connected:
            self._connected = False
            self.broker._disconnect(self, will=None)

    def drop(self) -> None:
        """Simulate an abrupt loss of the connection: the broker publishes the will."""
        self._lost(publish_will=True)

    def _lost(self, publish_will: bool) -> None:
        if self._connected:
            self._connected = False
            self.broker._disconnect(self, will=self._will if publish_will else None)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise TransportError(f"invalid qos {qos}")
        if len(payload) > self.broker.max_payload:
            raise TransportError(f"payload of {len(payload)} bytes exceeds the broker maximum")
        if not self._connected:
            raise TransportError("not connected")
        self.broker._publish(self.client_id, Message(topic, bytes(payload), retain, min(qos, 1)))

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        check_filter(topic_filter)
        self._handlers.add(topic_filter, handler)
        if self._connected:
            self.broker._subscribe(self, topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        self._handlers.remove(topic_filter)
        if self._connected:
            self.broker._unsubscribe(self, topic_filter)

    def set_will(self, topic: str, payload: bytes, retain: bool = True) -> None:
        check_topic(topic)
        self._will = Message(topic, bytes(payload), retain, 1)

    def add_connect_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
