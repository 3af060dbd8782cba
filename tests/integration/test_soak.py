"""Soak: a real `fedscan node run` fed thousands of real CT slices in bursts.

The slices are copies of real CT fixtures with fresh SOPInstanceUIDs: mostly a 128 x 128
native copy of 693_UNCR.dcm (downsampled, to keep disk and time small), every 10th the
original JPEG 2000 slice (693_J2KR.dcm), every 50th the two-frame Enhanced CT. While they
arrive, the daemon's resident memory, open file descriptors and threads are sampled every
``SAMPLE_S`` from /proc; the curve is written to ``soak.csv`` / ``soak.json`` under the test's
tmp dir and summarised on stdout. Afterwards every file must have its outcome (`fedscan node
audit`), every slice exactly one prediction, and fds and threads must not have grown beyond a
small bound (a leak of one fd per file would show as thousands).

CI runs a short soak (``--quick``: 300 slices); the long one (5,000 slices, optionally with
federated rounds against a real coordinator) is marked ``slow``: run it with
`pytest -m slow tests/integration/test_soak.py -s` (``FEDSCAN_SOAK_SLICES`` overrides the count).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.conftest import ReliabilityProfile, soak_slices
from tests.helpers.dicom_factory import sample_path
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.fault_helpers import (
    ProcessSampler,
    audit_cli,
    check_sqlite,
    one_prediction_per_slice,
)
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration

SAMPLE_S = 2.0
FD_GROWTH_MAX = 12  # fds above the level after the first burst (sockets, WAL, log rotation)
THREAD_GROWTH_MAX = 8


def small_copy(src: Path, size: int = 128) -> pydicom.Dataset:
    """A real CT slice downsampled to ``size`` x ``size`` (native little endian, same rescale)."""
    ds = pydicom.dcmread(src)
    pixels = ds.pixel_array.astype(np.float32)
    small = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    ds.PixelData = np.round(small).astype(ds.pixel_array.dtype).tobytes()
    ds.Rows = ds.Columns = size
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@dataclass
class Feeder:
    """Writes real CT copies with fresh UIDs, in bursts."""

    inbox: Path
    templates: list[pydicom.Dataset] = field(default_factory=list)
    written: int = 0
    frames: int = 0

    def __post_init__(self) -> None:
        self.small = small_copy(sample_path("693_UNCR.dcm"))
        self.j2k = pydicom.dcmread(sample_path("693_J2KR.dcm"))
        self.ect = pydicom.dcmread(sample_path("eCT_Supplemental.dcm"))

    def write_one(self) -> None:
        i = self.written
        ds = self.ect if i % 50 == 49 else self.j2k if i % 10 == 9 else self.small
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        folder = self.inbox / f"series{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"s{i:05d}.dcm", enforce_file_format=True)
        self.written += 1
        self.frames += 2 if ds is self.ect else 1

    def burst(self, n: int) -> None:
        for _ in range(n):
            self.write_one()


def summarise(samples: list[dict[str, float]], warm: int) -> dict[str, Any]:
    """RSS / fd / thread figures from the samples (``warm`` = index after the first burst)."""
    rss = [s["rss_kib"] / 1024 for s in samples]
    fds = [int(s["fds"]) for s in samples]
    threads = [int(s["threads"]) for s in samples]
    half = samples[len(samples) // 2 :]
    slope = 0.0
    if len(half) >= 3 and half[-1]["done"] > half[0]["done"]:
        x = np.array([s["done"] for s in half])
        y = np.array([s["rss_kib"] / 1024 for s in half])
        if np.ptp(x) > 0:
            slope = float(np.polyfit(x, y, 1)[0] * 1000)  # MiB per 1000 slices
    return {
        "samples": len(samples),
        "rss_mib": {
            "start": round(rss[0], 1),
            "after_first_burst": round(rss[warm], 1),
            "max": round(max(rss), 1),
            "end": round(rss[-1], 1),
            "second_half_slope_mib_per_1000_slices": round(slope, 2),
        },
        "fds": {"after_first_burst": fds[warm], "min": min(fds), "max": max(fds), "end": fds[-1]},
        "threads": {"after_first_burst": threads[warm], "max": max(threads), "end": threads[-1]},
    }


def run_soak(
    out: Path, node: NodeProcess, total: int, burst: int, pause_s: float, every_s: float
) -> dict[str, Any]:
    """Feed ``total`` files in bursts to a started node while sampling it; returns the summary
    (also written to ``out/soak.json`` and the curve to ``out/soak.csv``)."""
    assert node.proc is not None
    feeder = Feeder(node.inbox)
    base = node.n_predictions()  # e.g. a federated node's labelled slices
    sampler = ProcessSampler(node.proc.pid, every_s, progress=lambda: node.n_predictions() - base)
    sampler.sample()
    sampler.start()
    t0 = time.monotonic()
    warm = 0
    try:
        while feeder.written < total:
            feeder.burst(min(burst, total - feeder.written))
            if warm == 0:
                wait_for(lambda: node.n_predictions() - base >= feeder.frames, 120, "1st burst")
                sampler.sample()
                warm = len(sampler.samples) - 1
            time.sleep(pause_s)
        wait_for(lambda: node.n_predictions() - base >= feeder.frames, 900, "every slice")
        time.sleep(every_s)  # one more sample at rest
    finally:
        sampler.stop()
    elapsed = time.monotonic() - t0
    summary = summarise(sampler.samples, warm)
    summary.update(files=feeder.written, slices=feeder.frames, elapsed_s=round(elapsed, 1))
    keys = ("t_s", "rss_kib", "fds", "threads", "done")
    lines = [",".join(keys)] + [",".join(str(s[k]) for k in keys) for s in sampler.samples]
    (out / "soak.csv").write_text("\n".join(lines) + "\n")
    (out / "soak.json").write_text(json.dumps({**summary, "curve": sampler.samples}, indent=1))
    print(f"\nsoak summary ({out / 'soak.csv'}):\n{json.dumps(summary, indent=1)}")
    return summary


def check_after_soak(node: NodeProcess, summary: dict[str, Any], other_files: int = 0) -> None:
    doc = audit_cli(node.toml, wait_s=120)
    files = summary["files"] + other_files
    assert doc == {
        "files_seen": files,
        "predicted": files,
        "skipped": 0,
        "quarantined": 0,
        "missing": [],
    }
    assert one_prediction_per_slice(node.db) == summary["slices"] + other_files
    fds, threads = summary["fds"], summary["threads"]
    assert fds["max"] <= fds["after_first_burst"] + FD_GROWTH_MAX, fds
    assert threads["max"] <= threads["after_first_burst"] + THREAD_GROWTH_MAX, threads


def started_node(folder: Path) -> NodeProcess:
    node = NodeProcess(folder)
    make_classifier(node.folder / "models" / "current.onnx", version="1")
    return node.start()


def test_soak_short(tmp_path: Path, reliability: ReliabilityProfile) -> None:
    """The CI soak: a few hundred slices in bursts of 50."""
    node = started_node(tmp_path / "node")
    try:
        summary = run_soak(tmp_path, node, soak_slices(reliability.soak_slices), 50, 0.3, 0.5)
        check_after_soak(node, summary)
        assert node.terminate() == 0
        check_sqlite(node.db)
    finally:
        node.kill()


@pytest.mark.slow
def test_soak_5000_slices(tmp_path: Path) -> None:
    """The issue's soak: 5,000 files in bursts of 250 (a CT series at a time)."""
    node = started_node(tmp_path / "node")
    try:
        summary = run_soak(tmp_path, node, soak_slices(5000), 250, 2.0, SAMPLE_S)
        check_after_soak(node, summary)
        assert node.terminate() == 0
        check_sqlite(node.db)
    finally:
        node.kill()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_5000_slices_while_rounds_run(tmp_path: Path) -> None:
    """The same 5,000 files while a real coordinator (embedded broker) runs eight rounds with
    this node: it trains in its compute worker (four local epochs, so the rounds spread over
    the soak), installs each new global model (cnn2d, ONNX export, hot swap) and keeps
    predicting; the soak figures cover the daemon process."""
    from coordinator.service import read_broker_port
    from tests.helpers.wait import wait_for as fwait
    from tests.integration.federation_harness import (
        TIMEOUT,
        Coordinator,
        FedNode,
        write_coordinator,
    )

    rounds = 8
    config = write_coordinator(
        tmp_path / "coordinator", None, "s", num_rounds=rounds, local_epochs=4, eval_wait_s=300.0
    )  # eval_wait_s keeps the embedded broker up until the node has the last model
    coord = Coordinator(config)
    node: FedNode | None = None
    try:
        coord.start()
        port = fwait(lambda: read_broker_port(coord.state_dir), 60, "broker", (coord.log,))
        node = FedNode(tmp_path / "s", "s", f"mqtt://127.0.0.1:{port}")
        node.start()
        fwait(lambda: node is not None and node.served() is not None, TIMEOUT, "a model")
        summary = run_soak(tmp_path, node, soak_slices(5000), 250, 2.0, SAMPLE_S)
        last = str(rounds)
        fwait(lambda: node is not None and node.served() == last, TIMEOUT, "last", (node.log,))
        versions = node.query("SELECT model_version, COUNT(*) FROM predictions GROUP BY 1")
        print(f"predictions per served global version: {dict(versions)}")
        assert len(versions) >= 2  # the soak spanned at least one swap
        check_after_soak(node, summary, other_files=len(node.uids))
        assert coord.status()["global_version"] == rounds
        assert node.terminate() == 0
        check_sqlite(node.db)
    finally:
        coord.stop()
        if node is not None:
            node.kill()
