"""Ed25519 manifest signatures, key files, and the replay guard."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from fl_protocol.chunking import split
from fl_protocol.errors import ReplayError, SignatureError
from fl_protocol.schemas import GlobalManifest, UpdateManifest
from fl_protocol.signing import (
    ReplayGuard,
    generate_keypair,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
    sign_manifest,
    verify_manifest,
)


def global_manifest(data: bytes = b"weights" * 100) -> GlobalManifest:
    payload, _ = split(data, chunk_size=256)
    return GlobalManifest(
        federation="demo", version=1, arch="cnn2d", texture_dim=0, payload=payload
    )


def test_sign_and_verify_roundtrip_over_the_wire() -> None:
    key, pub = generate_keypair()
    signed = sign_manifest(global_manifest(), key, "coordinator")
    assert signed.key_id == "coordinator" and signed.signature
    received = GlobalManifest.from_bytes(signed.to_bytes())
    verify_manifest(received, pub)


def test_unsigned_wrong_key_and_tampered_are_refused() -> None:
    key, pub = generate_keypair()
    _, other = generate_keypair()
    m = global_manifest()
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(m, pub)
    signed = sign_manifest(m, key, "coordinator")
    with pytest.raises(SignatureError):
        verify_manifest(signed, other)
    # the payload digest is covered: swapping in other weights breaks the signature
    other_payload = global_manifest(b"evil" * 100).payload
    for tampered in (
        dataclasses.replace(signed, payload=other_payload),
        dataclasses.replace(signed, version=2),
        dataclasses.replace(signed, key_id="someone-else"),
    ):
        with pytest.raises(SignatureError):
            verify_manifest(tampered, pub)


def test_update_manifests_sign_too() -> None:
    key, pub = generate_keypair()
    payload, _ = split(b"delta", chunk_size=4)
    m = UpdateManifest(
        federation="demo",
        round=1,
        node="a",
        base_version=0,
        codec="fp16",
        num_samples=3,
        payload=payload,
    )
    verify_manifest(UpdateManifest.from_bytes(sign_manifest(m, key, "a").to_bytes()), pub)


def test_key_files_roundtrip_and_private_is_0600(tmp_path: Path) -> None:
    key, pub = generate_keypair()
    save_private_key(key, tmp_path / "node.key")
    save_public_key(pub, tmp_path / "node.pub")
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    loaded = load_private_key(tmp_path / "node.key")
    signed = sign_manifest(global_manifest(), loaded, "k")
    verify_manifest(signed, load_public_key(tmp_path / "node.pub"))


def test_loading_garbage_or_wrong_key_type_raises_signature_error(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n")
    ecdsa = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        ecdsa.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ec.pub").write_bytes(
        ecdsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for bad in ("junk.pem", "ec.pem", "missing.pem"):
        with pytest.raises(SignatureError):
            load_private_key(tmp_path / bad)
    for bad in ("junk.pem", "ec.pub"):
        with pytest.raises(SignatureError):
            load_public_key(tmp_path / bad)


def test_replay_guard_global_versions_never_go_back(tmp_path: Path) -> None:
    guard = ReplayGuard(tmp_path / "replay.sqlite")
    assert guard.highest_global is None
    assert guard.accept_global(3) is True
    assert guard.accept_global(3) is False  # retained manifest redelivered: not new
    guard.close()
    reopened = ReplayGuard(tmp_path / "replay.sqlite")
    with pytest.raises(ReplayError, match="older"):
        reopened.check_global(2)
    assert reopened.accept_global(4) is True and reopened.highest_global == 4


def test_replay_guard_updates(tmp_path: Path) -> None:
    guard = ReplayGuard(tmp_path / "replay.sqlite")
    assert guard.accept_update("a", 2, "11" * 16) is True
    assert guard.accept_update("a", 2, "11" * 16) is False  # resend after restart: duplicate
    with pytest.raises(ReplayError, match="already has"):
        guard.check_update("a", 2, "22" * 16)
    with pytest.raises(ReplayError, match="older"):
        guard.check_update("a", 1, "33" * 16)
    with pytest.raises(ReplayError, match="nonce"):
        guard.check_update("b", 2, "11" * 16)
    assert guard.accept_update("b", 2, "44" * 16) is True
    guard.close()
    reopened = ReplayGuard(tmp_path / "replay.sqlite")
    with pytest.raises(ReplayError):
        reopened.accept_update("a", 1, "55" * 16)
    assert reopened.accept_update("a", 3, "66" * 16) is True
