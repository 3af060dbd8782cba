"""DICOM bombs (issue 14): small files that would make the node inflate or decode gigabytes.
Each is refused with a ``limit:*`` reason before the memory is spent, quarantined with that
reason by the daemon, and leaves no prediction row; the slow tests measure the peak memory
of a real 1 GiB bomb in a subprocess."""

from __future__ import annotations

import json
import resource
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_node.cli.daemon import init_node
from edge_node.config import PreprocessConfig, load_config
from edge_node.daemon import Daemon
from edge_node.errors import InputError, NotDicomError, PixelDecodeError
from edge_node.ingest.dicom_decode import DecodeLimits
from edge_node.ingest.preprocess import PreprocessParams, prepare
from tests.helpers.dicom_bombs import (
    deflated_dataset_bomb,
    deflated_frame_bomb,
    j2k_size_bomb,
    jpeg_size_bomb,
    many_frames,
)
from tests.helpers.dicom_factory import write_ct
from tests.helpers.node_api import DICOM, api_client, start_daemon
from tests.helpers.onnx_models import make_classifier

MiB = 1 << 20


def _reason(path: Path, params: PreprocessParams | None = None) -> tuple[type, str]:
    with pytest.raises(InputError) as info:
        prepare(path, params)
    return type(info.value), info.value.reason


def test_deflated_frame_bomb_stops_at_the_frame_size(tmp_path: Path) -> None:
    """A 64 KB Deflated Image Frame file whose frame inflates to 64 MiB (header: 512 KiB) is
    refused as limit:inflated; a correct deflated frame still decodes (test_transfer_syntaxes)."""
    bomb = deflated_frame_bomb(tmp_path / "frame.dcm", 64 * MiB)
    assert bomb.stat().st_size < 100_000
    assert _reason(bomb) == (NotDicomError, "limit:inflated")


def test_deflated_dataset_bomb_is_capped_before_pydicom(tmp_path: Path) -> None:
    """A deflated dataset hiding a 64 MiB element, with max_dataset_mb 8: limit:inflated.
    Under the bound the same construction is a usable CT."""
    small = PreprocessParams(limits=DecodeLimits(max_dataset_bytes=8 * MiB))
    bomb = deflated_dataset_bomb(tmp_path / "ds.dcm", 64 * MiB)
    assert bomb.stat().st_size < 200_000
    assert _reason(bomb, small) == (NotDicomError, "limit:inflated")
    fine = deflated_dataset_bomb(tmp_path / "fine.dcm", 1 * MiB)
    assert len(prepare(fine, small).frames) == 1


def test_frames_and_pixels_are_counted_from_the_header(tmp_path: Path) -> None:
    """8,192 frames of 1 x 1 (an 18 KB file) is limit:frames; a header of 16384 x 16384
    is limit:pixels; a file over max_dataset_mb is limit:file_size, all before decoding."""
    frames = many_frames(tmp_path / "frames.dcm", 8192)
    assert frames.stat().st_size < 20_000
    assert _reason(frames) == (PixelDecodeError, "limit:frames")
    ok = PreprocessParams(limits=DecodeLimits(max_frames=8192, max_pixels=8192))
    assert len(prepare(many_frames(tmp_path / "few.dcm", 4), ok).frames) == 4

    tiny = PreprocessParams(limits=DecodeLimits(max_pixels=128 * 128 - 1))
    assert _reason(write_ct(tmp_path / "ct.dcm", rows=128, cols=128), tiny) == (
        PixelDecodeError,
        "limit:pixels",
    )
    cap = PreprocessParams(limits=DecodeLimits(max_dataset_bytes=16_000))
    big = write_ct(tmp_path / "big.dcm", rows=128, cols=128)  # 32 KiB of pixels
    assert _reason(big, cap) == (NotDicomError, "limit:file_size")


