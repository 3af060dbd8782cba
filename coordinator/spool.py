"""The disk spool of accepted updates: one safetensors file per update, read tensor by tensor.

An accepted update is spooled exactly as it arrived: the verified, still-encoded codec payload
(safetensors with ``fl_protocol.codecs`` metadata), written atomically (``write_atomic``: temp file,
fsync, rename, fsync of the directory). That keeps the spool as small as the wire format (an int8
resnet18 delta is ~11 MB, not 45) and costs nothing to write. Aggregation, including after a
restart, decodes these files again one tensor at a time (:meth:`SpoolFile.tensor`: FedAvg and the
strategies built on it fold each tensor in and drop it; the trimmed mean stacks one tensor of every
node), never the whole file at once; :meth:`SpoolFile.load` decodes everything (tests, small files).
Read tensor by tensor, a file is refused like the whole decode refuses it: a tensor that decodes to
NaN or inf, a wrong dtype or scale, a tensor count that differs from the metadata. Plain float
safetensors files (no codec metadata) are read as they are."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from coordinator.errors import StateError
from fl_protocol import codecs
from fl_protocol.errors import CodecError
from fl_protocol.files import write_atomic


def save_tensors(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file (contiguous copies where needed)."""
    # not np.ascontiguousarray: it turns 0-d tensors (num_batches_tracked) into shape (1,)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    data = {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in arrays.items()}
    write_atomic(path, save(data, metadata=metadata), sync_dir=True)


def load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path.name}: {exc}") from exc


class SpoolFile:
    """One spooled delta with its sample count (an ``UpdateSource``), decoded on demand."""

    def __init__(self, path: Path, num_samples: int) -> None:
        self.path = Path(path)
        self._num_samples = int(num_samples)
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
        except (OSError, ValueError) as exc:
            raise StateError(f"spooled update unreadable: {self.path.name}: {exc}") from exc
        encoded = meta.get("schema") == codecs.SCHEMA
        self._codec = codecs.create_codec(meta.get("codec", "")) if encoded else None
        self._keys = [k for k in names if not k.endswith(codecs.SCALE_SUFFIX)]
        suffix = codecs.SCALE_SUFFIX
        self._scaled = {k.removesuffix(suffix) for k in names if k.endswith(suffix)}
        if encoded and meta.get("tensors") not in (None, str(len(self._keys))):
            raise StateError(
                f"spooled update unreadable: {self.path.name}: holds {len(self._keys)} tensors, "
                f"its metadata says {meta.get('tensors')}"
            )

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def keys(self) -> list[str]:
        return list(self._keys)

    def tensor(self, key: str) -> np.ndarray:
        """One tensor, decoded to float32 (integer counters pass through)."""
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                return self._decode(f, key)
        except (OSError, ValueError, CodecError) as exc:
            raise StateError(f"spooled update unreadable: {self.path.name}: {exc}") from exc

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor in turn, decoded one at a time from one open file (FedAvg's fold)."""
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                for key in self._keys:
                    # no local name for the tensor: the suspended generator must not keep it
                    yield key, self._decode(f, key)
        except (OSError, ValueError, CodecError) as exc:
            raise StateError(f"spooled update unreadable: {self.path.name}: {exc}") from exc

    def _decode(self, f: Any, key: str) -> np.ndarray:
        """Tensor ``key`` (with its scale, if quantized) from the open file ``f``, decoded."""
        stored = {key: f.get_tensor(key)}
        if key in self._scaled:
            scale = key + codecs.SCALE_SUFFIX
            stored[scale] = f.get_tensor(scale)
        raw = stored[key]
        if self._codec is None or (raw.dtype.kind in "iub" and key not in self._scaled):
            return np.asarray(raw)
        del raw
        value = self._codec.decode_tensor(key, stored)
        del stored  # the stored form is not needed once decoded
        if not np.all(np.isfinite(value)):
            raise CodecError(f"tensor {key!r} decodes to NaN or inf")
        return value

    def load(self) -> dict[str, np.ndarray]:
        if self._codec is None:
            return load_tensors(self.path)[0]
        try:
            return codecs.decode(self.path.read_bytes())
        except (OSError, CodecError) as exc:
            raise StateError(f"spooled update unreadable: {self.path.name}: {exc}") from exc
