"""Crash-safe file writes and file digests, shared by the spools, outboxes and model files of
both daemons (a crash leaves either the old file or the new one, never a torn one)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, *, sync_dir: bool = False, mode: int | None = None
) -> None:
    """Write ``data`` to ``path`` via an fsynced temp file + rename; with ``sync_dir`` the
    rename itself is fsynced too (the file survives a power cut, not only a process crash).
    The file is owner-only (0600) unless ``mode`` says otherwise (set exactly, not umasked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` via a temp file beside ``dst`` + rename (a plain rename
    fails across filesystems)."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
