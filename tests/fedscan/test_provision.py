"""`fedscan provision`: certificates, keys, kits, ACL, broker config, add-node and revoke.

The broker-side behaviour of these files (a real Mosquitto enforcing them) is tested in
tests/integration/test_broker_security.py; here: what is written, with which modes, and that
the cryptography verifies.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from coordinator.config import load_config as load_coordinator_config
from edge_node.config import load_config as load_node_config
from fedscan.cli import main
from fedscan.errors import ProvisionError
from fedscan.provision import KIT, add_node, load_state, provision, renew_crl, revoke_node
from fedscan.provision.acl import render_acl
from fedscan.provision.broker import render_broker_conf
from fedscan.provision.signing_keys import fingerprint
from fl_protocol import signing

HOST = "broker.hospital-net.example"


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One federation, read-only for the tests that use it."""
    out = tmp_path_factory.mktemp("prov") / "fed"
    provision(out, "hosp", ["a", "b", "c"], broker_host=HOST, broker_port=8884, days=30)
    return out


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A federation a test may change."""
    out = tmp_path / "fed"
    provision(out, "hosp", ["a", "b"], broker_host=HOST)
    return out


# ------------------------------------------------------------------ kits


def test_node_kit_is_a_loadable_node_config_pointing_at_its_files(fed: Path) -> None:
    """kits/a/node.toml loads with edge_node.config; every federation path exists in the kit."""
    kit = fed / "kits" / "a"
    cfg = load_node_config(kit / "node.toml")
    assert cfg.node_id == "a"
    f = cfg.federation
    assert f.enabled and f.federation == "hosp"
    assert f.broker == f"mqtts://{HOST}:8884"
    for path in (f.ca_file, f.cert_file, f.key_file, f.signing_key, f.coordinator_public_key):
        assert path is not None and path.is_file() and path.is_relative_to(kit.resolve())
    assert cert(kit / KIT.cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a"


def test_coordinator_kit_is_a_loadable_coordinator_config(fed: Path) -> None:
    """kits/coordinator/coordinator.toml loads with coordinator.config and names the nodes."""
    kit = fed / "kits" / "coordinator"
    cfg = load_coordinator_config(kit / "coordinator.toml")
    assert cfg.federation == "hosp"
    assert cfg.broker.tls and cfg.broker.host == HOST and cfg.broker.port == 8884
    assert cfg.signing_key == kit.resolve() / KIT.signing_key
    for path in (cfg.broker.ca_file, cfg.broker.cert_file, cfg.broker.key_file):
        assert path is not None and path.is_file()
    assert cfg.rounds.expected_nodes == ("a", "b", "c")
    assert sorted(p.name for p in (kit / KIT.nodes_dir).iterdir()) == ["a.pub", "b.pub", "c.pub"]
    revoked = json.loads((kit / KIT.revoked).read_text())
    assert revoked == {"schema": "fedscan.revoked/1", "federation": "hosp", "nodes": {}}


def test_private_keys_are_0600_in_0700_folders_and_never_in_another_kit(fed: Path) -> None:
    """Every private key file is 0600; kits hold their own keys only; the CA key is in ca/."""
    keys = sorted(fed.rglob("*.key"))
    assert len(keys) == 1 + 1 + 4 * 2  # CA, broker, 4 participants x (TLS + signing)
    for key in keys:
        assert mode(key) == 0o600, key
        assert mode(key.parent) == 0o700, key.parent
    assert not list((fed / "kits").rglob("ca.key"))
    assert not list((fed / "broker").rglob("signing.key"))
    for kit in (fed / "kits").iterdir():
        assert mode(kit) == 0o700
        assert sorted(p.relative_to(kit).as_posix() for p in kit.rglob("*.key")) == [
            KIT.signing_key,
            KIT.key,
        ]


def test_signing_keys_are_standard_pem_usable_by_fl_protocol(fed: Path) -> None:
    """Ed25519 keys load with fl_protocol.signing; each node holds the coordinator's public
    key and the coordinator holds each node's; private and public halves match."""
    coordinator = fed / "kits" / "coordinator"
    coord_pub = signing.load_public_key(coordinator / KIT.signing_pub)
    for node in ("a", "b", "c"):
        kit = fed / "kits" / node
        private = signing.load_private_key(kit / KIT.signing_key)
        assert (kit / KIT.signing_key).read_text().startswith("-----BEGIN PRIVATE KEY-----")
        assert (kit / KIT.coordinator_pub).read_bytes() == (
            coordinator / KIT.signing_pub
        ).read_bytes()
        trusted = signing.load_public_key(coordinator / KIT.nodes_dir / f"{node}.pub")
        trusted.verify(private.sign(b"manifest"), b"manifest")  # raises if not the pair
        assert (
            fingerprint(trusted)
            == load_state(fed / "provision.json").participants[node].signing_key_sha256
        )
    coord_priv = signing.load_private_key(coordinator / KIT.signing_key)
    coord_pub.verify(coord_priv.sign(b"global"), b"global")
    assert isinstance(coord_pub, Ed25519PublicKey)


