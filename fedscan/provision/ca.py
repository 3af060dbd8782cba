"""The federation's certificate authority, built on the `cryptography` package only.

TLS keys are ECDSA P-256 with SHA-256 signatures: OpenSSL (Mosquitto), Python's ssl module and
every maintained MQTT client accept them, they are small, and TLS 1.2 ECDHE-ECDSA suites and
TLS 1.3 both use them. (Ed25519 certificates are not accepted by all TLS stacks; Ed25519 is
used for the manifest signing keys instead, see ``signing_keys.py``.)

Certificates carry what OpenSSL checks when it verifies a chain: basicConstraints,
keyUsage, extendedKeyUsage (serverAuth for the broker, clientAuth for participants: a node's
certificate cannot serve as a broker's), subject/authority key identifiers, and for the broker
subjectAltName (host names are matched against SAN only, never the CN).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedscan.errors import ProvisionError

_SKEW = dt.timedelta(minutes=5)  # tolerate clocks a little behind ours

# CRL reason codes an operator may give (RFC 5280 5.3.1; "unspecified" should not be used).
REASONS: dict[str, x509.ReasonFlags] = {
    "key_compromise": x509.ReasonFlags.key_compromise,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "superseded": x509.ReasonFlags.superseded,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: daemons start unattended; the file mode (0600) protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, just issued."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class CertificateAuthority:
    """Issues the broker's and the participants' certificates and the revocation list."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, federation: str, days: int) -> CertificateAuthority:
        key = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedscan federation {federation}"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"fedscan {federation} CA"),
            ]
        )
        now = utcnow()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ProvisionError(f"cannot load the CA from {cert_path.parent}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisionError(f"{key_path}: the CA key is not an EC key")
        return cls(cert, key)

    def _not_after(self, days: int) -> dt.datetime:
        # A certificate must not outlive the CA that vouches for it.
        return min(utcnow() + dt.timedelta(days=days), self.cert.not_valid_after_utc)

    def _leaf(
        self,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        days: int,
        usage: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        now = utcnow()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(self._not_after(days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )

    def issue_server(self, hosts: Sequence[str], days: int) -> Issued:
        """The broker's certificate; ``hosts`` (names or IPs) go into subjectAltName."""
        if not hosts:
            raise ProvisionError("the broker certificate needs at least one host name")
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        names = list(dict.fromkeys(hosts))  # de-duplicated, order kept
        cert = (
            self._leaf(subject, key, days, ExtendedKeyUsageOID.SERVER_AUTH)
            .add_extension(x509.SubjectAlternativeName([san_entry(h) for h in names]), False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert, key)

    def issue_client(self, participant: str, role: str, days: int) -> Issued:
        """A participant's client certificate. CN = participant id = MQTT username at the
        broker (``use_identity_as_username``); OU records the role for humans; the SAN URI
        ``urn:fedscan:<role>:<id>`` makes it a complete RFC 5280 end-entity certificate (strict
        verifiers require a SAN)."""
        key = new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self._org()),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, participant),
            ]
        )
        san = x509.UniformResourceIdentifier(f"urn:fedscan:{role}:{participant}")
        cert = (
            self._leaf(subject, key, days, ExtendedKeyUsageOID.CLIENT_AUTH)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert, key)

    def _org(self) -> str:
        orgs = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(orgs[0].value) if orgs else "fedscan"

    def crl(
        self, revoked: Iterable[tuple[int, dt.datetime, str]], number: int, days: int
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial, revoked_at, reason)`` (reason: a ``REASONS`` key).

        OpenSSL refuses EVERY client once a CRL is past its nextUpdate (verified with
        Mosquitto 2.0.11), so ``days`` must cover the time until the next `provision crl`."""
        now = utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _SKEW)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        for serial, at, reason in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(at)
                .add_extension(x509.CRLReason(REASONS[reason]), critical=False)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())
