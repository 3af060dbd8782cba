"""A payload over 10 MB (a resnet18-sized fp32 update is ~45 MB) crosses a real Mosquitto as
1 MiB chunks with a manifest, and is reassembled through a disk spool; a receiver restarted
half-way resumes from its spool and only needs the chunks it lacks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from fedscan.brokers.mosquitto import Mosquitto
from fl_protocol import topics
from fl_protocol.chunking import Reassembler, split
from fl_protocol.schemas import PayloadManifest
from fl_protocol.transport import MqttSettings, PahoTransport
from fl_protocol.transport_base import Message

FED, ROUND, NODE = "big", 1, "a"
SIZE = 12 * 1024 * 1024 + 12345  # > 10 MB, not a multiple of the chunk size


def _client(port: int, name: str) -> PahoTransport:
    transport = PahoTransport(MqttSettings(host="127.0.0.1", port=port, client_id=name))
    transport.connect()
    return transport


class _Pending:
    def __init__(self, rx: PahoTransport, r: Reassembler, done: threading.Event) -> None:
        self.rx, self.r, self.done = rx, r, done

    def wait(self, timeout: float) -> Reassembler:
        assert self.done.wait(timeout), f"only {self.r.received} chunks arrived"
        self.rx.disconnect()
        return self.r


def _receive(
    port: int, manifest: PayloadManifest, spool: Path, stop_after: int | None, name: str
) -> _Pending:
    """Subscribe to the node's chunks and feed them into a spooled reassembler."""
    reassembler = Reassembler(manifest, spool_dir=spool)
    done = threading.Event()
    lock = threading.Lock()

    def on_chunk(msg: Message) -> None:
        info = topics.parse_topic(msg.topic)
        with lock:
            if done.is_set() or info.index is None:
                return
            reassembler.add(info.index, msg.payload)
            if reassembler.complete or (
                stop_after is not None and reassembler.received >= stop_after
            ):
                done.set()

    rx = _client(port, name)
    rx.subscribe(topics.update_chunk(FED, ROUND, NODE, 0).rsplit("/", 1)[0] + "/+", on_chunk)
    return _Pending(rx, reassembler, done)


def _send(port: int, chunks: list[bytes], indices: list[int]) -> None:
    tx = _client(port, "sender")
    try:
        for i in indices:
            tx.publish(topics.update_chunk(FED, ROUND, NODE, i), chunks[i], qos=1)
    finally:
        tx.disconnect()


def test_payload_over_10_mb_is_chunked_resumed_and_verified(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    payload = os.urandom(SIZE)
    manifest, chunks = split(payload)
    assert len(chunks) == 13 and max(len(c) for c in chunks) <= 1024 * 1024
    spool = tmp_path / "spool"

    # First receiver dies (disconnects) after 5 chunks: they are already verified on disk.
    first = _receive(mosquitto.port, manifest, spool, stop_after=5, name="rx1")
    time.sleep(0.3)  # let the subscription settle before publishing (QoS 1, no retain)
    _send(mosquitto.port, chunks, list(range(len(chunks))))
    partial = first.wait(30)
    assert not partial.complete and 5 <= partial.received < len(chunks)

    # A new receiver on the same spool resumes: it lacks only the chunks not yet stored,
    # and the sender resends just those (what an ack with the missing list asks for).
    resumed = Reassembler(manifest, spool_dir=spool)
    missing = resumed.missing()
    assert 0 < len(missing) < len(chunks) and resumed.received >= 5
    second = _receive(mosquitto.port, manifest, spool, stop_after=None, name="rx2")
    time.sleep(0.3)
    _send(mosquitto.port, chunks, missing)
    final = second.wait(30)
    assert final.complete
    assert final.result() == payload
