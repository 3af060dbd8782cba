"""A small pure-Python MQTT 3.1.1 broker, so one machine runs a federation with no packages.

``EmbeddedBroker(host="127.0.0.1", port=0)`` runs an asyncio server on a background thread:
CONNECT / CONNACK, PUBLISH QoS 0 and 1 (a QoS 2 publish is accepted with PUBREC / PUBCOMP and
forwarded at QoS 1; SUBACK grants at most QoS 1), SUBSCRIBE / UNSUBSCRIBE with ``+`` and ``#``,
retained messages (an empty retained payload clears), last wills, keep-alive, PINGREQ,
DISCONNECT, and packets over 2 MiB drop the client. A client with ``clean_session=False`` keeps
its subscriptions and gets the QoS 1 messages published while it was away and its
unacknowledged ones again. At most ``max_inflight`` (20) QoS 1 messages await a client's
PUBACK; the rest wait in order in the session's queue.

Each session's queue (offline, or online but slow) is bounded: at most ``max_queued`` messages
(10,000) and ``max_queued_bytes`` of payload plus topic (128 MiB). A message that would go over
either limit makes room by dropping the OLDEST queued messages (a warning names the client, at
the first drop and every 1,000th; an info line gives the total once the queue has drained); a
single message larger than ``max_queued_bytes`` is not queued at all. The protocol survives
drops as it does on Mosquitto (``max_queued_messages`` / ``max_queued_bytes``): global model
chunks are retained and sent again on subscribe, updates are re-sent until acknowledged.

State (retained messages, sessions) lives in this object's memory: it survives ``stop()`` /
``start()`` of the same object, not the process. No TLS and no authentication: it listens on
loopback by default and is meant for the demo; production uses Mosquitto with broker_config/.

    python -m fl_protocol.broker --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

from fl_protocol import mqtt_wire as w

log = logging.getLogger(__name__)

MAX_PACKET_SIZE = 2 * 1024 * 1024
MAX_INFLIGHT = 20  # default QoS 1 messages sent to one client and not yet acknowledged
MAX_QUEUED = 10_000  # default messages one session's queue holds
MAX_QUEUED_BYTES = 128 * 1024 * 1024  # default payload + topic bytes one session's queue holds
_auto_ids = itertools.count(1)


@dataclass
class _Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class _Session:
    client_id: str
    clean: bool
    subs: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS
    conn: _Conn | None = None
    inflight: dict[int, _Msg] = field(default_factory=dict)  # QoS 1 sent, PUBACK pending
    queued: collections.deque[_Msg] = field(default_factory=collections.deque)
    queued_bytes: int = 0  # sum of _size() over queued
    dropped: int = 0  # messages dropped since the queue was last empty
    last_pid: int = 0


def _size(msg: _Msg) -> int:
    """What a queued message counts against ``max_queued_bytes``."""
    return len(msg.payload) + len(msg.topic)


@dataclass(eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    session: _Session | None = None
    will: _Msg | None = None
    out: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    qos2_ids: set[int] = field(default_factory=set)

    def send(self, data: bytes) -> None:
        self.out.put_nowait(data)


class _Core:
    """Broker state; touched only from the event loop thread."""

    def __init__(
        self,
        max_packet_size: int,
        max_queued: int,
        max_inflight: int,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.max_packet_size = max_packet_size
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.max_inflight = max_inflight
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, _Msg] = {}
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    # -- delivery --------------------------------------------------------------------------

    def deliver(self, session: _Session, msg: _Msg) -> None:
        conn = session.conn
        if conn is not None and msg.qos == 0:
            conn.send(w.publish(msg.topic, msg.payload, 0, msg.retain, 0, dup=False))
        elif msg.qos > 0 and (conn is not None or not session.clean):
            self.enqueue(session, msg)
            self.flush(session)

    def enqueue(self, session: _Session, msg: _Msg) -> None:
        """Queue ``msg``, dropping the oldest queued messages while a limit would be passed."""
        size = _size(msg)
        if size > self.max_queued_bytes:
            self._count_drop(session, "message larger than the whole queue: not queued")
            return
        while session.queued and (
            len(session.queued) >= self.max_queued
            or session.queued_bytes + size > self.max_queued_bytes
        ):
            session.queued_bytes -= _size(session.queued.popleft())
            self._count_drop(session, "dropped the oldest")
        session.queued.append(msg)
        session.queued_bytes += size

    def _count_drop(self, session: _Session, what: str) -> None:
        session.dropped += 1
        if session.dropped == 1 or session.dropped % 1000 == 0:
            log.warning(
                "queue of client %s full (%d messages, %d bytes; limits %d, %d): %s"
                " (%d dropped so far)",
                session.client_id,
                len(session.queued),
                session.queued_bytes,
                self.max_queued,
                self.max_queued_bytes,
                what,
                session.dropped,
            )

    def flush(self, session: _Session) -> None:
        """Send queued QoS 1 messages, in order, while fewer than max_inflight await PUBACK.

        Waiting messages share the published payload (no copy per subscriber), so a slow
        client costs at most max_inflight encoded chunks of memory, not a whole model."""
        conn = session.conn
        while conn is not None and session.queued and len(session.inflight) < self.max_inflight:
            msg = session.queued.popleft()
            session.queued_bytes -= _size(msg)
            if not session.queued and session.dropped:
                log.info(
                    "queue of client %s drained; %d messages had been dropped",
                    session.client_id,
                    session.dropped,
                )
                session.dropped = 0
            session.last_pid = pid = session.last_pid % 65535 + 1
            while pid in session.inflight:
                session.last_pid = pid = pid % 65535 + 1
            session.inflight[pid] = msg
            conn.send(w.publish(msg.topic, msg.payload, 1, msg.retain, pid, dup=False))

    def route(self, msg: _Msg) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = _Msg(msg.topic, msg.payload, msg.qos, retain=True)
            else:
                self.retained.pop(msg.topic, None)
        for session in list(self.sessions.values()):
            granted = [q for f, q in session.subs.items() if w.matches(f, msg.topic)]
            if granted:
                self.deliver(session, _Msg(msg.topic, msg.payload, min(msg.qos, max(granted))))

    # -- one connection --------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self.conns.add(conn)
        sender = asyncio.ensure_future(self._send_loop(conn))
        clean_exit = False
        try:
            first = await asyncio.wait_for(w.read_packet(reader, self.max_packet_size), 10)
            if first.type != w.CONNECT:
                raise w.MalformedPacket("first packet is not CONNECT")
            keepalive = self._connect(conn, w.parse_connect(first.body))
            timeout = keepalive * 1.5 if keepalive else None
            while conn.session is not None:
                pkt = await asyncio.wait_for(w.read_packet(reader, self.max_packet_size), timeout)
                if pkt.type == w.DISCONNECT:
                    clean_exit = True
                    break
                self._handle_packet(conn, pkt)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except w.MalformedPacket as exc:
            name = conn.session.client_id if conn.session else "?"
            log.warning("dropping client %s: %s", name, exc)
        finally:
            self._detach(conn, publish_will=not clean_exit)
            conn.out.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 5)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.conns.discard(conn)

    async def _send_loop(self, conn: _Conn) -> None:
        while True:
            data = await conn.out.get()
            if data is None:
                return
            try:
                conn.writer.write(data)
                await conn.writer.drain()
            except (ConnectionError, RuntimeError):
                return

    def _connect(self, conn: _Conn, c: w.Connect) -> int:
        if (c.protocol, c.level) not in (("MQTT", 4), ("MQIsdp", 3)):
            conn.send(w.connack(False, w.CONNACK_BAD_PROTOCOL))
            raise w.MalformedPacket(f"unsupported protocol {c.protocol!r} level {c.level}")
        client_id = c.client_id
        if not client_id:
            if not c.clean_session:
                conn.send(w.connack(False, w.CONNACK_BAD_CLIENT_ID))
                raise w.MalformedPacket("empty client id with a persistent session")
            client_id = f"auto-{next(_auto_ids)}"
        if c.will_topic is not None and not w.valid_topic(c.will_topic):
            raise w.MalformedPacket("invalid will topic")
        session = self.sessions.get(client_id)
        if session is not None and session.conn is not None:  # takeover: old one is dropped
            old = session.conn
            self._detach(old, publish_will=True)
            old.writer.close()
        present = session is not None and not c.clean_session and not session.clean
        if session is None or not present:
            session = _Session(client_id, c.clean_session)
            self.sessions[client_id] = session
        session.conn = conn
        conn.session = session
        if c.will_topic is not None:
            conn.will = _Msg(c.will_topic, c.will_payload, min(c.will_qos, 1), c.will_retain)
        conn.send(w.connack(present, w.CONNACK_ACCEPTED))
        log.info("client %s connected (session present: %s)", client_id, present)
        for pid, msg in session.inflight.items():  # unacknowledged before: resend as DUP
            conn.send(w.publish(msg.topic, msg.payload, msg.qos, msg.retain, pid, dup=True))
        self.flush(session)
        return c.keepalive

    def _detach(self, conn: _Conn, publish_will: bool) -> None:
        session = conn.session
        conn.session = None
        if session is None or session.conn is not conn:
            return
        session.conn = None
        if session.clean:
            self.sessions.pop(session.client_id, None)
        log.info("client %s disconnected%s", session.client_id, " (will)" if conn.will else "")
        if publish_will and conn.will is not None:
            self.route(conn.will)
        conn.will = None

    def _handle_packet(self, conn: _Conn, pkt: w.Packet) -> None:
        session = conn.session
        if session is None:
            return
        r = w.Reader(pkt.body)
        if pkt.type == w.PUBLISH:
            qos, retain = (pkt.flags >> 1) & 0x03, bool(pkt.flags & 0x01)
            topic = r.string()
            pid = r.u16() if qos else 0
            if qos == 3 or not w.valid_topic(topic):
                raise w.MalformedPacket("invalid PUBLISH (QoS 3 or wildcard topic)")
            msg = _Msg(topic, r.rest(), min(qos, 1), retain)
            if qos == 2:
                if pid not in conn.qos2_ids:
                    conn.qos2_ids.add(pid)
                    self.route(msg)
                conn.send(w.with_id(w.PUBREC, pid))
                return
            self.route(msg)
            if qos == 1:
                conn.send(w.with_id(w.PUBACK, pid))
        elif pkt.type == w.PUBACK:
            session.inflight.pop(r.u16(), None)
            self.flush(session)
        elif pkt.type == w.PUBREL:
            pid = r.u16()
            conn.qos2_ids.discard(pid)
            conn.send(w.with_id(w.PUBCOMP, pid))
        elif pkt.type == w.SUBSCRIBE:
            self._subscribe(conn, session, pkt, r)
        elif pkt.type == w.UNSUBSCRIBE:
            if pkt.flags != 0x02:
                raise w.MalformedPacket("bad UNSUBSCRIBE flags")
            pid = r.u16()
            while r.left():
                session.subs.pop(r.string(), None)
            conn.send(w.with_id(w.UNSUBACK, pid))
        elif pkt.type == w.PINGREQ:
            conn.send(w.packet(w.PINGRESP, 0, b""))
        elif pkt.type in (w.PUBREC, w.PUBCOMP):
            pass  # we never send QoS 2
        else:
            raise w.MalformedPacket(f"unexpected packet type {pkt.type}")

    def _subscribe(self, conn: _Conn, session: _Session, pkt: w.Packet, r: w.Reader) -> None:
        if pkt.flags != 0x02:
            raise w.MalformedPacket("bad SUBSCRIBE flags")
        pid = r.u16()
        requests: list[tuple[str, int]] = []
        while r.left():
            topic_filter, qos = r.string(), r.byte()
            if qos > 2:
                raise w.MalformedPacket("bad requested QoS")
            requests.append((topic_filter, qos))
        if not requests:
            raise w.MalformedPacket("SUBSCRIBE without filters")
        codes = []
        for topic_filter, qos in requests:
            if w.valid_filter(topic_filter):
                session.subs[topic_filter] = min(qos, 1)
                codes.append(min(qos, 1))
            else:
                codes.append(w.SUBACK_FAILURE)
        conn.send(w.suback(pid, codes))
        for (topic_filter, _), code in zip(requests, codes, strict=True):
            if code == w.SUBACK_FAILURE:
                continue
            for topic, msg in sorted(self.retained.items()):
                if w.matches(topic_filter, topic):
                    self.deliver(session, _Msg(topic, msg.payload, min(msg.qos, code), True))


class EmbeddedBroker:
    """Runs the broker on a background thread; ``start() -> port``, ``stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_packet_size: int = MAX_PACKET_SIZE,
        max_queued: int = MAX_QUEUED,
        max_inflight: int = MAX_INFLIGHT,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        if max_queued < 1 or max_queued_bytes < 1:
            raise ValueError("max_queued and max_queued_bytes must be >= 1")
        self.host = host
        self.port = port  # the bound port after start(); start() again reuses it
        self._core = _Core(max_packet_size, max_queued, max_inflight, max_queued_bytes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def queued(self, client_id: str) -> tuple[int, int]:
        """(messages, bytes) waiting in the queue of session ``client_id`` (0, 0 if none).
        Read from another thread: a snapshot, for tools and tests."""
        session = self._core.sessions.get(client_id)
        return (0, 0) if session is None else (len(session.queued), session.queued_bytes)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> int:
        if self.running:
            return self.port
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("embedded broker on %s: no TLS, no authentication", self.host)
        self._ready.clear()
        self._error = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            self._thread.join(5)
            raise OSError(
                f"embedded broker cannot listen on {self.host}:{self.port}: {self._error}"
            )
        log.info("embedded MQTT broker listening on %s:%s", self.host, self.port)
        return self.port

    def _run(self) -> None:
        loop = self._loop
        if loop is None:
            return
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._core_handle, self.host, self.port, reuse_address=True)
            )
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.run_until_complete(self._close_all())
            loop.close()

    async def _core_handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._core.tasks.add(task)
        try:
            await self._core.handle(reader, writer)
        finally:
            if task is not None:
                self._core.tasks.discard(task)

    async def _close_all(self) -> None:
        for conn in list(self._core.conns):
            conn.writer.close()  # handlers see EOF and clean up (wills are published)
        tasks = list(self._core.tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_protocol.broker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument(
        "--max-queued-messages",
        type=int,
        default=MAX_QUEUED,
        help="messages one session may queue; beyond, the oldest are dropped",
    )
    parser.add_argument(
        "--max-queued-bytes",
        type=int,
        default=MAX_QUEUED_BYTES,
        help="bytes one session may queue; beyond, the oldest messages are dropped",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = EmbeddedBroker(
        args.host,
        args.port,
        max_queued=args.max_queued_messages,
        max_queued_bytes=args.max_queued_bytes,
    )
    try:
        port = broker.start()
    except OSError as exc:
        log.error("%s", exc)
        return 7  # as TransportError: the broker cannot listen (README "Exit codes")
    print(f"listening on {args.host}:{port}", flush=True)
    stop.wait()
    broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