def test_codestream_sizes_must_match_the_header(tmp_path: Path) -> None:
    """A 5 KB JPEG 2000 frame whose SIZ claims 20000 x 20000 (openjpeg would decode 400 M
    pixels: 2.3 GB) and a JPEG baseline frame whose SOF does are refused before decoding
    (j2k_header_mismatch / jpeg_header_mismatch); the honest 64 x 64 files decode."""
    assert _reason(j2k_size_bomb(tmp_path / "j2k.dcm", 20000)) == (
        PixelDecodeError,
        "j2k_header_mismatch",
    )
    assert _reason(jpeg_size_bomb(tmp_path / "jpeg.dcm", 20000)) == (
        PixelDecodeError,
        "jpeg_header_mismatch",
    )
    assert len(prepare(j2k_size_bomb(tmp_path / "j2k_ok.dcm", 64)).frames) == 1
    assert len(prepare(jpeg_size_bomb(tmp_path / "jpeg_ok.dcm", 64)).frames) == 1


def test_limits_come_from_the_node_config() -> None:
    """[preprocess] max_frames / max_pixels / max_dataset_mb become the decode limits."""
    cfg = PreprocessConfig(max_frames=7, max_pixels=99, max_dataset_mb=3)
    assert PreprocessParams.from_config(cfg).limits == DecodeLimits(7, 99, 3 * MiB)
    assert PreprocessParams().limits == DecodeLimits.from_config(PreprocessConfig())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    yield d
    d.shutdown(10)


def _files(node: Daemon) -> dict[str, tuple[str, str]]:
    with sqlite3.connect(node.config.paths.database) as conn:
        rows = conn.execute("SELECT path, outcome, reason FROM files").fetchall()
    return {Path(p).name: (o, ":".join((r or "").split(":")[:2])) for p, o, r in rows}


def _predictions(node: Daemon) -> dict[str, int]:
    """Prediction rows per file name."""
    with sqlite3.connect(node.config.paths.database) as conn:
        rows = conn.execute("SELECT path, COUNT(*) FROM predictions GROUP BY path").fetchall()
    return {Path(p).name: int(n) for p, n in rows}


def test_daemon_quarantines_bombs_with_their_reason(node: Daemon, tmp_path: Path) -> None:
    """Bombs dropped into the inbox are quarantined with reason limit:* (file row, copy and
    .reason.json), no prediction row is written, and a normal CT after them is predicted."""
    inbox = node.config.paths.inbox
    made = [  # built aside, then renamed in: the builders rewrite their file
        deflated_frame_bomb(tmp_path / "frame.dcm", 64 * MiB),
        many_frames(tmp_path / "frames.dcm", 8192),
        write_ct(tmp_path / "good.dcm", rows=64, cols=64),
    ]
    for path in made:
        path.replace(inbox / path.name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_files(node)) < 3:
        time.sleep(0.1)
    files = _files(node)
    assert files["frame.dcm"] == ("quarantined", "limit:inflated")
    assert files["frames.dcm"] == ("quarantined", "limit:frames")
    assert files["good.dcm"][0] == "predicted" and _predictions(node) == {"good.dcm": 1}
    quarantine = node.config.paths.quarantine_dir
    reasons = {
        p.name: json.loads(p.read_text())["reason"] for p in quarantine.glob("*.reason.json")
    }
    assert reasons == {
        "frame.dcm.reason.json": "limit:inflated",
        "frames.dcm.reason.json": "limit:frames",
    }


def test_file_too_large_to_read_is_not_copied(tmp_path: Path) -> None:
    """With max_dataset_mb = 1, a 2 MiB CT in the inbox is quarantined as limit:file_size
    with its reason file only (copied: false): refusing a huge file must not fill the disk."""
    toml = init_node(tmp_path / "node")
    make_classifier(tmp_path / "node" / "models" / "current.onnx", version="5")
    overrides = {"api": {"port": 0}, "preprocess": {"max_dataset_mb": 1}}
    d = Daemon(load_config(toml, overrides))
    d.start()
    try:
        big = write_ct(tmp_path / "big.dcm", rows=1024, cols=1024)
        big.replace(d.config.paths.inbox / "big.dcm")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "big.dcm" not in _files(d):
            time.sleep(0.1)
        assert _files(d)["big.dcm"] == ("quarantined", "limit:file_size")
        quarantine = d.config.paths.quarantine_dir
        record = json.loads((quarantine / "big.dcm.reason.json").read_text())
        assert record["copied"] is False and record["size"] > 2 * MiB
        assert not (quarantine / "big.dcm").exists()
    finally:
        d.shutdown(10)


