"""Attacks on the node's local API (issue 14): DNS rebinding, CSRF, unbounded bodies and
fields, out-of-range ids. Each is sent to a real daemon over real HTTP and must be refused
with nothing stored; the node's own requests keep working."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_node.daemon import Daemon
from edge_node.serve.api_guard import split_host
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path
from tests.helpers.node_api import DICOM, api_client, start_daemon, upload_sample

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path, max_upload_mb=1)
    yield d
    d.shutdown(10)


@pytest.fixture
def client(node: Daemon) -> Iterator[httpx.Client]:
    with api_client(node) as c:
        yield c


def _port(node: Daemon) -> int:
    return int((node.config.paths.state_dir / "api.port").read_text())


def _count(node: Daemon, table: str) -> int:
    with sqlite3.connect(node.config.paths.database) as conn:
        known = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]) if known else 0


def _uploads(node: Daemon) -> list[Path]:
    folder = node.config.paths.state_dir / "uploads"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _label(uid: str, **extra: object) -> dict[str, object]:
    return {"sop_instance_uid": uid, "label": "covid", "who": "dr_a", **extra}


def test_host_header_parsing() -> None:
    """Host values split into (name, port); anything that is not host[:port] is None."""
    assert split_host("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert split_host("LocalHost.") == ("localhost", None)
    assert split_host("[::1]:80") == ("[::1]", 80)
    for bad in ("", "a b", "evil@127.0.0.1", "127.0.0.1:x", "[::1", "::1", "h/p", "h:123456"):
        assert split_host(bad) is None, bad


def test_unknown_host_gets_no_data(node: Daemon, client: httpx.Client, tmp_path: Path) -> None:
    """A DNS-rebinding page reaches the node under its own name (Host: attacker.example):
    refused with 400 and no UID or path in the answer; the node's own names still work."""
    uid, _ = upload_sample(client, tmp_path)
    port = _port(node)
    hosts = ("attacker.example", f"attacker.example:{port}", "127.0.0.1:1", f"a.nip.io:{port}")
    for host in hosts:
        for path in ("/api/predictions", "/", "/metrics", "/health", "/api/predictions/1"):
            r = client.get(path, headers={"Host": host})
            assert r.status_code == 400, (host, path)
            assert uid not in r.text and "up.dcm" not in r.text and "/tmp" not in r.text
        r = client.post("/api/labels", json=_label(uid), headers={"Host": host})
        assert r.status_code == 400
    assert _count(node, "labels") == 0
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert client.get("/api/predictions", headers={"Host": host}).status_code == 200


def test_configured_extra_host_is_accepted(tmp_path: Path) -> None:
    """api.allowed_hosts adds names (a workstation's DNS name); others stay refused."""
    d = start_daemon(tmp_path, allowed_hosts=["ws12.hospital.lan"])
    try:
        port = _port(d)
        with api_client(d) as c:
            ok = c.get("/api/predictions", headers={"Host": f"ws12.hospital.lan:{port}"})
            assert ok.status_code == 200
            no = c.get("/api/predictions", headers={"Host": f"ws13.hospital.lan:{port}"})
            assert no.status_code == 400
    finally:
        d.shutdown(10)


def test_foreign_origin_cannot_write(node: Daemon, client: httpx.Client, tmp_path: Path) -> None:
    """CSRF: a page on another origin POSTs a label and a DICOM file; each is refused with 403
    and nothing is stored (no label, no upload file, no prediction). The node's own page
    origin is accepted."""
    uid, _ = upload_sample(client, tmp_path)
    port = _port(node)
    other = tmp_path / "other.dcm"
    copy_with_new_uid(sample_path("693_UNCR.dcm"), other)
    foreign = [
        {"Origin": "http://evil.example"},
        {"Origin": f"http://evil.example:{port}"},
        {"Origin": f"http://127.0.0.1:{port + 1}"},
        {"Origin": f"https://127.0.0.1:{port}"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ]
    for headers in foreign:
        r = client.post("/api/labels", json=_label(uid), headers=headers)
        assert r.status_code == 403, headers
        r = client.post("/api/predict", content=other.read_bytes(), headers={**DICOM, **headers})
        assert r.status_code == 403, headers
    assert _count(node, "labels") == 0 and _count(node, "predictions") == 1
    assert len(_uploads(node)) == 1  # the first, legitimate upload only
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/labels", json=_label(uid), headers=own).status_code == 200
    assert _count(node, "labels") == 1


def test_other_sites_cannot_read_or_embed(
    node: Daemon, client: httpx.Client, tmp_path: Path
) -> None:
    """A page elsewhere cannot read the API with CORS (foreign Origin) or embed a thumbnail
    (<img>: Sec-Fetch-Site same-site/cross-site, mode no-cors), which would tell it which ids
    exist: 403 without data. A link to the node's page (a top-level navigation) still opens."""
    uid, body = upload_sample(client, tmp_path)
    port = _port(node)
    thumb = f"/api/thumbnails/{body['predictions'][0]['id']}.png"
    embeds = [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"},
    ]
    for headers in embeds:
        for path in (thumb, "/api/predictions", "/metrics"):
            r = client.get(path, headers=headers)
            assert r.status_code == 403, (path, headers)
            assert uid not in r.text and r.headers["content-type"] == "application/json"
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert client.get("/slices", headers=link).status_code == 200
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert client.get(thumb, headers={**own, "Sec-Fetch-Mode": "no-cors"}).status_code == 200


def test_writes_need_their_media_type(node: Daemon, client: httpx.Client, tmp_path: Path) -> None:
    """Bodies an HTML form or a simple cross-origin fetch can send (text/plain, urlencoded,
    multipart, none) are 415 on both write routes; nothing is stored."""
    uid, _ = upload_sample(client, tmp_path)
    other = tmp_path / "other.dcm"
    copy_with_new_uid(sample_path("693_UNCR.dcm"), other)
    for ctype in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ):
        headers = {"Content-Type": ctype} if ctype else {}
        r = client.post("/api/labels", content=json.dumps(_label(uid)), headers=headers)
        assert r.status_code == 415, ctype
        r = client.post("/api/predict", content=other.read_bytes(), headers=headers)
        assert r.status_code == 415, ctype
    r = client.post("/api/predict", content=other.read_bytes(), headers=JSON)
    assert r.status_code == 415  # the upload is application/dicom, not JSON
    assert _count(node, "labels") == 0 and _count(node, "predictions") == 1
    assert len(_uploads(node)) == 1
    typed = {"Content-Type": "application/json; charset=utf-8"}
    r = client.post("/api/labels", content=json.dumps(_label(uid)), headers=typed)
    assert r.status_code == 200


