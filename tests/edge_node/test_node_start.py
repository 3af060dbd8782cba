"""Starting a node: one node per state dir, an inbox that must exist, a refused model set aside.

Real daemons in-process (watcher, onnxruntime, SQLite, uvicorn) and a real second
`fedscan node run` subprocess against the same state directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edge_node.cli.daemon import init_node
from edge_node.config import NodeConfig, load_config
from edge_node.daemon import Daemon
from edge_node.errors import ConfigError
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, *, api: bool = False, inbox: str | None = None) -> NodeConfig:
    toml = init_node(tmp_path / "node")
    text = toml.read_text().replace("intra_op_threads = 2", "intra_op_threads = 1")
    text = text.replace("port = 8765", "port = 0" if api else "port = 0\nenabled = false")
    if inbox is not None:
        text = text.replace('inbox = "inbox"', f'inbox = "{inbox}"')
    toml.write_text(text)
    return load_config(toml)


def _cli_run(cfg: NodeConfig) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedscan.cli", "node", "run", "--config", str(cfg.source)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_second_node_on_the_same_state_dir_exits_2_naming_the_first(tmp_path: Path) -> None:
    """A node holds the state dir; a second `fedscan node run` on it exits 2 with one line
    naming the holder's pid and leaves api.port alone; once the first stops, it starts."""
    cfg = _config(tmp_path)
    port_file = cfg.paths.state_dir / "api.port"
    port_file.write_text("4242\n")
    first = Daemon(cfg)
    try:
        done = _cli_run(cfg)
        assert done.returncode == 2, done.stderr
        assert f"in use by pid {os.getpid()}" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert port_file.read_text() == "4242\n"
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            Daemon(cfg)
    finally:
        first.shutdown(5)
    again = Daemon(cfg)  # the lock went with the first node
    again.shutdown(5)


def test_a_missing_inbox_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    """`[paths] inbox` naming a folder that does not exist: exit 2 with a line that says so;
    the node creates nothing there (it never writes to its inbox)."""
    missing = tmp_path / "srv" / "dicom-inbox-missing"
    cfg = _config(tmp_path, inbox=str(missing))
    with pytest.raises(ConfigError, match="does not exist"):
        Daemon(cfg)
    done = _cli_run(cfg)
    assert done.returncode == 2 and "inbox" in done.stderr and "does not exist" in done.stderr
    assert not missing.exists() and not missing.parent.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        Daemon(_config(tmp_path / "2", inbox=str(a_file)))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_refused_model_file_is_moved_aside_and_shown(tmp_path: Path) -> None:
    """current.onnx is overwritten with a broken file: the node keeps serving version 1, the
    broken file goes to models/refused/ with a reason, current.onnx holds version 1 again,
    /health and /metrics show the refusal, and the next start serves version 1 (no exit 3)."""
    cfg = _config(tmp_path, api=True)
    current = make_classifier(cfg.model_path, version="1")
    v1 = _sha(current)
    node = Daemon(cfg)
    node.start()
    try:
        port = int((cfg.paths.state_dir / "api.port").read_text())
        refused_dir = cfg.paths.model_dir / "refused"
        current.write_bytes(b"half a model")
        wait_for(lambda: refused_dir.is_dir() and any(refused_dir.glob("*.onnx")))
        (moved,) = refused_dir.glob("*.onnx")
        assert moved.read_bytes() == b"half a model"
        reason = moved.with_name(moved.name.removesuffix(".onnx") + ".reason.json")
        assert "cannot load model" in reason.read_text()
        wait_for(lambda: current.is_file() and _sha(current) == v1)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["status"] == "ok" and health["model_version"] == "1"
        refusal = health["model_refused"]
        assert refusal["file"] == f"refused/{moved.name}" and refusal["restored"] is True
        assert refusal["count"] == 1 and "cannot load model" in refusal["reason"]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "fedscan_model_refused_total 1" in metrics
    finally:
        node.shutdown(10)
    again = Daemon(cfg)
    again.start()  # raised ModelError (exit 3) while the broken file stayed in place
    try:
        model = again.holder.current()
        assert model is not None and model.info.model_version == "1"
    finally:
        again.shutdown(10)


def test_an_inbox_that_vanishes_while_running_is_shown_and_nothing_is_redone(
    tmp_path: Path,
) -> None:
    """The inbox share is unmounted under a running node: /health says inbox_missing; when it
    is back, the file handled before is not handled again."""
    from tests.helpers.dicom_factory import copy_with_new_uid, sample_path

    cfg = _config(tmp_path, api=True)
    make_classifier(cfg.model_path, version="1")
    inbox = cfg.paths.inbox
    slice_path = inbox / "ct.dcm"
    copy_with_new_uid(sample_path("693_UNCR.dcm"), slice_path)
    node = Daemon(cfg)
    node.start()
    try:
        port = int((cfg.paths.state_dir / "api.port").read_text())

        def row() -> dict | None:
            return node.store.file(str(slice_path.resolve()))

        wait_for(lambda: row() is not None)
        first = row()
        aside = tmp_path / "unmounted"
        os.rename(inbox, aside)
        node.watcher.scan()
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["status"] == "inbox_missing"
        os.rename(aside, inbox)
        node.watcher.scan()
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["status"] == "ok"
        time.sleep(2.5)  # > quiet period: a forgotten file would have been handled again
        assert row() == first  # not handed over again after the blip
    finally:
        node.shutdown(10)
