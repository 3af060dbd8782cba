"""Retention of uploads, thumbnails and quarantine copies ([retention], issue 10): old files
go, recent ones stay, 0 keeps forever, and the running daemon sweeps by itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_node.cli.daemon import init_node
from edge_node.config import RetentionConfig, load_config
from edge_node.daemon import Daemon
from edge_node.errors import ConfigError
from edge_node.retention import DAY_S, sweep
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import eventually


def _file(path: Path, age_days: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"patient data")
    t = now - age_days * DAY_S
    os.utime(path, (t, t))
    return path


def test_sweep_removes_only_what_is_past_its_period(tmp_path: Path) -> None:
    """Defaults (7 / 7 / 30 days): an 8-day upload and thumbnail and a 31-day quarantine copy
    (with its reason file) go; younger files, the inbox and the database stay."""
    toml = init_node(tmp_path / "node")
    cfg = load_config(toml)
    now = time.time()
    state, quarantine = cfg.paths.state_dir, cfg.paths.quarantine_dir
    old = [
        _file(state / "uploads" / "old.dcm", 8, now),
        _file(state / "thumbnails" / "1.png", 8, now),
        _file(quarantine / "bad.dcm", 31, now),
        _file(quarantine / "bad.dcm.reason.json", 31, now),
        _file(quarantine / "orphan.dcm.reason.json", 31, now),  # copy never written
    ]
    young = [
        _file(state / "uploads" / "new.dcm", 6, now),
        _file(state / "thumbnails" / "2.png", 1, now),
        _file(quarantine / "recent.dcm", 29, now),
        _file(quarantine / "recent.dcm.reason.json", 29, now),
        _file(cfg.paths.inbox / "ancient.dcm", 400, now),
        _file(state / "node.sqlite", 400, now),
    ]
    assert sweep(cfg, now) == {"uploads": 1, "thumbnails": 1, "quarantine": 1}
    assert [p for p in old if p.exists()] == []
    assert all(p.exists() for p in young)
    assert sweep(cfg, now) == {"uploads": 0, "thumbnails": 0, "quarantine": 0}


def test_zero_days_keeps_forever_and_bad_values_are_refused(tmp_path: Path) -> None:
    """uploads_days = 0 keeps every upload; negative or non-finite periods are config errors."""
    toml = init_node(tmp_path / "node")
    toml.write_text(toml.read_text() + "\n[retention]\nuploads_days = 0\n")
    cfg = load_config(toml)
    now = time.time()
    kept = _file(cfg.paths.state_dir / "uploads" / "old.dcm", 3650, now)
    assert sweep(cfg, now)["uploads"] == 0 and kept.exists()
    for bad in ({"uploads_days": -1}, {"quarantine_days": float("inf")}, {"sweep_interval_s": 0}):
        with pytest.raises(ConfigError):
            RetentionConfig(**bad)  # type: ignore[arg-type]


def test_running_daemon_sweeps_by_itself(tmp_path: Path) -> None:
    """A daemon sweeps at start (an 8-day upload left by an earlier run goes) and then every
    sweep_interval_s (one made while it runs goes too), without any request."""
    toml = init_node(tmp_path / "node")
    make_classifier(tmp_path / "node" / "models" / "current.onnx", version="5")
    toml.write_text(toml.read_text() + "\n[retention]\nsweep_interval_s = 0.2\n")
    uploads = tmp_path / "node" / "state" / "uploads"
    left = _file(uploads / "left.dcm", 8, time.time())
    fresh = _file(uploads / "fresh.dcm", 0, time.time())
    d = _daemon_again(toml)
    try:
        assert eventually(lambda: not left.exists()), "no sweep at start"
        later = _file(uploads / "later.dcm", 8, time.time())
        assert eventually(lambda: not later.exists()), "the periodic sweep did not run"
        assert fresh.exists() and d.retention.sweeps >= 2
    finally:
        d.shutdown(10)


def _daemon_again(toml: Path) -> Daemon:
    cfg = load_config(toml, {"api": {"port": 0}, "inference": {"intra_op_threads": 1}})
    d = Daemon(cfg)
    d.start()
    return d
