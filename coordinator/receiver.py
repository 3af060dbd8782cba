"""Receiving node updates: manifests and chunks in, verified payloads out, acks back.

Per (round, node) one transfer: a ``fl_protocol.chunking.Reassembler`` spooled on disk under
``state_dir/incoming/round_R/N/`` (a restarted coordinator resumes when the node resends its
manifest; payloads of at most 1 MiB stay in memory), fed chunks in any order; duplicates are
ignored (QoS 1 is at-least-once). Chunks that arrive before their manifest are held in a small
bounded buffer. A transfer that stays
incomplete for ``chunk_timeout_s`` gets an ``Ack(status="missing", missing=[...])`` and is asked
again after each further quiet period. The round logic (``UpdateSink``) decides whether a
manifest is admitted (stale round, unknown node, already counted) and what a complete payload
becomes (accepted or rejected); this module only moves bytes and sends the acks.

All methods run on the service's single worker thread; MQTT callbacks only enqueue.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coordinator.publisher import Sender
from fl_protocol import topics
from fl_protocol.chunking import Reassembler
from fl_protocol.errors import IntegrityError, ProtocolError, TransportError
from fl_protocol.schemas import MAX_ITEMS, Ack, UpdateManifest
from fl_protocol.topics import TopicInfo

log = logging.getLogger(__name__)

EARLY_BUFFER_BYTES = 64 * 1024 * 1024  # chunks held while their manifest has not arrived
# payloads up to this size are reassembled in memory: a disk spool would cost an fsync per
# chunk for nothing (the node keeps its update until acknowledged and resends after a crash);
# larger ones are spooled so that 100 concurrent transfers do not hold 100 models in memory
IN_MEMORY_MAX_BYTES = 1024 * 1024


class UpdateSink(Protocol):
    """What the round logic offers the receiver (``coordinator.rounds.RoundMachine``)."""

    def admit(self, manifest: UpdateManifest) -> Ack | None:
        """None to start receiving; an Ack (stale, duplicate, rejected...) to answer at once."""
        ...

    def complete(self, manifest: UpdateManifest, payload: bytes) -> Ack:
        """Decode, validate and record a verified payload; the Ack to send."""
        ...


@dataclass
class _Transfer:
    manifest: UpdateManifest
    reassembler: Reassembler
    last_activity: float


@dataclass
class _Early:
    chunks: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Receiver:
    def __init__(
        self,
        sender: Sender,
        federation: str,
        sink: UpdateSink,
        incoming_dir: Path,
        chunk_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.sender = sender
        self.federation = federation
        self.sink = sink
        self.incoming = Path(incoming_dir)
        self.chunk_timeout_s = chunk_timeout_s
        self.clock = clock
        self._transfers: dict[tuple[int, str], _Transfer] = {}
        self._early: dict[tuple[int, str], _Early] = {}
        self._early_bytes = 0
        self._answered: set[tuple[int, str]] = set()  # finished transfers: stray chunks dropped
        self.in_memory_max_bytes = IN_MEMORY_MAX_BYTES
        self.open_round: int | None = None  # set by the round logic: early chunks only for it

    def send_ack(self, ack: Ack) -> None:
        """Best effort: a node without its ack resends its manifest and is answered then."""
        try:
            self.sender.publish(
                topics.ack(self.federation, ack.round, ack.node), ack.to_bytes(), qos=1
            )
        except TransportError as exc:
            log.warning("ack to node %s not sent: %s", ack.node, exc)

    # -- messages ------------------------------------------------------------------------------

    def on_manifest(self, info: TopicInfo, data: bytes) -> None:
        if info.round is None or info.node is None:
            return
        try:
            manifest = UpdateManifest.from_bytes(data)
        except ProtocolError as exc:
            log.warning("update manifest from node %s refused: %s", info.node, exc)
            return
        if (manifest.round, manifest.node, manifest.federation) != (
            info.round,
            info.node,
            info.federation,
        ):
            log.warning("update manifest from node %s does not match its topic", info.node)
            return
        key = (manifest.round, manifest.node)
        answer = self.sink.admit(manifest)
        if answer is not None:
            self._drop(key)
            self._drop_early(key)
            self.send_ack(answer)
            return
        self._answered.discard(key)
        current = self._transfers.get(key)
        if current is not None and current.manifest == manifest:
            current.last_activity = self.clock()  # a resend: keep what we have
        else:
            if current is not None:
                log.info("node %s replaced its round %d update", manifest.node, manifest.round)
            spool: Path | None = self.incoming / f"round_{manifest.round}" / manifest.node
            if manifest.payload.total_size <= self.in_memory_max_bytes:
                spool = None
            current = _Transfer(manifest, Reassembler(manifest.payload, spool), self.clock())
            self._transfers[key] = current
        early = self._early.pop(key, None)
        if early is not None:
            self._early_bytes -= early.size
            for index, chunk in early.chunks.items():
                self._add(current, index, chunk)
        self._maybe_finish(key, current)

    def on_chunk(self, info: TopicInfo, data: bytes) -> None:
        if info.round is None or info.node is None or info.index is None:
            return
        key = (info.round, info.node)
        transfer = self._transfers.get(key)
        if transfer is None:
            self._buffer_early(key, info.index, data)
            return
        self._add(transfer, info.index, data)
        transfer.last_activity = self.clock()
        self._maybe_finish(key, transfer)

    def tick(self) -> None:
        """Ask for missing chunks of transfers quiet for ``chunk_timeout_s``."""
        now = self.clock()
        for (round_id, node), transfer in list(self._transfers.items()):
            if now - transfer.last_activity < self.chunk_timeout_s:
                continue
            missing = transfer.reassembler.missing()[:MAX_ITEMS]
            transfer.last_activity = now
            log.info("round %d node %s: asking for %d missing chunks", round_id, node, len(missing))
            self.send_ack(Ack(round=round_id, node=node, status="missing", missing=tuple(missing)))

    def forget_round(self, round_id: int) -> None:
        """Drop transfers and spooled chunks of a round that closed."""
        for key in [k for k in self._transfers if k[0] <= round_id]:
            self._drop(key)
        for key in [k for k in self._early if k[0] <= round_id]:
            self._drop_early(key)
        self._answered = {k for k in self._answered if k[0] > round_id}
        for path in self.incoming.glob("round_*"):
            suffix = path.name.removeprefix("round_")
            if suffix.isdigit() and int(suffix) <= round_id:
                shutil.rmtree(path, ignore_errors=True)

    @property
    def active(self) -> int:
        """Transfers in progress."""
        return len(self._transfers)

    @property
    def early_bytes(self) -> int:
        """Bytes of chunks held while waiting for their manifest."""
        return self._early_bytes

    # -- internals -----------------------------------------------------------------------------

    def _add(self, transfer: _Transfer, index: int, data: bytes) -> None:
        try:
            transfer.reassembler.add(index, data)
        except IntegrityError as exc:  # it will be asked for again as missing
            log.warning("node %s chunk %d refused: %s", transfer.manifest.node, index, exc)

    def _maybe_finish(self, key: tuple[int, str], transfer: _Transfer) -> None:
        if not transfer.reassembler.complete:
            return
        manifest = transfer.manifest
        try:
            payload = transfer.reassembler.result()
        except IntegrityError as exc:
            log.warning("node %s round %d: payload refused: %s", manifest.node, key[0], exc)
            ack = Ack(round=key[0], node=key[1], status="rejected", reason="integrity")
        else:
            ack = self.sink.complete(manifest, payload)
        self._drop(key)
        self._answered.add(key)
        self.send_ack(ack)

    def _drop(self, key: tuple[int, str]) -> None:
        transfer = self._transfers.pop(key, None)
        if transfer is not None:
            transfer.reassembler.discard()

    def _drop_early(self, key: tuple[int, str]) -> None:
        early = self._early.pop(key, None)
        if early is not None:
            self._early_bytes -= early.size

    def _buffer_early(self, key: tuple[int, str], index: int, data: bytes) -> None:
        if key[0] != self.open_round or key in self._answered:
            return  # a closed round (the manifest's stale ack answers), or a late duplicate
        early = self._early.setdefault(key, _Early())
        if index in early.chunks or self._early_bytes + len(data) > EARLY_BUFFER_BYTES:
            return  # duplicate, or over budget: it will be asked for as missing
        early.chunks[index] = bytes(data)
        early.size += len(data)
        self._early_bytes += len(data)
