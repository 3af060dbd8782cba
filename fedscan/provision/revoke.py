"""Revoke a node (`fedscan provision revoke`) and renew the CRL (`fedscan provision crl`).

Revocation acts on three locks at once: the certificate goes on the CRL (the broker refuses
new TLS handshakes with it), the node's `user` block leaves the ACL (on reload, even a
connection still open loses every right), and its signing key leaves the coordinator's
trusted keys and is listed in ``revoked.json`` (its signed updates are refused even if they
arrive through another path).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fedscan.errors import ProvisionError
from fedscan.provision.broker import write_acl, write_crl
from fedscan.provision.ca import REASONS, CertificateAuthority, utcnow
from fedscan.provision.kits import refresh_coordinator_files
from fedscan.provision.layout import Layout
from fedscan.provision.outcome import Outcome, reload_step
from fedscan.provision.state import ProvisionState, Revocation, load_state, save_state

log = logging.getLogger(__name__)


def revoke_node(out: Path, node: str, *, reason: str = "cessation_of_operation") -> Outcome:
    layout = Layout(Path(out).resolve())
    state = load_state(layout.state)
    if reason not in REASONS:
        raise ProvisionError(f"unknown revocation reason {reason!r}; choose from {sorted(REASONS)}")
    if node == state.coordinator:
        raise ProvisionError(
            "the coordinator cannot be revoked alone: its key signs the global model every "
            "node trusts; re-provision the federation (--force) instead"
        )
    if node in state.revoked:
        raise ProvisionError(f"{node!r} is already revoked")
    participant = state.participants.get(node)
    if participant is None:
        raise ProvisionError(f"{node!r} is not a node of {state.federation!r}: {state.nodes}")
    ca = CertificateAuthority.load(layout.ca_cert, layout.ca_key)
    revocation = Revocation(
        cert_serial=participant.cert_serial,
        signing_key_sha256=participant.signing_key_sha256,
        revoked_at=utcnow().isoformat(),
        reason=reason,
    )
    state = state.with_changes(
        participants={k: v for k, v in state.participants.items() if k != node},
        revoked={**state.revoked, node: revocation},
        crl_number=state.crl_number + 1,
    )
    write_crl(layout, state, ca)
    write_acl(layout, state)
    refresh_coordinator_files(layout, state)
    save_state(layout.state, state)
    shutil.rmtree(layout.kit(node), ignore_errors=True)  # its keys are worthless now; no reuse
    log.warning("revoked node %s of federation %s (%s)", node, state.federation, reason)
    coord_kit = layout.kit(state.coordinator)
    return Outcome(
        summary=f"node {node!r} revoked: certificate on the CRL, removed from the ACL and from "
        "the coordinator's trusted keys",
        next_steps=(
            reload_step(
                state.broker_install_dir, f"{layout.broker_dir}/acl and {layout.broker_dir}/crl.pem"
            ),
            f"copy {coord_kit}/keys/revoked.json and {coord_kit}/coordinator.toml to the "
            f"coordinator and delete keys/nodes/{node}.pub there; restart it",
        ),
    )


def renew_crl(out: Path, *, days: int | None = None) -> Outcome:
    """Re-sign the CRL with a fresh nextUpdate (an expired CRL makes the broker refuse all)."""
    layout = Layout(Path(out).resolve())
    state: ProvisionState = load_state(layout.state)
    if days is not None and days < 1:
        raise ProvisionError("--days must be at least 1")
    ca = CertificateAuthority.load(layout.ca_cert, layout.ca_key)
    state = state.with_changes(crl_number=state.crl_number + 1, crl_days=days or state.crl_days)
    write_crl(layout, state, ca)
    save_state(layout.state, state)
    return Outcome(
        summary=f"CRL #{state.crl_number} signed, valid {state.crl_days} days",
        next_steps=(reload_step(state.broker_install_dir, f"{layout.broker_dir}/crl.pem"),),
    )