# ------------------------------------------------------------------ certificates


def test_client_certificates_chain_to_the_ca_for_client_auth_only(fed: Path) -> None:
    """Each participant's certificate verifies against the CA as a TLS client, and cannot
    pass as a server certificate."""
    ca = cert(fed / "ca" / "ca.crt")
    client_verifier = PolicyBuilder().store(Store([ca])).build_client_verifier()
    server_verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(HOST))
    for who in ("coordinator", "a", "b", "c"):
        leaf = cert(fed / "kits" / who / KIT.cert)
        verified = client_verifier.verify(leaf, [])
        assert verified.chain[-1] == ca
        assert cert(fed / "kits" / who / KIT.ca) == ca
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        with pytest.raises(VerificationError):
            server_verifier.verify(leaf, [])


def test_broker_certificate_sans_and_lifetimes(fed: Path) -> None:
    """The broker's certificate names the broker host, localhost and 127.0.0.1 (SAN), is a
    server certificate of the CA, and no certificate outlives its --days (the CA does)."""
    ca = cert(fed / "ca" / "ca.crt")
    server = cert(fed / "broker" / "server.crt")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST, "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for name in (x509.DNSName(HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        PolicyBuilder().store(Store([ca])).build_server_verifier(name).verify(server, [])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(dt.UTC)
    for leaf in [server, *(cert(p) for p in (fed / "kits").glob("*/tls/client.crt"))]:
        assert leaf.not_valid_after_utc - now <= dt.timedelta(days=30)
        assert leaf.signature_hash_algorithm is not None
        assert leaf.signature_hash_algorithm.name == "sha256"
    assert ca.not_valid_after_utc - now > dt.timedelta(days=3000)


def test_initial_crl_is_empty_signed_and_current(fed: Path) -> None:
    ca = cert(fed / "ca" / "ca.crt")
    revocations = crl(fed / "broker" / "crl.pem")
    assert len(revocations) == 0
    assert revocations.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert revocations.next_update_utc is not None
    assert revocations.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)
    assert (fed / "broker" / "crl.pem").read_bytes() == (fed / "ca" / "crl.pem").read_bytes()


# ------------------------------------------------------------------ broker files


def test_acl_grants_each_node_its_own_topics_only(fed: Path) -> None:
    """The rendered ACL: per-user blocks (no `pattern`), nothing for anonymous clients, node
    write rights on its own topics, global/ack writes for the coordinator only."""
    acl = (fed / "broker" / "acl").read_text()
    rules = [ln for ln in acl.splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "user coordinator"  # no rule before the first user line
    assert not [r for r in rules if r.startswith("pattern")]
    blocks: dict[str, list[str]] = {}
    for rule in rules:
        if rule.startswith("user "):
            current = blocks.setdefault(rule.split()[1], [])
        else:
            current.append(rule)
    assert set(blocks) == {"coordinator", "a", "b", "c"}
    assert blocks["a"] == [
        "topic write fl/hosp/round/+/update/a/manifest",
        "topic write fl/hosp/round/+/update/a/chunk/+",
        "topic write fl/hosp/round/+/metrics/a",
        "topic write fl/hosp/node/a/status",
        "topic read fl/hosp/global/#",
        "topic read fl/hosp/round/+/ack/a",
    ]
    assert blocks["coordinator"] == [
        "topic read fl/hosp/#",
        "topic write fl/hosp/global/#",
        "topic write fl/hosp/round/+/ack/+",
        "topic write fl/hosp/coordinator/#",
    ]
    writers_of_global = [
        u for u, rs in blocks.items() if any("write fl/hosp/global" in r for r in rs)
    ]
    assert writers_of_global == ["coordinator"]


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "", "a b", "a\nuser evil", "-a", "x" * 65])
def test_ids_that_would_break_topics_or_the_acl_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError):
        render_acl("hosp", "coordinator", [bad])
    with pytest.raises(ProvisionError):
        provision(tmp_path / "out", "hosp", ["ok", bad])
    assert not (tmp_path / "out" / "ca").exists()  # refused before anything was written


