"""Which node keys the coordinator trusts: ``<node_keys_dir>/<node>.pub`` (Ed25519, PEM, as the
provisioning kit lays them out) minus the nodes listed in ``revoked.json``.

With ``node_keys_dir`` configured every update manifest must carry a valid signature by its
node's key; a node without a key file, a revoked node, or a key whose fingerprint was revoked
is refused (``SignatureError``, acked "rejected: signature"). Key files are read on each check,
so provisioning a new node needs no coordinator restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fl_protocol.errors import SignatureError
from fl_protocol.schemas import UpdateManifest
from fl_protocol.signing import load_public_key, verify_manifest
from fl_protocol.topics import check_id

log = logging.getLogger(__name__)


def key_fingerprint(path: Path) -> str:
    """sha256 of the raw 32-byte Ed25519 public key (the provisioning fingerprint)."""
    raw = load_public_key(path).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()


class NodeKeys:
    def __init__(self, keys_dir: Path, revoked_file: Path | None = None) -> None:
        self.keys_dir = Path(keys_dir)
        self.revoked_file = revoked_file

    def _revoked(self) -> tuple[set[str], set[str]]:
        """(revoked node ids, revoked key fingerprints); a missing file revokes nothing."""
        if self.revoked_file is None or not self.revoked_file.exists():
            return set(), set()
        try:
            nodes = json.loads(self.revoked_file.read_text())["nodes"]
            prints = {str(v.get("signing_key_sha256", "")) for v in nodes.values()}
            return set(nodes), prints - {""}
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            # an unreadable revocation list must not silently trust everyone
            raise SignatureError(f"revocation list unreadable: {exc}") from exc

    def verify(self, manifest: UpdateManifest) -> None:
        node = check_id(manifest.node, "node")
        revoked_nodes, revoked_prints = self._revoked()
        if node in revoked_nodes:
            raise SignatureError(f"node {node} is revoked")
        path = self.keys_dir / f"{node}.pub"
        if not path.exists():
            raise SignatureError(f"no trusted signing key for node {node}")
        if key_fingerprint(path) in revoked_prints:
            raise SignatureError(f"the signing key of node {node} is revoked")
        verify_manifest(manifest, load_public_key(path))
