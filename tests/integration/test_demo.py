"""`fedscan demo`, reduced (2 hospitals, 1 round, a few dozen synthetic slices): the broker,
the coordinator and the nodes run as real processes over MQTT, the table is printed, the report
is written, headless Chromium renders it, and no process of the demo is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
DEMO_TIMEOUT_S = 540


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (our children had --config there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(cmd)
    return found


def _screenshot(html: Path, shot: Path, tmp: Path) -> np.ndarray:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}",
        f"--screenshot={shot}", "--window-size=1200,1600", html.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float32)


def test_reduced_demo_runs_to_the_table_and_report(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    cmd = [
        sys.executable, "-m", "fedscan.cli", "demo", "--out", str(out), "--nodes", "2",
        "--rounds", "1", "--local-epochs", "1", "--labelled-per-node", "16", "--test-per-node", "6",
        "--feed-seconds", "4", "--min-labels", "8", "--no-live", "--timeout", "400",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=DEMO_TIMEOUT_S)  # fmt: skip
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((out / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{logs}"

    # the table: both hospitals' local-only models and the global model after round 1
    table = proc.stdout[proc.stdout.index("The paper's table") :]
    for row in ("hospital-1 local-only", "hospital-2 local-only", "global v1 (FedAvg)"):
        assert row in table
    assert "Accuracy %" in table and "Specificity %" in table

    # the federation really ran over MQTT: both nodes' updates were aggregated into v1
    results = json.loads((out / "report" / "results.json").read_text())
    rounds = {r["version"]: r for r in results["rounds"]}
    assert set(rounds) == {0, 1} and rounds[1]["accepted"] == 2
    assert rounds[0]["reported"].keys() <= {"hospital-1", "hospital-2"}
    n_test = results["test_set"]["slices"]
    assert all(m["metrics"]["n"] == n_test for m in results["models"])
    live = results["extra_tables"]["Live predictions of the unlabelled slices (on arrival)"]
    assert sum(row["predicted on arrival"] for row in live) == n_test

    # nothing of the demo is still running
    assert not _processes_mentioning(str(out))

    html = out / "report" / "index.html"
    page = html.read_text()
    for png in ("accuracy_per_round.png", "roc.png", "confusion_0.png", "confusion_2.png"):
        assert f'src="{png}"' in page and (out / "report" / png).is_file()
    img = _screenshot(html, tmp_path / "report.png", tmp_path)
    assert img.shape == (1600, 1200)
    assert img.std() > 20  # text, tables and charts, not a blank page
