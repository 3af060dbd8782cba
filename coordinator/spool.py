"""The disk spool of accepted updates and the atomic file writes the state relies on.

A received update is decoded once (codec -> float32 delta) and written here as a plain
safetensors file, atomically (temp file, fsync, rename, fsync of the directory). Aggregation,
including after a restart, re-reads these files: whole (:meth:`SpoolFile.load`, for streaming
strategies) or one tensor at a time (:meth:`SpoolFile.tensor`, for the trimmed mean).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from coordinator.errors import StateError


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_tensors(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file (contiguous copies where needed)."""
    # not np.ascontiguousarray: it turns 0-d tensors (num_batches_tracked) into shape (1,)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    data = {k: v if v.flags.c_contiguous else v.copy(order="C") for k, v in arrays.items()}
    atomic_write_bytes(path, save(data, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path.name}: {exc}") from exc


class SpoolFile:
    """One spooled float32 delta with its sample count (an ``UpdateSource``)."""

    def __init__(self, path: Path, num_samples: int) -> None:
        self.path = Path(path)
        self._num_samples = int(num_samples)
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                self._keys = list(f.keys())
        except (OSError, ValueError) as exc:
            raise StateError(f"spooled update unreadable: {self.path.name}: {exc}") from exc

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def keys(self) -> list[str]:
        return list(self._keys)

    def tensor(self, key: str) -> np.ndarray:
        with safe_open(str(self.path), framework="numpy") as f:
            return np.asarray(f.get_tensor(key))

    def load(self) -> dict[str, np.ndarray]:
        return load_tensors(self.path)[0]
