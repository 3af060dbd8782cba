"""Chunked, resumable transfer of large payloads (global weights down, deltas up).

A payload is split into chunks of at most 1 MiB described by a ``PayloadManifest`` (SHA-256 of
each chunk and of the whole), so a broken link costs one chunk, not a round.

- ``split(payload)`` -> manifest + chunks (sender).
- ``Reassembler(manifest, spool_dir)`` (receiver): chunks in any order, duplicates ignored, a
  chunk that does not match its digest refused; with a spool directory every verified chunk is
  on disk, so a restarted receiver resumes where it stopped.
- ``Outbox(dir)`` (node): the encoded update of each round stays on disk until the coordinator
  acknowledges it, and is resent after a restart or a broker outage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fl_protocol.errors import IntegrityError, SchemaError
from fl_protocol.files import fsync_dir, write_atomic
from fl_protocol.schemas import MAX_CHUNK_SIZE, PayloadManifest, UpdateManifest

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = MAX_CHUNK_SIZE


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(
    payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[PayloadManifest, list[bytes]]:
    """Cut ``payload`` into chunks of ``chunk_size`` bytes (<= 1 MiB) and describe them."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise SchemaError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], not {chunk_size}")
    view = memoryview(payload)
    chunks = [bytes(view[i : i + chunk_size]) for i in range(0, len(payload), chunk_size)]
    manifest = PayloadManifest(
        total_size=len(payload),
        sha256=sha256_hex(payload),
        chunk_size=chunk_size,
        chunk_sha256=tuple(sha256_hex(c) for c in chunks),
    )
    return manifest, chunks


class Reassembler:
    """Collects the chunks of one payload; see the module docstring."""

    def __init__(self, manifest: PayloadManifest, spool_dir: Path | None = None) -> None:
        self.manifest = manifest
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._memory: dict[int, bytes] = {}
        self._have: set[int] = set()
        if self.spool_dir is not None:
            self._open_spool(self.spool_dir)

    def _open_spool(self, spool: Path) -> None:
        spool.mkdir(parents=True, exist_ok=True)
        marker = spool / "payload.json"
        if marker.exists():
            try:
                same = PayloadManifest.from_bytes(marker.read_bytes()) == self.manifest
            except SchemaError:
                same = False
            if not same:  # another payload was spooled here: start over
                log.info("spool %s holds another payload; discarding it", spool.name)
                for old in spool.glob("*.chunk"):
                    old.unlink()
        write_atomic(marker, self.manifest.to_bytes())
        for path in spool.glob("*.chunk"):
            index = int(path.stem) if path.stem.isdigit() else -1
            ok = 0 <= index < self.manifest.num_chunks and (
                sha256_hex(path.read_bytes()) == self.manifest.chunk_sha256[index]
            )
            if ok:
                self._have.add(index)
            else:  # a stray or corrupted file: it will be fetched again
                path.unlink()
        for tmp in spool.glob(".tmp-*"):
            tmp.unlink()

    def add(self, index: int, data: bytes) -> bool:
        """Store chunk ``index``; False for a duplicate, IntegrityError for a bad chunk."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise IntegrityError("chunk index must be an int")
        if not 0 <= index < self.manifest.num_chunks:
            raise IntegrityError(
                f"chunk {index} out of range (payload has {self.manifest.num_chunks})"
            )
        if index in self._have:
            return False
        data = bytes(data)
        if len(data) != self.manifest.chunk_length(index):
            raise IntegrityError(f"chunk {index} has {len(data)} bytes, manifest says otherwise")
        if sha256_hex(data) != self.manifest.chunk_sha256[index]:
            raise IntegrityError(f"chunk {index} does not match its sha256")
        if self.spool_dir is not None:
            write_atomic(self.spool_dir / f"{index}.chunk", data)
        else:
            self._memory[index] = data
        self._have.add(index)
        return True

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.num_chunks) if i not in self._have]

    @property
    def received(self) -> int:
        return len(self._have)

    @property
    def complete(self) -> bool:
        return len(self._have) == self.manifest.num_chunks

    def _chunk(self, index: int) -> bytes:
        if self.spool_dir is not None:
            return (self.spool_dir / f"{index}.chunk").read_bytes()
        return self._memory[index]

    def result(self) -> bytes:
        """The whole payload, its SHA-256 verified; IntegrityError if incomplete or wrong."""
        if not self.complete:
            raise IntegrityError(f"payload incomplete: {len(self.missing())} chunk(s) missing")
        data = b"".join(self._chunk(i) for i in range(self.manifest.num_chunks))
        if len(data) != self.manifest.total_size or sha256_hex(data) != self.manifest.sha256:
            raise IntegrityError("reassembled payload does not match the manifest sha256")
        return data

    def discard(self) -> None:
        """Forget every chunk (and delete the spool directory)."""
        self._memory.clear()
        self._have.clear()
        if self.spool_dir is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)


@dataclass(frozen=True)
class PendingUpdate:
    """An encoded update kept in the outbox until the coordinator acknowledges it."""

    round: int
    manifest: UpdateManifest  # exactly as published (signed)
    path: Path

    @property
    def num_chunks(self) -> int:
        return self.manifest.payload.num_chunks

    def chunk(self, index: int) -> bytes:
        return (self.path / f"{index}.chunk").read_bytes()

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        for i in range(self.num_chunks):
            yield i, self.chunk(i)


class Outbox:
    """One directory per round (``round-R/``) with ``manifest.json`` and ``<i>.chunk`` files.

    A round's directory appears by an atomic rename once every file is written and synced, so
    a node killed mid-write leaves either the whole update or nothing.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _round_dir(self, round_: int) -> Path:
        return self.dir / f"round-{int(round_)}"

    def put(self, manifest: UpdateManifest, chunks: Sequence[bytes]) -> PendingUpdate:
        """Keep ``manifest`` and its chunks (verified against it) until ``ack(round)``."""
        payload = manifest.payload
        if len(chunks) != payload.num_chunks:
            raise IntegrityError(f"{len(chunks)} chunks for a manifest of {payload.num_chunks}")
        for i, chunk in enumerate(chunks):
            if sha256_hex(chunk) != payload.chunk_sha256[i]:
                raise IntegrityError(f"outbox: chunk {i} does not match the manifest")
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            for i, chunk in enumerate(chunks):
                write_atomic(tmp / f"{i}.chunk", chunk)
            write_atomic(tmp / "manifest.json", manifest.to_bytes())
            final = self._round_dir(manifest.round)
            if final.exists():  # a retrained update for the same round replaces the old one
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return PendingUpdate(manifest.round, manifest, final)

    def get(self, round_: int) -> PendingUpdate | None:
        path = self._round_dir(round_)
        try:
            manifest = UpdateManifest.from_bytes((path / "manifest.json").read_bytes())
        except (OSError, SchemaError):
            return None
        return PendingUpdate(manifest.round, manifest, path)

    def pending(self) -> list[PendingUpdate]:
        """Every stored update not yet acknowledged, oldest round first."""
        out: list[PendingUpdate] = []
        for path in self.dir.glob("round-*"):
            suffix = path.name.removeprefix("round-")
            item = self.get(int(suffix)) if suffix.isdigit() else None
            if item is None:
                log.warning("outbox: dropping unreadable entry %s", path.name)
                shutil.rmtree(path, ignore_errors=True)
            else:
                out.append(item)
        return sorted(out, key=lambda p: p.round)

    def ack(self, round_: int) -> bool:
        """Delete the update of ``round_`` (acknowledged, or stale); False if there was none."""
        path = self._round_dir(round_)
        if not path.exists():
            return False
        shutil.rmtree(path)
        return True
