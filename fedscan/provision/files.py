"""Atomic file writes with explicit modes: a private key is never readable by others, not even
for the moment between create and chmod, and a crash never leaves half a certificate behind."""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE = 0o600  # private keys (TLS, Ed25519 signing, the CA's)
PUBLIC = 0o644  # certificates, public keys, configs, ACL, CRL
PRIVATE_DIR = 0o700  # folders that hold private keys


def write_bytes(path: Path, data: bytes, mode: int = PUBLIC) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename), created with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; this is not
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str, mode: int = PUBLIC) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode)


def make_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path
