"""Atomic file writes with explicit modes: a private key is never readable by others, not even
for the moment between create and chmod, and a crash never leaves half a certificate behind."""

from __future__ import annotations

from pathlib import Path

from fl_protocol.files import write_atomic

PRIVATE = 0o600  # private keys (TLS, Ed25519 signing, the CA's)
PUBLIC = 0o644  # certificates, public keys, configs, ACL, CRL
PRIVATE_DIR = 0o700  # folders that hold private keys


def write_bytes(path: Path, data: bytes, mode: int = PUBLIC) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename), created with ``mode``."""
    write_atomic(path, data, mode=mode)
    return path


def write_text(path: Path, text: str, mode: int = PUBLIC) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode)


def make_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path
