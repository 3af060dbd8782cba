"""The production broker config, as `fedscan provision` renders it, on a real Mosquitto.

One federation (coordinator + nodes a, b, c) is provisioned and one broker started per module;
the revocation test provisions its own federation because it rewrites the CRL and ACL and
reloads the broker. The only change to the rendered config is the listener line (a free
loopback port instead of 8883), and ``user root`` when the tests run as root: Mosquitto drops
to the ``mosquitto`` user before reading keys, and pytest's tmp folders are private.

Denied publishes are silent for MQTT 3.1.1 (the broker still sends PUBACK), so "not
delivered" is asserted with a sentinel: the forged messages are published first, then an
allowed one by the same client on the same connection; once the coordinator (subscribed to
everything) has the sentinel, anything before it that was delivered would already be there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedscan.brokers.mosquitto import Mosquitto
from fedscan.provision import BROKER, provision, revoke_node
from tests.integration.tls_broker import start_broker
from tests.integration.tls_peers import WAIT, Peer, connect, is_accepted, tls_context

pytestmark = pytest.mark.integration

F = "F"


@dataclass
class Federation:
    prov: Path
    broker: Mosquitto

    @property
    def ca(self) -> Path:
        return self.prov / "broker" / BROKER.ca

    def kit(self, who: str) -> Path:
        return self.prov / "kits" / who

    def connect(self, who: str, **kw: object) -> Peer:
        peer = connect(self.broker.port, tls_context(self.ca, self.kit(who)), **kw)  # type: ignore[arg-type]
        assert is_accepted(peer), (
            f"{who} refused: {peer.error or peer.connack} {self.broker.log()[-800:]}"
        )
        return peer


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("fed")
    provision(root / "prov", F, ["a", "b", "c"], broker_host="broker.example.org")
    broker = start_broker(root / "prov", root / "broker")
    try:
        yield Federation(root / "prov", broker)
    finally:
        broker.stop()


@pytest.fixture
def coordinator(fed: Federation) -> Iterator[Peer]:
    peer = fed.connect("coordinator")
    peer.subscribe(f"fl/{F}/#")
    yield peer
    peer.close()


# ------------------------------------------------------------------ who may connect


def test_client_without_certificate_is_refused(fed: Federation) -> None:
    """A TLS client that trusts the broker but shows no certificate gets no MQTT session."""
    peer = connect(fed.broker.port, tls_context(fed.ca, None))
    assert not is_accepted(peer)
    assert "peer did not return a certificate" in fed.broker.log()


def test_plain_mqtt_on_the_tls_port_is_refused(fed: Federation) -> None:
    """An anonymous client speaking plain MQTT (no TLS) to the listener gets no CONNACK."""
    peer = connect(fed.broker.port, None, username="coordinator")
    assert not is_accepted(peer)
    assert peer.connack is None


def test_certificate_from_another_ca_is_refused(fed: Federation, tmp_path: Path) -> None:
    """A valid-looking kit from another federation's CA (same node id) is refused by the
    broker, although the client itself trusts the real broker."""
    provision(tmp_path / "other", F, ["a"])
    ctx = tls_context(fed.ca, tmp_path / "other" / "kits" / "a")
    peer = connect(fed.broker.port, ctx)
    assert not is_accepted(peer)
    assert "certificate verify failed" in fed.broker.log()


def test_broker_certificate_names_the_broker_host(fed: Federation) -> None:
    """Clients verify the broker's name: the provisioned host and localhost match its
    certificate, another name does not."""
    for host in ("broker.example.org", "localhost"):
        ctx = tls_context(fed.ca, fed.kit("c"))
        with (
            socket.create_connection(("127.0.0.1", fed.broker.port)) as sock,
            ctx.wrap_socket(sock, server_hostname=host) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    ctx = tls_context(fed.ca, fed.kit("c"))
    with (
        socket.create_connection(("127.0.0.1", fed.broker.port)) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(sock, server_hostname="evil.example.org")


def test_tls12_clients_get_a_forward_secret_aead_suite(fed: Federation) -> None:
    """A client limited to TLS 1.2 still connects (the minimum), with an ECDHE-ECDSA AEAD
    suite from the config's cipher list."""
    ctx = tls_context(fed.ca, fed.kit("c"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", fed.broker.port)) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        assert tls.version() == "TLSv1.2" and cipher is not None
        assert re.fullmatch(
            r"ECDHE-ECDSA-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)", cipher[0]
        )


# ------------------------------------------------------------------ who may publish where


def test_node_cannot_publish_as_another_node_or_as_coordinator(
    fed: Federation, coordinator: Peer
) -> None:
    """Node a's publishes to b's update, metrics and status topics, to the global model and
    to the acks are dropped by the broker; its own update (the sentinel) arrives."""
    a = fed.connect("a")
    forged = [
        f"fl/{F}/round/1/update/b/manifest",
        f"fl/{F}/round/1/update/b/chunk/0",
        f"fl/{F}/round/1/metrics/b",
        f"fl/{F}/node/b/status",
        f"fl/{F}/global/current",
        f"fl/{F}/global/7/chunk/0",
        f"fl/{F}/round/1/ack/a",
        f"fl/{F}/coordinator/status",
        "fl/other/round/1/update/a/manifest",
    ]
    for topic in forged:
        info = a.publish(topic, b"forged")
        assert info.is_published()  # MQTT 3.1.1: PUBACK as if accepted; the drop is silent
    sentinel = f"fl/{F}/round/1/update/a/manifest"
    a.publish(sentinel, b"own")
    assert coordinator.wait_topic(sentinel)
    assert not set(forged) & set(coordinator.topics())
    a.close()


def test_username_in_connect_does_not_grant_rights(fed: Federation, coordinator: Peer) -> None:
    """Node a connecting with username and client id 'coordinator' is still 'a' (identity comes
    from the certificate): over MQTT 5 its global publish is answered 'Not authorized', and the
    real coordinator is neither kicked off nor sees the message."""
    results: list[str] = []
    a = fed.connect("a", client_id="coordinator", username="coordinator", protocol=mqtt.MQTTv5)
    a.client.on_publish = lambda _c, _u, _mid, rc, _p: results.append(str(rc))
    a.publish(f"fl/{F}/global/current", b"forged")
    assert a.wait_for(lambda: bool(results))
    assert results == ["Not authorized"]
    sentinel = f"fl/{F}/node/a/status"
    a.publish(sentinel, b"online")
    assert coordinator.wait_topic(sentinel)
    assert f"fl/{F}/global/current" not in coordinator.topics()
    assert coordinator.client.is_connected() and not coordinator.disconnects
    a.close()


def test_node_publishes_its_own_topics(fed: Federation, coordinator: Peer) -> None:
    """Everything node b is meant to publish reaches the coordinator."""
    b = fed.connect("b")
    own = [
        f"fl/{F}/round/3/update/b/manifest",
        f"fl/{F}/round/3/update/b/chunk/0",
        f"fl/{F}/round/3/metrics/b",
        f"fl/{F}/node/b/status",
    ]
    for topic in own:
        b.publish(topic, b"ok")
    assert coordinator.wait_for(lambda: set(own) <= set(t for t, _ in coordinator.messages))
    b.close()


def test_node_cannot_store_retained_messages_beside_its_status(
    fed: Federation, coordinator: Peer
) -> None:
    """Issue 14: node a used to store any number of 1 MiB retained messages under
    fl/F/node/a/#. The ACL now grants only fl/F/node/a/status (and the exact update topics):
    retained junk under other subtopics is dropped, nobody connecting later receives it, and
    a's retained status still goes through."""
    a = fed.connect("a")
    junk = [f"fl/{F}/node/a/junk/{i}" for i in range(20)]
    junk += [f"fl/{F}/node/a/status/extra", f"fl/{F}/round/1/update/a/other/0"]
    for topic in junk:
        a.publish(topic, b"j" * 1024 * 1024, retain=True)
    sentinel = f"fl/{F}/node/a/status"
    a.publish(sentinel, b"online", retain=True)
    assert coordinator.wait_topic(sentinel)
    assert not set(junk) & set(coordinator.topics())
    late = fed.connect("coordinator")  # replaces the fixture's connection: fine at the end
    late.subscribe(f"fl/{F}/node/#")
    late.subscribe(f"fl/{F}/round/#")
    assert late.wait_topic(sentinel)  # the retained status is served ...
    time.sleep(0.5)
    assert not set(junk) & set(late.topics())  # ... and nothing else was stored
    late.close()
    a.publish(sentinel, b"", retain=True)  # clear it: later tests use it as a sentinel
    a.close()


def test_node_reads_global_and_only_its_own_acks(fed: Federation, coordinator: Peer) -> None:
    """Node a may subscribe to broad filters, but the broker delivers only what a may read:
    the global model and its own acks, not b's acks nor b's updates."""
    a = fed.connect("a")
    for topic in (f"fl/{F}/round/+/ack/+", f"fl/{F}/round/+/update/#", f"fl/{F}/global/#"):
        a.subscribe(topic)
    b = fed.connect("b")
    b.publish(f"fl/{F}/round/5/update/b/manifest", b"b-update")
    b.close()
    coordinator.publish(f"fl/{F}/round/5/ack/b", b"ack-b")
    coordinator.publish(f"fl/{F}/round/5/ack/a", b"ack-a")
    coordinator.publish(f"fl/{F}/global/current", b"v5", retain=True)
    assert a.wait_for(lambda: (f"fl/{F}/global/current", b"v5") in a.messages)
    assert f"fl/{F}/round/5/ack/a" in a.topics()
    assert f"fl/{F}/round/5/ack/b" not in a.topics()
    assert f"fl/{F}/round/5/update/b/manifest" not in a.topics()
    a.close()


def test_coordinator_publishes_retained_global_model(fed: Federation, coordinator: Peer) -> None:
    """The coordinator's retained global manifest and chunk reach a node that connects later."""
    coordinator.publish(f"fl/{F}/global/9/chunk/0", b"chunk", retain=True)
    coordinator.publish(f"fl/{F}/global/current", b"manifest-v9", retain=True)
    c = fed.connect("c")
    c.subscribe(f"fl/{F}/global/#")
    want = {(f"fl/{F}/global/current", b"manifest-v9"), (f"fl/{F}/global/9/chunk/0", b"chunk")}
    assert c.wait_for(lambda: want <= set(c.messages))  # retained: any order
    c.close()


def test_oversized_packet_drops_only_its_sender(fed: Federation, coordinator: Peer) -> None:
    """A 3 MiB publish (> max_packet_size 2 MiB) disconnects node c; the coordinator stays
    connected and keeps receiving from node a."""
    c = fed.connect("c")
    c.client.publish(f"fl/{F}/round/1/update/c/chunk/0", b"x" * (3 * 1024 * 1024), qos=1)
    assert c.wait_for(lambda: bool(c.disconnects), timeout=3 * WAIT)
    assert "oversize packet" in fed.broker.log()
    a = fed.connect("a")
    a.publish(f"fl/{F}/node/a/status", b"after-oversize")
    assert coordinator.wait_for(
        lambda: (f"fl/{F}/node/a/status", b"after-oversize") in coordinator.messages
    )
    assert coordinator.client.is_connected() and not coordinator.disconnects
    assert f"fl/{F}/round/1/update/c/chunk/0" not in coordinator.topics()
    c.client.loop_stop()
    a.close()


def test_second_connection_with_same_certificate_replaces_the_first(fed: Federation) -> None:
    """use_username_as_clientid: the client id is the certificate's CN, whatever the client
    sends, so a second connection of node c takes over the first (one connection per
    participant), and can never take over another participant's session."""
    first = fed.connect("c", client_id="first")
    second = fed.connect("c", client_id="second")
    assert first.wait_for(lambda: bool(first.disconnects))
    assert second.client.is_connected()
    second.close()
    first.client.loop_stop()


# ------------------------------------------------------------------ revocation


def test_revoked_node_is_refused_after_broker_reload(tmp_path: Path) -> None:
    """After `provision revoke b` nothing changes at the broker until it reloads; after SIGHUP
    a new connection with b's (leaked) kit is refused by the CRL, and the connection b still
    holds has lost every right through the reloaded ACL."""
    prov = tmp_path / "prov"
    provision(prov, F, ["a", "b"])
    leaked = tmp_path / "leaked-b"
    shutil.copytree(prov / "kits" / "b", leaked)  # revoke deletes kits/b; a thief keeps a copy
    broker = start_broker(prov, tmp_path / "broker")
    fed = Federation(prov, broker)
    try:
        coordinator = fed.connect("coordinator")
        coordinator.subscribe(f"fl/{F}/#")
        revoke_node(prov, "b")
        live_b = connect(broker.port, tls_context(fed.ca, leaked))
        assert is_accepted(live_b)  # the files changed, the broker has not reloaded them yet
        live_b.subscribe(f"fl/{F}/global/#")

        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while "Reloading config" not in broker.log():
            assert time.monotonic() < deadline, broker.log()[-1500:]
            time.sleep(0.05)
        # one round trip: the broker's single loop has finished the reload iteration
        coordinator.publish(f"fl/{F}/round/9/ack/a", b"ping")
        assert coordinator.wait_topic(f"fl/{F}/round/9/ack/a")

        refused = connect(broker.port, tls_context(fed.ca, leaked), client_id="again")
        assert not is_accepted(refused)
        assert "certificate verify failed" in broker.log()

        # the connection that stayed open: still up, but its publishes and reads are denied
        assert live_b.client.is_connected()
        live_b.publish(f"fl/{F}/round/2/update/b/manifest", b"after-revoke")
        coordinator.publish(f"fl/{F}/global/current", b"v2", retain=True)
        a = fed.connect("a")
        a.publish(f"fl/{F}/round/2/update/a/manifest", b"a-still-fine")
        assert coordinator.wait_topic(f"fl/{F}/round/2/update/a/manifest")
        assert f"fl/{F}/round/2/update/b/manifest" not in coordinator.topics()
        a.subscribe(f"fl/{F}/global/#")
        assert a.wait_topic(f"fl/{F}/global/current")
        assert not live_b.messages
        for peer in (a, live_b, coordinator):
            peer.close()
    finally:
        broker.stop()


def test_rendered_config_keeps_the_security_options(fed: Federation) -> None:
    """The config the broker above ran with is the provisioned one, security options intact."""
    conf = (fed.prov / "broker" / BROKER.conf).read_text()
    for line in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "max_packet_size 2097152",
        "persistence true",
    ):
        assert re.search(rf"^{re.escape(line)}$", conf, re.MULTILINE), line
    assert (fed.prov / "broker" / BROKER.data).is_dir()
