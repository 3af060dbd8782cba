"""Render the broker's ``mosquitto.conf`` from ``broker_config/production.conf``.

Mosquitto resolves relative paths against its working directory, not the config file, so the
rendered config holds absolute paths: those of the folder the operator installs DIR/broker
into on the broker host (``--broker-install-dir``; by default DIR/broker itself).
"""

from __future__ import annotations

import datetime as dt
import re
from importlib import resources
from pathlib import Path, PurePosixPath

from fedscan.errors import ProvisionError
from fedscan.provision.acl import render_acl
from fedscan.provision.ca import CertificateAuthority, Issued, cert_pem, crl_pem, key_pem
from fedscan.provision.files import PRIVATE, PRIVATE_DIR, make_dir, write_bytes, write_text
from fedscan.provision.layout import BROKER, Layout
from fedscan.provision.state import ProvisionState

_PLACEHOLDER = re.compile(r"@[A-Z_]+@")


def template_text() -> str:
    return (resources.files("broker_config") / "production.conf").read_text()


def render_broker_conf(install_dir: str, port: int, template: str | None = None) -> str:
    base = PurePosixPath(install_dir)
    if not base.is_absolute():
        raise ProvisionError(f"broker install dir must be absolute, not {install_dir!r}")
    values = {
        "@PORT@": str(port),
        "@ACL_FILE@": str(base / BROKER.acl),
        "@CAFILE@": str(base / BROKER.ca),
        "@CERTFILE@": str(base / BROKER.cert),
        "@KEYFILE@": str(base / BROKER.key),
        "@CRLFILE@": str(base / BROKER.crl),
        # mosquitto appends "mosquitto.db" to this string: the trailing slash is required
        "@PERSISTENCE_DIR@": str(base / BROKER.data) + "/",
    }
    text = template if template is not None else template_text()
    for key, value in values.items():
        if any(c.isspace() for c in value):
            raise ProvisionError(f"mosquitto.conf paths cannot contain spaces: {value!r}")
        text = text.replace(key, value)
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:
        raise ProvisionError(f"production.conf has placeholders provisioning does not know: {left}")
    return text


def write_broker_conf(layout: Layout, state: ProvisionState) -> Path:
    conf = render_broker_conf(state.broker_install_dir, state.broker_port)
    return write_text(layout.broker_dir / BROKER.conf, conf)


def write_acl(layout: Layout, state: ProvisionState) -> Path:
    text = render_acl(state.federation, state.coordinator, state.nodes)
    return write_text(layout.broker_dir / BROKER.acl, text)


def write_crl(layout: Layout, state: ProvisionState, ca: CertificateAuthority) -> None:
    """Sign a CRL of every revoked certificate (number ``state.crl_number``) and put it both
    in DIR/ca (the CA's record) and DIR/broker (what Mosquitto reads)."""
    revoked = [
        (int(r.cert_serial, 16), dt.datetime.fromisoformat(r.revoked_at), r.reason)
        for r in state.revoked.values()
    ]
    pem = crl_pem(ca.crl(revoked, number=state.crl_number, days=state.crl_days))
    write_bytes(layout.ca_crl, pem)
    write_bytes(layout.broker_dir / BROKER.crl, pem)


def write_server_files(layout: Layout, ca: CertificateAuthority, server: Issued) -> None:
    d = make_dir(layout.broker_dir, PRIVATE_DIR)  # holds server.key
    make_dir(d / BROKER.data, PRIVATE_DIR)
    write_bytes(d / BROKER.ca, cert_pem(ca.cert))
    write_bytes(d / BROKER.cert, cert_pem(server.cert))
    write_bytes(d / BROKER.key, key_pem(server.key), PRIVATE)
