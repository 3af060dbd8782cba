"""A daemon with its HTTP API for tests: started on a temporary node, a client bound to it, an
upload of a real CT slice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from edge_node.cli.daemon import init_node
from edge_node.config import load_config
from edge_node.daemon import Daemon
from tests.helpers.dicom_factory import copy_with_new_uid, sample_path
from tests.helpers.onnx_models import make_classifier

DICOM = {"Content-Type": "application/dicom"}  # the upload's media type (api_guard)


def start_daemon(tmp: Path, **api: Any) -> Daemon:
    """A started daemon on a fresh node under ``tmp`` serving a version-5 classifier."""
    toml = init_node(tmp / "node")
    make_classifier(tmp / "node" / "models" / "current.onnx", version="5")
    # chest_only off: these tests use the real head CT slice 693_UNCR as "a CT slice"
    overrides = {"inference": {"intra_op_threads": 1}, "series": {"chest_only": False}}
    cfg = load_config(toml, {"api": {"port": 0, **api}, **overrides})
    d = Daemon(cfg)
    d.start()
    return d


def api_client(d: Daemon, **kw: Any) -> httpx.Client:
    port = int(d.config.paths.state.api_port.read_text())
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, **kw)


def upload_sample(client: httpx.Client, tmp: Path) -> tuple[str, dict[str, Any]]:
    """POST a fresh copy of the real CT slice to /api/predict: (its SOP UID, the answer)."""
    f = tmp / "up.dcm"
    uid = copy_with_new_uid(sample_path("693_UNCR.dcm"), f)
    r = client.post("/api/predict", content=f.read_bytes(), headers=DICOM)
    assert r.status_code == 200, r.text
    return uid, r.json()