def test_uploaded_bomb_is_refused_and_not_kept(node: Daemon, tmp_path: Path) -> None:
    """POST /api/predict with a frame bomb: 422 naming limit:inflated, no prediction, and the
    upload is not kept in state/uploads."""
    bomb = deflated_frame_bomb(tmp_path / "frame.dcm", 64 * MiB)
    with api_client(node) as c:
        r = c.post("/api/predict", content=bomb.read_bytes(), headers=DICOM)
    assert r.status_code == 422 and "limit:inflated" in r.json()["error"]
    assert _predictions(node) == {}
    assert list((node.config.paths.state_dir / "uploads").iterdir()) == []


_PEAK = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from edge_node.errors import InputError
    from edge_node.ingest.preprocess import prepare
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        prepare(Path(sys.argv[1]))
        outcome = "accepted"
    except InputError as exc:
        outcome = exc.reason
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(outcome, before, after)
    """
)


def _peak(path: Path) -> tuple[str, int]:
    """(outcome, peak-RSS growth in MiB) of preparing ``path`` in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    outcome, before, after = out.stdout.split()
    return outcome, (int(after) - int(before)) // 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.slow
def test_one_gib_bombs_peak_memory(tmp_path: Path) -> None:
    """The issue's bombs at full size, default limits: a 1 MB file whose frame inflates to
    1 GiB, a ~1 MB deflated dataset hiding a 1 GiB element, and 8,192 1x1 frames; plus a
    5 KB JPEG 2000 frame whose SIZ claims 20000 x 20000. Each is refused; peak memory grows
    by less than the 288 MiB dataset cap plus a margin (before the fix: 1 GiB, 2.25 GB,
    3.47 GB as measured in issue 14; 2.3 GB for the J2K frame, measured here)."""
    assert resource.RLIM_INFINITY is not None
    frame = deflated_frame_bomb(tmp_path / "frame.dcm", 1 << 30)
    dataset = deflated_dataset_bomb(tmp_path / "ds.dcm", 1 << 30)
    frames = many_frames(tmp_path / "frames.dcm", 8192)
    j2k = j2k_size_bomb(tmp_path / "j2k.dcm", 20000)
    results = {p.name: _peak(p) for p in (frame, dataset, frames, j2k)}
    print(
        {k: (v[0], f"{v[1]} MiB", tmp_path.joinpath(k).stat().st_size) for k, v in results.items()}
    )
    assert results["frame.dcm"][0] == "limit:inflated" and results["frame.dcm"][1] < 64
    assert results["ds.dcm"][0] == "limit:inflated" and results["ds.dcm"][1] < 288 + 64
    assert results["frames.dcm"][0] == "limit:frames" and results["frames.dcm"][1] < 64
    assert results["j2k.dcm"][0] == "j2k_header_mismatch" and results["j2k.dcm"][1] < 64


@pytest.mark.slow
def test_big_upload_streams_to_disk(tmp_path: Path) -> None:
    """A 600 MiB POST (Content-Length) is 413 before it is read; a 400 MiB chunked POST is cut
    at max_upload_mb (288) while streaming to disk: the node's peak memory grows < 64 MiB,
    nothing is left in uploads/, and the node still answers."""
    d = start_daemon(tmp_path)
    try:
        pid_status = Path("/proc/self/status")

        def hwm_mib() -> int:
            for line in pid_status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
            raise AssertionError("no VmHWM")

        with api_client(d) as c:
            before = hwm_mib()
            headers = {**DICOM, "Content-Length": str(600 * MiB)}

            def stream(total: int) -> Iterator[bytes]:
                block = bytes(MiB)
                for _ in range(total // MiB):
                    yield block

            try:
                r = c.post("/api/predict", content=stream(600 * MiB), headers=headers)
                assert r.status_code == 413
            except httpx.TransportError:
                pass  # the server answered 413 and closed while we were still sending
            try:
                r = c.post("/api/predict", content=stream(400 * MiB), headers=DICOM)
                assert r.status_code == 413
            except httpx.TransportError:
                pass
            grown = hwm_mib() - before
            print(f"peak memory growth over both uploads: {grown} MiB")
            assert grown < 64, f"peak memory grew {grown} MiB"
            assert list((d.config.paths.state_dir / "uploads").iterdir()) == []
            assert c.get("/health").status_code == 200
    finally:
        d.shutdown(10)