def test_bodies_are_bounded(node: Daemon, client: httpx.Client, tmp_path: Path) -> None:
    """An upload over api.max_upload_mb (1 MiB here) is 413 whether it says its length or
    streams without one (chunked), leaves no file in uploads/ and no prediction; a JSON body
    over 64 KiB is 413. A normal upload still works afterwards."""
    big = b"\0" * (2 << 20)
    r = client.post("/api/predict", content=big, headers=DICOM)
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(32):
            yield b"\0" * (64 << 10)

    r = client.post("/api/predict", content=chunks(), headers=DICOM)
    assert r.status_code == 413
    assert _uploads(node) == [] and _count(node, "predictions") == 0
    r = client.post("/api/labels", content=b" " * (65 << 10), headers=JSON)
    assert r.status_code == 413
    _uid, body = upload_sample(client, tmp_path)
    assert body["outcome"] == "predicted" and len(_uploads(node)) == 1
    mode = _uploads(node)[0].stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


def test_label_fields_are_bounded(node: Daemon, client: httpx.Client, tmp_path: Path) -> None:
    """Deep JSON, a 1 MB or non-string `who`, control characters, an over-long UID or label:
    each is a 4xx (never a 500) and writes no label row and no history row."""
    uid, _ = upload_sample(client, tmp_path)
    deep = b"[" * 30_000 + b"]" * 30_000  # under 64 KiB, deeper than Python's recursion limit
    assert client.post("/api/labels", content=deep, headers=JSON).status_code == 400
    deeper = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/api/labels", content=deeper, headers=JSON).status_code == 413
    shallow = b"[" * 2000 + b"]" * 2000  # past the recursion limit on any JSON route
    r = client.post("/api/series/1.2.3/label", content=shallow, headers=JSON)
    assert r.status_code == 400
    bad = [
        _label(uid, who="x" * 65),
        _label(uid, who={"a": 1}),
        _label(uid, who=["dr_a"]),
        _label(uid, who=7),
        _label(uid, who="dr_a\nINFO forged log line"),
        _label(uid, label="covid" * 10),
        _label(uid, label=["covid"]),
        {**_label(uid), "sop_instance_uid": "1." * 100},
        {**_label(uid), "sop_instance_uid": 1.2},
        [_label(uid)],
    ]
    for doc in bad:
        r = client.post("/api/labels", json=doc)
        assert r.status_code == 400, (doc, r.text)
    huge = _label(uid, who="x" * (1 << 20))
    assert client.post("/api/labels", json=huge).status_code == 413
    assert _count(node, "labels") == 0 and _count(node, "label_history") == 0
    assert client.post("/api/labels", json=_label(uid, who="Dr. Müller")).status_code == 200


def test_out_of_range_ids_and_limits(client: httpx.Client, tmp_path: Path) -> None:
    """An id of 10^23 (past SQLite's INTEGER) is 404, not 500; ?limit= outside 1..1000 is 400."""
    upload_sample(client, tmp_path)
    for path in (f"/api/predictions/{10**23}", f"/api/thumbnails/{10**23}.png"):
        assert client.get(path).status_code == 404
    for limit in (str(10**23), "0", "-1", "1001"):
        assert client.get("/api/predictions", params={"limit": limit}).status_code == 400
    assert len(client.get("/api/predictions", params={"limit": 1000}).json()["predictions"]) == 1
