"""PahoTransport against a real Mosquitto (broker_config/dev.conf): the scenarios the daemons
rely on, including a broker restart, a 1 MiB chunk and the last will."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedscan.brokers.mosquitto import Mosquitto
from fl_protocol.errors import TransportError
from fl_protocol.transport import MqttSettings, PahoTransport
from tests.integration.transport_scenarios import SCENARIOS, BrokerLike, Inbox

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_paho_transport_on_mosquitto(
    mosquitto: Mosquitto, scenario: Callable[[BrokerLike], None]
) -> None:
    scenario(mosquitto)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    ca: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _pki(d: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(f"{name} CA", key, None, None, ca=True)
    _write(d / f"{name}-ca", cert, key)
    return cert, key


def test_paho_transport_over_tls_with_client_certificates(tmp_path: Path) -> None:
    """A TLS listener requiring client certificates: our CA's cert connects and relays a
    message; no client certificate, or one from another CA, is refused with TransportError."""
    ca, ca_key = _pki(tmp_path, "fed")
    rogue, rogue_key = _pki(tmp_path, "rogue")
    for name, (issuer, issuer_key) in {
        "broker": (ca, ca_key),
        "node-a": (ca, ca_key),
        "intruder": (rogue, rogue_key),
    }.items():
        key = ec.generate_private_key(ec.SECP256R1())
        _write(tmp_path / name, _issue(name, key, issuer.subject, issuer_key), key)
    listener = (
        "listener {port} 127.0.0.1\n"
        f"cafile {tmp_path / 'fed-ca.crt'}\n"
        f"certfile {tmp_path / 'broker.crt'}\nkeyfile {tmp_path / 'broker.key'}\n"
        "require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.2\n"
    )

    def tls_client(who: str | None, timeout: float = 10.0) -> PahoTransport:
        cert = None if who is None else str(tmp_path / f"{who}.crt")
        key = None if who is None else str(tmp_path / f"{who}.key")
        return PahoTransport(
            MqttSettings(
                port=broker.port,
                client_id=f"tls-{who}",
                ca_file=str(tmp_path / "fed-ca.crt"),
                cert_file=cert,
                key_file=key,
                connect_timeout_s=timeout,
            )
        )

    # run as root, mosquitto drops to user "mosquitto", which cannot read pytest's tmp dirs
    with Mosquitto(tmp_path / "broker", listener_block=listener, extra="user root") as broker:
        node = tls_client("node-a")
        inbox = Inbox()
        node.subscribe("fl/d/node/+/status", inbox)
        node.connect()
        try:
            node.publish("fl/d/node/node-a/status", b"online", retain=True)
            assert inbox.wait_for(lambda ms: len(ms) == 1)
        finally:
            node.disconnect()
        for who in (None, "intruder"):
            with pytest.raises(TransportError):
                tls_client(who, timeout=1.5).connect()  # refused after the handshake
        with pytest.raises(TransportError, match="TLS setup"):
            PahoTransport(MqttSettings(port=broker.port, client_id="x", ca_file="/nonexistent"))
