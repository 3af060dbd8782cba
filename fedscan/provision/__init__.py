"""Provisioning of a federation: CA, broker certificate and config, ACL, CRL, and a
ready-to-run kit per participant (TLS client certificate + Ed25519 signing key + config).

    provision(out, federation, nodes, ...) -> Outcome     `fedscan provision`
    add_node(out, node) -> Outcome                        `fedscan provision add-node`
    revoke_node(out, node, reason=...) -> Outcome         `fedscan provision revoke`
    renew_crl(out, days=None) -> Outcome                  `fedscan provision crl`

Only the `cryptography` package does cryptography here. Folder layout: ``layout.py``.
"""

from __future__ import annotations

from fedscan.provision.layout import BROKER, KIT, Layout
from fedscan.provision.outcome import Outcome
from fedscan.provision.provisioner import add_node, provision
from fedscan.provision.revoke import renew_crl, revoke_node
from fedscan.provision.state import ProvisionState, load_state

__all__ = [
    "BROKER",
    "KIT",
    "Layout",
    "Outcome",
    "ProvisionState",
    "add_node",
    "load_state",
    "provision",
    "renew_crl",
    "revoke_node",
]