def test_broker_conf_is_the_production_template_with_absolute_paths(fed: Path) -> None:
    """mosquitto.conf: every placeholder filled, every file it names exists, TLS-only."""
    conf = (fed / "broker" / "mosquitto.conf").read_text()
    assert "@" not in "".join(ln for ln in conf.splitlines() if not ln.startswith("#"))
    settings = {
        ln.split()[0]: ln.split(maxsplit=1)[1]
        for ln in conf.splitlines()
        if ln.strip() and not ln.startswith("#") and not ln.startswith("log_type")
    }
    for key in ("cafile", "certfile", "keyfile", "crlfile", "acl_file"):
        assert Path(settings[key]).is_absolute() and Path(settings[key]).is_file(), key
    assert Path(settings["persistence_location"]).is_dir()
    assert settings["persistence_location"].endswith("/")
    assert settings["listener"] == "8884"
    assert settings["require_certificate"] == "true"
    assert settings["allow_anonymous"] == "false"
    assert [ln for ln in conf.splitlines() if ln.startswith("listener")] == ["listener 8884"]


def test_broker_conf_for_another_install_dir() -> None:
    conf = render_broker_conf("/etc/mosquitto/fedscan", 8883)
    assert "cafile /etc/mosquitto/fedscan/ca.crt" in conf
    assert "persistence_location /etc/mosquitto/fedscan/data/" in conf
    with pytest.raises(ProvisionError):
        render_broker_conf("relative/dir", 8883)
    with pytest.raises(ProvisionError):
        render_broker_conf("/etc/mosquitto/fed scan", 8883)


# ------------------------------------------------------------------ changing a federation


def test_rerun_on_existing_folder_is_refused_unless_forced(fresh: Path) -> None:
    """A second `provision` never replaces the CA silently; --force starts over."""
    ca_before = (fresh / "ca" / "ca.key").read_bytes()
    with pytest.raises(ProvisionError, match="already holds"):
        provision(fresh, "hosp", ["x"])
    assert (fresh / "ca" / "ca.key").read_bytes() == ca_before
    assert (fresh / "kits" / "a").exists() and not (fresh / "kits" / "x").exists()
    provision(fresh, "hosp", ["x"], force=True)
    assert (fresh / "ca" / "ca.key").read_bytes() != ca_before
    assert sorted(p.name for p in (fresh / "kits").iterdir()) == ["coordinator", "x"]


def test_add_node_issues_a_kit_and_grants_it_rights(fresh: Path) -> None:
    """add-node: new kit signed by the SAME CA, ACL block, coordinator trusts its key and
    expects it; existing kits untouched."""
    ca_before = (fresh / "ca" / "ca.crt").read_bytes()
    a_before = (fresh / "kits" / "a" / KIT.cert).read_bytes()
    add_node(fresh, "d")
    ca = cert(fresh / "ca" / "ca.crt")
    assert (fresh / "ca" / "ca.crt").read_bytes() == ca_before
    assert (fresh / "kits" / "a" / KIT.cert).read_bytes() == a_before
    leaf = cert(fresh / "kits" / "d" / KIT.cert)
    PolicyBuilder().store(Store([ca])).build_client_verifier().verify(leaf, [])
    assert mode(fresh / "kits" / "d" / KIT.key) == 0o600
    acl = (fresh / "broker" / "acl").read_text()
    assert "user d\ntopic write fl/hosp/round/+/update/d/manifest" in acl
    coord = fresh / "kits" / "coordinator"
    assert (coord / KIT.nodes_dir / "d.pub").read_bytes() == (
        fresh / "kits" / "d" / KIT.signing_pub
    ).read_bytes()
    assert load_coordinator_config(coord / "coordinator.toml").rounds.expected_nodes == (
        "a",
        "b",
        "d",
    )
    assert load_state(fresh / "provision.json").nodes == ["a", "b", "d"]
    with pytest.raises(ProvisionError, match="already"):
        add_node(fresh, "d")
    with pytest.raises(ProvisionError):
        add_node(fresh, "coordinator")


