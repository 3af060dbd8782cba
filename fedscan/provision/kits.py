"""Write the per-participant kits: config + TLS certificate and key + Ed25519 signing keys.

A node kit is a ready-to-run `fedscan node run --config node.toml` folder (paths relative to
the kit); the coordinator kit also carries every active node's public signing key and the
list of revoked nodes. Private keys are written 0600 inside 0700 folders.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from fedscan.errors import ProvisionError
from fedscan.provision.ca import CertificateAuthority, Issued, cert_pem, key_pem
from fedscan.provision.files import PRIVATE, PRIVATE_DIR, make_dir, write_bytes, write_text
from fedscan.provision.layout import KIT, Layout
from fedscan.provision.signing_keys import fingerprint, write_keypair
from fedscan.provision.state import ProvisionState, Revocation

REVOKED_SCHEMA = "fedscan.revoked/1"


def broker_url(state: ProvisionState) -> str:
    host = f"[{state.broker_host}]" if ":" in state.broker_host else state.broker_host
    return f"mqtts://{host}:{state.broker_port}"


def write_tls(kit: Path, ca: CertificateAuthority, issued: Issued) -> None:
    make_dir(kit, PRIVATE_DIR)
    make_dir(kit / "tls", PRIVATE_DIR)
    make_dir(kit / "keys", PRIVATE_DIR)
    write_bytes(kit / KIT.ca, cert_pem(ca.cert))
    write_bytes(kit / KIT.cert, cert_pem(issued.cert))
    write_bytes(kit / KIT.key, key_pem(issued.key), PRIVATE)


def node_toml(state: ProvisionState, node: str) -> str:
    """The edge node's default config (edge_node.config.default_toml) with [federation]
    filled in for this federation's broker and keys."""
    from edge_node.config import default_toml  # light: no torch, only the config module

    base = default_toml(node)
    head, sep, _ = base.partition("\n[federation]\n")
    if not sep:
        raise ProvisionError("edge_node.config.default_toml() has no [federation] section")
    return (
        head
        + f"""
[federation]
enabled = true
federation = "{state.federation}"
broker = "{broker_url(state)}"  # TLS; the client certificate below is required
ca_file = "{KIT.ca}"  # the federation's CA: the only one trusted for the broker
cert_file = "{KIT.cert}"  # this node's certificate: CN = node_id = MQTT username
key_file = "{KIT.key}"  # its private key (0600)
signing_key = "{KIT.signing_key}"  # Ed25519 key signing this node's update manifests (0600)
coordinator_public_key = "{KIT.coordinator_pub}"  # global manifests must verify with it
"""
    )


def coordinator_toml(state: ProvisionState) -> str:
    """coordinator.config format (coordinator/config.py), broker section filled in."""
    nodes = state.nodes
    min_nodes = max(1, min(2, len(nodes)))
    expected = ", ".join(f'"{n}"' for n in nodes)
    return f"""# fedscan coordinator configuration written by `fedscan provision`.
# Paths are relative to this file.
federation = "{state.federation}"
state_dir = "state"
signing_key = "{KIT.signing_key}"  # Ed25519 key signing global manifests (0600)
node_keys_dir = "{KIT.nodes_dir}"  # trusted <node>.pub: every update must be signed by its node
revoked_file = "{KIT.revoked}"  # revoked nodes / key fingerprints: their updates are refused

[broker]
url = "{broker_url(state)}"
ca_file = "{KIT.ca}"
cert_file = "{KIT.cert}"  # CN = "{state.coordinator}" = MQTT username (the broker ACL keys on it)
key_file = "{KIT.key}"

[rounds]
min_nodes = {min_nodes}
expected_nodes = [{expected}]
"""


def write_node_kit(
    layout: Layout,
    state: ProvisionState,
    ca: CertificateAuthority,
    node: str,
    issued: Issued,
) -> str:
    """Write DIR/kits/<node>; returns the public signing key's fingerprint."""
    kit = layout.kit(node)
    write_tls(kit, ca, issued)
    public = write_keypair(kit / KIT.signing_key, kit / KIT.signing_pub)
    coordinator_pub = layout.kit(state.coordinator) / KIT.signing_pub
    if not coordinator_pub.exists():
        raise ProvisionError(f"{coordinator_pub} is missing: the coordinator kit is incomplete")
    shutil.copyfile(coordinator_pub, kit / KIT.coordinator_pub)
    write_text(kit / "node.toml", node_toml(state, node))
    # the coordinator trusts this node's signing key from now on
    trusted = layout.kit(state.coordinator) / KIT.nodes_dir
    make_dir(trusted, 0o755)
    shutil.copyfile(kit / KIT.signing_pub, trusted / f"{node}.pub")
    return fingerprint(public)


def write_coordinator_kit(
    layout: Layout, state: ProvisionState, ca: CertificateAuthority, issued: Issued
) -> str:
    """Write DIR/kits/<coordinator> (without node keys); returns its key's fingerprint."""
    kit = layout.kit(state.coordinator)
    write_tls(kit, ca, issued)
    make_dir(kit / KIT.nodes_dir, 0o755)
    public = write_keypair(kit / KIT.signing_key, kit / KIT.signing_pub)
    write_revoked(kit / KIT.revoked, state.federation, state.revoked)
    return fingerprint(public)


def refresh_coordinator_files(layout: Layout, state: ProvisionState) -> None:
    """Rewrite what depends on the node list: coordinator.toml, revoked.json, trusted keys."""
    kit = layout.kit(state.coordinator)
    write_text(kit / "coordinator.toml", coordinator_toml(state))
    write_revoked(kit / KIT.revoked, state.federation, state.revoked)
    trusted = kit / KIT.nodes_dir
    for pub in trusted.glob("*.pub"):
        if pub.stem not in state.nodes:
            pub.unlink()


def write_revoked(path: Path, federation: str, revoked: Mapping[str, Revocation]) -> None:
    """``revoked.json``: nodes whose updates the coordinator must refuse, with the fingerprint
    (sha256 of the raw Ed25519 public key) of the signing key they held."""
    data = {
        "schema": REVOKED_SCHEMA,
        "federation": federation,
        "nodes": {
            node: {
                "signing_key_sha256": r.signing_key_sha256,
                "cert_serial": r.cert_serial,
                "revoked_at": r.revoked_at,
                "reason": r.reason,
            }
            for node, r in sorted(revoked.items())
        },
    }
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
