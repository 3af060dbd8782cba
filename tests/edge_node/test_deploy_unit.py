"""deploy/fedscan-node.service: the systemd unit the README tells operators to install."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "fedscan-node.service"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_runs_the_daemon_as_its_own_user_restarting_on_failure() -> None:
    u = _unit()
    svc = u["Service"]
    assert svc["User"] == "fedscan" and svc["Group"] == "fedscan"
    assert "fedscan node run --config" in svc["ExecStart"]
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert u["Install"]["WantedBy"] == "multi-user.target"
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert key in svc
    assert svc["ReadOnlyPaths"]  # the inbox is read-only to the node


def test_systemd_accepts_the_unit() -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    out = subprocess.run([exe, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "is not executable" not in line  # /opt/fedscan not installed here
    ]
    assert problems == []
