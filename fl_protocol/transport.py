"""MQTT transport on paho-mqtt 2, behind the narrow ``Transport`` interface.

``PahoTransport`` speaks MQTT 3.1.1 with a stable client id and ``clean_session=False`` so the
broker queues QoS 1 messages while a node is briefly away; paho reconnects with exponential
back-off and we resubscribe on every connect (the broker then replays retained messages, which
is how a returning node catches up). Every paho return code is checked here and turned into
TransportError. Messages are handed to handlers on a dispatcher thread, never on paho's network
thread, so a handler may publish and wait for its PUBACK, and a handler exception is logged
without stopping the loop. Incoming payloads above ``max_payload`` are dropped and logged.

``MemoryBroker`` / ``MemoryTransport`` (re-exported here) give the same semantics in memory.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fl_protocol.errors import TransportError
from fl_protocol.memory_transport import MemoryBroker, MemoryTransport
from fl_protocol.transport_base import (
    MAX_PAYLOAD,
    Handler,
    HandlerTable,
    Message,
    MqttSettings,
    Transport,
    check_filter,
    check_topic,
)

__all__ = [
    "MAX_PAYLOAD",
    "Handler",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "MqttSettings",
    "PahoTransport",
    "Transport",
]

log = logging.getLogger(__name__)

_Item = Message | Callable[[], None] | None


def _check_rc(rc: MQTTErrorCode | int, what: str) -> None:
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise TransportError(f"{what} failed: {mqtt.error_string(rc)}")


class PahoTransport:
    """A ``Transport`` on a real broker (Mosquitto, EMQX, the embedded broker)."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._handlers = HandlerTable()
        self._callbacks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._refused: str | None = None  # reason of the last refused CONNACK
        self._lost_reason: str | None = None  # reason of the last lost connection
        self._suback: dict[int, bool] = {}
        self._suback_cv = threading.Condition()
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._started = False
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=settings.clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=True,
        )
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        if settings.tls:
            c.tls_set_context(self._ssl_context())
        c.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        c.connect_timeout = settings.connect_timeout_s
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_connect_fail = self._on_connect_fail
        self._client = c

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = s.tls_check_hostname
            if s.cert_file is not None:
                ctx.load_cert_chain(s.cert_file, s.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"TLS setup failed: {exc}") from None
        return ctx

    # -- paho callbacks (network thread: never block, never raise) -------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._refused = str(rc)
            log.warning("broker %s:%s refused the connection: %s", *self._addr(), rc)
            return
        self._refused = None
        filters = self._handlers.filters()
        if filters:
            result, _mid = client.subscribe([(f, 1) for f in filters])
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.error("resubscribe failed: %s", mqtt.error_string(result))
        log.info(
            "connected to %s:%s (session present: %s, %d subscription(s))",
            *self._addr(),
            flags.session_present,
            len(filters),
        )
        self._connected.set()
        for callback in list(self._callbacks):
            self._queue.put(callback)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        log.debug("connecting to %s:%s failed; retrying with back-off", *self._addr())

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._connected.clear()
        if rc.is_failure:
            self._lost_reason = str(rc)
            log.warning("lost connection to %s:%s (%s); reconnecting", *self._addr(), rc)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if len(msg.payload) > self.settings.max_payload:
            log.warning("dropped %d-byte message on %s (over limit)", len(msg.payload), msg.topic)
            return
        self._queue.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        ok = not any(code.is_failure for code in codes)
        if not ok:
            log.error("broker refused a subscription (mid %s): %s", mid, codes)
        with self._suback_cv:
            self._suback[mid] = ok
            while len(self._suback) > 1000:  # results nobody waits for (resubscribes)
                self._suback.pop(next(iter(self._suback)))
            self._suback_cv.notify_all()

    def _addr(self) -> tuple[str, int]:
        return self.settings.host, self.settings.port

    # -- dispatcher thread -----------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, Message):
                self._handlers.dispatch(item)
                continue
            try:
                item()
            except Exception:
                log.exception("connect callback failed")

    # -- Transport ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, wait: bool = True) -> None:
        """Connect, then keep reconnecting with back-off for as long as we run.

        With ``wait`` (the default) the first attempt is made here and TransportError says why
        it failed (refused, unreachable, TLS, no CONNACK in time). With ``wait=False`` it
        returns at once and keeps trying in the background (a daemon started before its
        broker)."""
        if self._started:
            return
        self._started = True
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, daemon=True, name="mqtt-dispatch"
        )
        self._dispatcher.start()
        s = self.settings
        try:
            if wait:  # first attempt in the foreground: refusals and TLS errors say why
                _check_rc(self._client.connect(s.host, s.port, s.keepalive), "connect")
            else:
                self._client.connect_async(s.host, s.port, s.keepalive)
            _check_rc(self._client.loop_start(), "loop_start")
        except (OSError, ValueError, TransportError) as exc:
            self.disconnect()
            raise TransportError(f"cannot connect to {s.host}:{s.port}: {exc}") from None
        if not wait:
            return
        deadline = time.monotonic() + s.connect_timeout_s
        while not self._connected.wait(0.05):
            refused = self._refused
            if refused is not None or time.monotonic() > deadline:
                self.disconnect()
                why = f"refused ({refused})" if refused else f"no CONNACK in {s.connect_timeout_s}s"
                if self._lost_reason is not None:
                    why += f" (connection lost: {self._lost_reason})"
                raise TransportError(f"MQTT broker {s.host}:{s.port}: {why}")

    def disconnect(self) -> None:
        if not self._started:
            return
        self._started = False
        self._client.disconnect()  # MQTT_ERR_NO_CONN when already gone: fine
        self._client.loop_stop()
        self._connected.clear()
        self._queue.put(None)
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join(5)
        self._dispatcher = None

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        check_topic(topic)
        if qos not in (0, 1):
            raise TransportError(f"qos must be 0 or 1, not {qos}")
        if len(payload) > self.settings.max_payload:
            raise TransportError(
                f"payload of {len(payload)} bytes over {self.settings.max_payload}"
            )
        if not self.is_connected:
            raise TransportError(f"not connected to {self.settings.host}:{self.settings.port}")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        _check_rc(info.rc, f"publish to {topic}")
        if qos == 0:
            return
        try:
            info.wait_for_publish(self.settings.publish_timeout_s)
        except (ValueError, RuntimeError) as exc:
            raise TransportError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise TransportError(f"no PUBACK for {topic} within {self.settings.publish_timeout_s}s")

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        check_filter(topic_filter)
        self._handlers.add(topic_filter, handler)
        if not self.is_connected:
            return  # sent on (re)connect
        result, mid = self._client.subscribe(topic_filter, qos=1)
        _check_rc(result, f"subscribe to {topic_filter}")
        if threading.current_thread() is getattr(self._client, "_thread", None):
            return  # cannot wait for the SUBACK on the thread that reads it
        deadline = time.monotonic() + self.settings.publish_timeout_s
        with self._suback_cv:
            while mid not in self._suback:
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_connected:
                    return  # resubscribed on reconnect anyway
                self._suback_cv.wait(min(left, 0.1))
            ok = self._suback.pop(mid)
        if not ok:
            self._handlers.remove(topic_filter)
            raise TransportError(f"broker refused the subscription to {topic_filter}")

    def unsubscribe(self, topic_filter: str) -> None:
        self._handlers.remove(topic_filter)
        if self.is_connected:
            result, _mid = self._client.unsubscribe(topic_filter)
            _check_rc(result, f"unsubscribe from {topic_filter}")

    def set_will(self, topic: str, payload: bytes, retain: bool = True) -> None:
        check_topic(topic)
        try:
            self._client.will_set(topic, payload, qos=1, retain=retain)
        except ValueError as exc:
            raise TransportError(f"invalid will: {exc}") from None

    def add_connect_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def __enter__(self) -> PahoTransport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
