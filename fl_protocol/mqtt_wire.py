"""MQTT 3.1.1 packet framing for the embedded broker: just the packets a broker handles.

Reading never trusts the peer: lengths are bounded, strings must be UTF-8, and anything
malformed raises ``MalformedPacket`` (the broker then drops the connection, as the spec says).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    8,
    9,
    10,
    11,
    12,
    13,
    14,
)

CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_BAD_CLIENT_ID = 2
SUBACK_FAILURE = 0x80


class MalformedPacket(Exception):
    """The peer broke the protocol; the connection must be closed."""


class PacketTooLarge(MalformedPacket):
    pass


@dataclass(frozen=True)
class Packet:
    type: int
    flags: int
    body: bytes


async def read_packet(reader: asyncio.StreamReader, max_size: int) -> Packet:
    """Read one packet; IncompleteReadError at EOF, MalformedPacket / PacketTooLarge if bad."""
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
    else:
        raise MalformedPacket("remaining length longer than 4 bytes")
    if length > max_size:
        raise PacketTooLarge(f"packet of {length} bytes over the {max_size}-byte limit")
    body = await reader.readexactly(length) if length else b""
    return Packet(first >> 4, first & 0x0F, body)


def encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(type_: int, flags: int, body: bytes) -> bytes:
    return bytes([(type_ << 4) | flags]) + encode_length(len(body)) + body


def encode_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


class Reader:
    """Cursor over a packet body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise MalformedPacket("packet shorter than its fields")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        try:
            text = self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("string is not UTF-8") from None
        if "\x00" in text:
            raise MalformedPacket("string contains NUL")
        return text

    def rest(self) -> bytes:
        return self.take(self.left())


@dataclass(frozen=True)
class Connect:
    protocol: str
    level: int
    client_id: str
    clean_session: bool
    keepalive: int
    will_topic: str | None
    will_payload: bytes
    will_qos: int
    will_retain: bool
    username: str | None


def parse_connect(body: bytes) -> Connect:
    r = Reader(body)
    protocol, level, flags, keepalive = r.string(), r.byte(), r.byte(), r.u16()
    if flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag set")
    client_id = r.string()
    will_topic, will_payload, will_qos = None, b"", (flags >> 3) & 0x03
    if flags & 0x04:
        will_topic, will_payload = r.string(), r.binary()
        if will_qos == 3:
            raise MalformedPacket("will QoS 3")
    elif will_qos or flags & 0x20:
        raise MalformedPacket("will QoS/retain without a will")
    username = r.string() if flags & 0x80 else None
    if flags & 0x40:
        r.binary()  # password: the embedded broker does not authenticate (loopback only)
    return Connect(
        protocol,
        level,
        client_id,
        bool(flags & 0x02),
        keepalive,
        will_topic,
        will_payload,
        will_qos,
        bool(flags & 0x20),
        username,
    )


def connack(session_present: bool, code: int) -> bytes:
    return packet(CONNACK, 0, bytes([1 if session_present else 0, code]))


def publish(topic: str, payload: bytes, qos: int, retain: bool, pid: int, dup: bool) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = encode_str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return packet(PUBLISH, flags, body)


def with_id(type_: int, pid: int, flags: int = 0) -> bytes:
    """PUBACK, PUBREC, PUBCOMP, UNSUBACK: a packet id and nothing else."""
    return packet(type_, flags, struct.pack("!H", pid))


def suback(pid: int, codes: list[int]) -> bytes:
    return packet(SUBACK, 0, struct.pack("!H", pid) + bytes(codes))


def valid_topic(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#" and i != len(levels) - 1:
            return False
    return True


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching; wildcards at the first level do not match ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels) or (f != "+" and f != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)