def test_revoke_puts_the_cert_on_the_crl_and_removes_every_right(fresh: Path) -> None:
    """revoke b: its serial on a newer CA-signed CRL (broker and CA copies), no `user b` in the
    ACL, its key out of the coordinator's trusted keys and into revoked.json, its kit gone."""
    state = load_state(fresh / "provision.json")
    serial = int(state.participants["b"].cert_serial, 16)
    number_before = crl(fresh / "broker" / "crl.pem").extensions.get_extension_for_class(
        x509.CRLNumber
    )
    outcome = revoke_node(fresh, "b", reason="key_compromise")
    assert "reload" in outcome.render() and "SIGHUP" not in outcome.summary

    ca = cert(fresh / "ca" / "ca.crt")
    revocations = crl(fresh / "broker" / "crl.pem")
    assert revocations.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    entry = revocations.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    number = revocations.extensions.get_extension_for_class(x509.CRLNumber)
    assert number.value.crl_number == number_before.value.crl_number + 1
    assert (fresh / "ca" / "crl.pem").read_bytes() == (fresh / "broker" / "crl.pem").read_bytes()

    acl = (fresh / "broker" / "acl").read_text()
    assert "user b" not in acl and "/b" not in acl and "user a" in acl
    coord = fresh / "kits" / "coordinator"
    assert not (coord / KIT.nodes_dir / "b.pub").exists()
    assert (coord / KIT.nodes_dir / "a.pub").exists()
    revoked = json.loads((coord / KIT.revoked).read_text())["nodes"]
    assert list(revoked) == ["b"]
    assert revoked["b"]["signing_key_sha256"] == state.participants["b"].signing_key_sha256
    assert revoked["b"]["cert_serial"] == state.participants["b"].cert_serial
    assert not (fresh / "kits" / "b").exists()
    assert load_coordinator_config(coord / "coordinator.toml").rounds.expected_nodes == ("a",)

    with pytest.raises(ProvisionError, match="already revoked"):
        revoke_node(fresh, "b")
    with pytest.raises(ProvisionError, match="ids are not reused"):
        add_node(fresh, "b")
    with pytest.raises(ProvisionError, match="coordinator"):
        revoke_node(fresh, "coordinator")
    with pytest.raises(ProvisionError, match="not a node"):
        revoke_node(fresh, "zz")


def test_renew_crl_keeps_revocations_and_extends_validity(fresh: Path) -> None:
    revoke_node(fresh, "a")
    serial = int(load_state(fresh / "provision.json").revoked["a"].cert_serial, 16)
    renew_crl(fresh, days=7)
    revocations = crl(fresh / "broker" / "crl.pem")
    assert revocations.get_revoked_certificate_by_serial_number(serial) is not None
    assert revocations.next_update_utc is not None
    left = revocations.next_update_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=6) < left <= dt.timedelta(days=7)


# ------------------------------------------------------------------ CLI


def test_cli_provision_add_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented commands work end to end and print the operator's next steps."""
    out = tmp_path / "fed"
    argv = ["provision", "--federation", "f1", "--nodes", "a,b", "--out", str(out)]
    assert main([*argv, "--broker-host", "10.0.0.5", "--days", "10"]) == 0
    assert "next:" in capsys.readouterr().out
    san = cert(out / "broker" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert ipaddress.ip_address("10.0.0.5") in san.value.get_values_for_type(x509.IPAddress)
    assert main(["provision", "add-node", "--out", str(out), "--node", "c"]) == 0
    assert main(["provision", "revoke", "--out", str(out), "--node", "a"]) == 0
    assert "reload Mosquitto" in capsys.readouterr().out
    assert main(["provision", "crl", "--out", str(out)]) == 0
    assert load_state(out / "provision.json").nodes == ["b", "c"]


def test_cli_user_mistakes_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fed"
    assert main(["provision", "--federation", "f1", "--nodes", "a,a", "--out", str(out)]) == 11
    assert main(["provision", "--federation", "f1", "--nodes", "a", "--out", str(out)]) == 0
    assert main(["provision", "--federation", "f1", "--nodes", "a", "--out", str(out)]) == 11
    assert main(["provision", "add-node", "--out", str(tmp_path / "none"), "--node", "x"]) == 11
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fedscan: error: ") for line in err)
