"""Ed25519 signatures of manifests, and replay protection.

The coordinator signs every ``GlobalManifest``, each node signs its ``UpdateManifest``. The
signature covers the canonical JSON of the manifest with ``signature`` set to null (``key_id``
included), hence the payload SHA-256 and, transitively, every chunk. Keys are PEM files
(PKCS#8 private, SubjectPublicKeyInfo public), made with ``cryptography``; no hand-rolled crypto.

``ReplayGuard`` remembers, in a small SQLite file, the highest global version accepted and each
node's accepted (round, nonce), so an old global model, an old round's update or a replayed
nonce is refused with ReplayError even after a restart.
"""

from __future__ import annotations

import base64
import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fl_protocol.errors import ReplayError, SignatureError
from fl_protocol.files import write_atomic
from fl_protocol.schemas import GlobalManifest, UpdateManifest
from fl_protocol.topics import check_id

M = TypeVar("M", GlobalManifest, UpdateManifest)


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """PEM (PKCS#8, unencrypted) with mode 0600 from the first byte on."""
    path = Path(path)
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, data, mode=0o600)


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    data = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(path).write_bytes(data)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load private key {Path(path).name}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{Path(path).name} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot load public key {Path(path).name}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{Path(path).name} is not an Ed25519 public key")
    return key


def signed_bytes(manifest: GlobalManifest | UpdateManifest) -> bytes:
    """The exact bytes a signature covers: canonical JSON with signature = null."""
    return dataclasses.replace(manifest, signature=None).to_bytes()


def sign_manifest(manifest: M, key: Ed25519PrivateKey, key_id: str) -> M:
    """A copy of ``manifest`` with ``key_id`` set and signed by ``key``."""
    unsigned = dataclasses.replace(manifest, key_id=check_id(key_id, "key_id"), signature=None)
    signature = key.sign(signed_bytes(unsigned))
    return dataclasses.replace(unsigned, signature=base64.b64encode(signature).decode("ascii"))


def verify_manifest(
    manifest: GlobalManifest | UpdateManifest, public_key: Ed25519PublicKey
) -> None:
    """SignatureError unless ``manifest`` carries a valid signature by ``public_key``."""
    if manifest.signature is None:
        raise SignatureError(f"{manifest.KIND} is not signed")
    try:
        public_key.verify(base64.b64decode(manifest.signature), signed_bytes(manifest))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{manifest.KIND} signature does not verify") from None


class ReplayGuard:
    """Persistent memory of what was accepted, to refuse replays and rollbacks.

    ``check_*`` return True for something new, False for an exact repeat of what was already
    accepted (QoS 1 redelivery, a node resending after a restart: answer, don't count twice),
    and raise ReplayError for a replay: an older global version, an update for a round older
    than one already accepted from that node, a second different update for the same round,
    or a nonce seen before. ``accept_*`` check, then record.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # accept_* holds it across check + insert
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS updates (node TEXT NOT NULL, round INTEGER NOT NULL,"
            " nonce TEXT NOT NULL UNIQUE, at REAL NOT NULL, PRIMARY KEY (node, round))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS global (id INTEGER PRIMARY KEY CHECK (id = 0),"
            " version INTEGER NOT NULL, at REAL NOT NULL)"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def highest_global(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT version FROM global WHERE id = 0").fetchone()
        return None if row is None else int(row[0])

    def check_global(self, version: int) -> bool:
        highest = self.highest_global
        if highest is not None and version < highest:
            raise ReplayError(f"global version {version} is older than accepted {highest}")
        return highest is None or version > highest

    def accept_global(self, version: int) -> bool:
        with self._lock:
            new = self.check_global(version)
            if new:
                self._db.execute(
                    "INSERT INTO global (id, version, at) VALUES (0, ?, ?) ON CONFLICT(id)"
                    " DO UPDATE SET version = excluded.version, at = excluded.at",
                    (version, time.time()),
                )
        return new

    def check_update(self, node: str, round_: int, nonce: str) -> bool:
        with self._lock:
            same_round = self._db.execute(
                "SELECT nonce FROM updates WHERE node = ? AND round = ?", (node, round_)
            ).fetchone()
            latest = self._db.execute(
                "SELECT MAX(round) FROM updates WHERE node = ?", (node,)
            ).fetchone()[0]
            seen = self._db.execute(
                "SELECT node, round FROM updates WHERE nonce = ?", (nonce,)
            ).fetchone()
        if same_round is not None:
            if same_round[0] == nonce:
                return False
            raise ReplayError(f"node already has an accepted update for round {round_}")
        if seen is not None:
            raise ReplayError("nonce was already used")
        if latest is not None and round_ < latest:
            raise ReplayError(f"round {round_} is older than accepted round {latest}")
        return True

    def accept_update(self, node: str, round_: int, nonce: str) -> bool:
        with self._lock:
            new = self.check_update(node, round_, nonce)
            if new:
                self._db.execute(
                    "INSERT INTO updates (node, round, nonce, at) VALUES (?, ?, ?, ?)",
                    (node, round_, nonce, time.time()),
                )
        return new
