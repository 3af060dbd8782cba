"""DICOM over TLS: the node's sender delivers to the node's listener with mutual TLS (both
sides of the code, real certificates from the provisioning CA); a peer without a client
certificate or without TLS gets nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_node.config import DicomListenerConfig, DicomSendConfig
from edge_node.dicomnet.listener import Listener
from edge_node.dicomnet.outbox import Outbox
from edge_node.dicomnet.sender import Sender
from edge_node.serve.stats import DicomStats
from fedscan.provision.ca import CertificateAuthority, cert_pem, key_pem
from tests.helpers.dicom_factory import write_secondary_capture


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = CertificateAuthority.create("dicomtest", days=1)
    server = ca.issue_server(["127.0.0.1", "localhost"], days=1)
    client = ca.issue_client("node1", "node", days=1)
    files = {
        "ca": cert_pem(ca.cert),
        "server_cert": cert_pem(server.cert),
        "server_key": key_pem(server.key),
        "client_cert": cert_pem(client.cert),
        "client_key": key_pem(client.key),
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.pem"
        out[name].write_bytes(data)
    return out


@pytest.fixture
def tls_listener(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Listener]:
    cfg = DicomListenerConfig(
        enabled=True,
        ae_title="PACS",
        port=0,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_ca=pki["ca"],
    )
    scp = Listener(cfg, tmp_path / "inbox", DicomStats())
    scp.start()
    yield scp
    scp.stop()


def _queue_one(tmp_path: Path, name: str) -> tuple[Outbox, str]:
    box = Outbox(tmp_path / name)
    pixels = np.zeros((16, 16), dtype=np.uint8)
    ds = pydicom.dcmread(write_secondary_capture(tmp_path / f"{name}.dcm", pixels))
    box.enqueue(ds)
    return box, str(ds.SOPInstanceUID)


def test_mutual_tls_delivery(tls_listener: Listener, tmp_path: Path, pki: dict[str, Path]) -> None:
    """Sender with the CA and a client certificate -> TLS listener: the object is stored."""
    box, uid = _queue_one(tmp_path, "outbox")
    pacs = DicomSendConfig(
        enabled=True,
        port=tls_listener.port or 0,
        timeout_s=5,
        tls_ca=pki["ca"],
        tls_cert=pki["client_cert"],
        tls_key=pki["client_key"],
    )
    assert Sender(box, DicomStats(), pacs=pacs).run_once() == 1
    (f,) = (tmp_path / "inbox").rglob("*.dcm")
    assert str(pydicom.dcmread(f).SOPInstanceUID) == uid


def test_no_client_certificate_or_no_tls_stores_nothing(
    tls_listener: Listener, tmp_path: Path, pki: dict[str, Path]
) -> None:
    """A TLS client without a certificate, and a plain-TCP client, are both turned away; their
    objects stay pending for a retry."""
    port = tls_listener.port or 0
    no_cert = DicomSendConfig(enabled=True, port=port, timeout_s=3, tls_ca=pki["ca"])
    plain = DicomSendConfig(enabled=True, port=port, timeout_s=3)
    for name, cfg in (("a", no_cert), ("b", plain)):
        box, _ = _queue_one(tmp_path, name)
        assert Sender(box, DicomStats(), pacs=cfg).run_once() == 0
        assert len(box.pending()) == 1
    assert not list((tmp_path / "inbox").rglob("*.dcm"))
