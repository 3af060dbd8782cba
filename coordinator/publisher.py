"""Publishing the global model: retained chunks, then the retained manifest, then retirement.

Version V's checkpoint file (the safetensors wire payload) is split into <= 1 MiB chunks that go
out *retained* on ``fl/F/global/V/chunk/i`` before the retained manifest on
``fl/F/global/current`` points to them, so a node that sees the manifest finds every chunk, and
a node that connects later (or returns after a round offline) gets the latest model from the
broker without the coordinator doing anything. Chunks of versions older than the previous one
are retired: an empty retained payload clears each retained message (MQTT 3.1.1, 3.3.1.3).
Publishing is idempotent, so a restarted coordinator simply publishes again.

With an ``OnnxSource`` (``coordinator.onnx_artifact.OnnxArtifacts``), the version's
parity-checked ONNX export goes out the same way on ``fl/F/global/V/onnx/i`` before the
manifest, which then describes it in ``onnx`` (schema version 2, covered by the signature);
retiring a version clears those chunks too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coordinator.state import State
from fl_protocol import topics
from fl_protocol.chunking import split
from fl_protocol.schemas import GlobalManifest, PayloadManifest, RoundConfig, ServingPoint

log = logging.getLogger(__name__)


class Sender(Protocol):
    """The part of ``fl_protocol.transport.Transport`` the coordinator publishes with."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...


class OnnxSource(Protocol):
    """Where the ONNX export of a global version comes from (``OnnxArtifacts``)."""

    def path(self, version: int) -> Path: ...

    def ensure(self, version: int) -> Path | None: ...

    def serving_point(self, version: int) -> ServingPoint | None: ...


class ManifestSigner(Protocol):
    def __call__(self, manifest: GlobalManifest) -> GlobalManifest: ...


@dataclass(frozen=True)
class ModelIdentity:
    arch: str
    texture_dim: int


class Publisher:
    """Publishes global versions from the checkpoints in ``state`` (see module docstring)."""

    def __init__(
        self,
        sender: Sender,
        federation: str,
        state: State,
        model: ModelIdentity,
        signer: ManifestSigner | None = None,
        chunk_size: int = 1024 * 1024,
        onnx: OnnxSource | None = None,
    ) -> None:
        self.sender = sender
        self.federation = federation
        self.state = state
        self.model = model
        self.signer = signer
        self.chunk_size = chunk_size
        self.onnx = onnx
        self._payloads: dict[int, PayloadManifest] = {}  # versions whose chunks went out
        self._onnx_payloads: dict[int, PayloadManifest | None] = {}  # their ONNX, if any
        self._serving_points: dict[int, ServingPoint | None] = {}  # that ONNX's operating point

    def publish_chunks(self, version: int) -> PayloadManifest:
        """Publish version ``version``'s chunks retained (once per process) and describe them."""
        known = self._payloads.get(version)
        if known is not None:
            return known
        data = self.state.checkpoint_path(version).read_bytes()
        payload, chunks = split(data, self.chunk_size)
        del data
        for i, chunk in enumerate(chunks):
            self.sender.publish(
                topics.global_chunk(self.federation, version, i), chunk, qos=1, retain=True
            )
        self._payloads[version] = payload
        log.info(
            "published global v%d: %d bytes in %d chunks",
            version,
            payload.total_size,
            payload.num_chunks,
        )
        self._onnx_payloads[version] = self._publish_onnx(version)
        if self._onnx_payloads[version] is not None and self.onnx is not None:
            self._serving_points[version] = self.onnx.serving_point(version)
        return payload

    def _publish_onnx(self, version: int) -> PayloadManifest | None:
        """Publish the version's ONNX export retained (when there is one) and describe it."""
        path = self.onnx.ensure(version) if self.onnx is not None else None
        if path is None:
            return None
        payload, chunks = split(path.read_bytes(), self.chunk_size)
        for i, chunk in enumerate(chunks):
            self.sender.publish(
                topics.global_onnx_chunk(self.federation, version, i), chunk, qos=1, retain=True
            )
        log.info(
            "published global v%d ONNX: %d bytes in %d chunks",
            version,
            payload.total_size,
            payload.num_chunks,
        )
        return payload

    def publish_manifest(self, version: int, round_config: RoundConfig | None) -> GlobalManifest:
        """Make ``version`` current (chunks first) with the open round's config, or none."""
        payload = self.publish_chunks(version)
        manifest = GlobalManifest(
            federation=self.federation,
            version=version,
            arch=self.model.arch,
            texture_dim=self.model.texture_dim,
            payload=payload,
            round=round_config,
            created_at=time.time(),
            onnx=self._onnx_payloads.get(version),
            operating_point=self._serving_points.get(version),
        )
        if self.signer is not None:
            manifest = self.signer(manifest)
        self.sender.publish(
            topics.global_current(self.federation), manifest.to_bytes(), qos=1, retain=True
        )
        log.info(
            "global manifest: v%d, round %s",
            version,
            round_config.round if round_config else "none",
        )
        return manifest

    def retire_before(self, keep_from: int) -> list[int]:
        """Clear the retained chunks of every version < ``keep_from`` not yet retired."""
        retired: list[int] = []
        for row in self.state.versions():
            if row.version >= keep_from or row.retired:
                continue
            path = self.state.checkpoint_path(row.version)
            size = path.stat().st_size if path.exists() else 0
            num_chunks = -(-size // self.chunk_size)
            for i in range(num_chunks):
                self.sender.publish(
                    topics.global_chunk(self.federation, row.version, i), b"", qos=1, retain=True
                )
            onnx_chunks = self._retire_onnx(row.version)
            self.state.mark_retired(row.version)
            self._payloads.pop(row.version, None)
            self._onnx_payloads.pop(row.version, None)
            retired.append(row.version)
            log.info("retired global v%d (%d retained chunks cleared, %d ONNX)",
                     row.version, num_chunks, onnx_chunks)  # fmt: skip
        return retired

    def _retire_onnx(self, version: int) -> int:
        """Clear the retained ONNX chunks of ``version``; returns how many there were."""
        if self.onnx is None:
            return 0
        path = self.onnx.path(version)
        size = path.stat().st_size if path.exists() else 0
        num_chunks = -(-size // self.chunk_size)
        for i in range(num_chunks):
            self.sender.publish(
                topics.global_onnx_chunk(self.federation, version, i), b"", qos=1, retain=True
            )
        return num_chunks
