"""Ed25519 manifest-signing keys: PKCS#8 PEM private key, SubjectPublicKeyInfo PEM public key
(the standard encodings `fl_protocol.signing` loads with `cryptography`'s PEM loaders)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedscan.errors import ProvisionError
from fedscan.provision.files import PRIVATE, PUBLIC, write_bytes


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key: how revoked.json names a signing key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot read the public signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ProvisionError(f"{path}: not an Ed25519 public key")
    return key


def write_keypair(private_path: Path, public_path: Path) -> Ed25519PublicKey:
    """Generate a keypair; the private key file is created 0600, the public one 0644."""
    key = new_signing_key()
    write_bytes(private_path, private_pem(key), PRIVATE)
    write_bytes(public_path, public_pem(key.public_key()), PUBLIC)
    return key.public_key()
