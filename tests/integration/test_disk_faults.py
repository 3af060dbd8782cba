"""Disk faults: the node's state or inbox on a full filesystem, a read-only model directory.

Each test mounts a small tmpfs (or remounts one read-only) where the node keeps that part of
its data, so the kernel returns real ENOSPC / EROFS to SQLite, to the PACS writer and to the
model installer. Mounting needs root (CAP_SYS_ADMIN); elsewhere the tests skip and say so.

Invariants: the node stays up and says clearly what is wrong, SQLite is never corrupted, no
good file is quarantined because the disk was full, and once space returns every inbox file
gets its outcome without a restart (`fedscan node audit` complete). A global model that cannot
be written to a read-only model directory is refused with a clear error while the old model
keeps serving, and is installed once the directory is writable again.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save as st_save

from fl_protocol.chunking import split
from fl_protocol.schemas import GlobalManifest
from fl_protocol.signing import generate_keypair, save_public_key, sign_manifest
from tests.helpers.dicom_factory import sample_path, write_ct
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.fault_helpers import audit_cli, check_sqlite, one_prediction_per_slice
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (skips the test when mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write one file until the filesystem says ENOSPC; returns it (delete it to free space)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 16384)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def node_on(folder: Path) -> NodeProcess:
    node = NodeProcess(folder)
    make_classifier(node.folder / "models" / "current.onnx", version="1")
    return node


def test_state_on_a_full_disk_waits_reports_and_recovers(tmp_path: Path) -> None:
    """The SQLite state fills its disk while files arrive: the node logs the write failure,
    answers a label POST with an error instead of a false OK, keeps running, quarantines
    nothing, and when space returns stores every waiting file without a restart."""
    node = node_on(tmp_path / "node")
    with tmpfs(node.folder / "state", "1m"):
        node.start()
        try:
            for i in range(5):
                write_ct(node.inbox / f"a{i}.dcm", rows=64, cols=64, seed=i)
            wait_for(lambda: node.n_predictions() >= 5, 60, "5 predictions")
            uid = node.query("SELECT sop_instance_uid FROM predictions LIMIT 1")[0][0]
            filler = fill(node.folder / "state")
            for i in range(20):
                write_ct(node.inbox / f"b{i}.dcm", rows=64, cols=64, seed=i)
            wait_for(lambda: "disk is full" in node.log.read_text(), 60, "a disk-full error")
            r = httpx.post(
                f"http://127.0.0.1:{node.port}/api/labels",
                json={"sop_instance_uid": uid, "label": "covid", "who": "dr_a"},
                timeout=60,
            )
            assert r.status_code >= 500, r.text  # not acknowledged: it was not stored
            assert node.alive() and node.health()["status"] == "ok"
            assert node.query("SELECT COUNT(*) FROM labels") == []
            assert not list((node.folder / "quarantine").iterdir())
            check_sqlite(node.db)

            filler.unlink()  # space is back
            doc = audit_cli(node.toml, wait_s=60)
            assert doc["missing"] == [] and doc["predicted"] == 25, doc
            assert one_prediction_per_slice(node.db) == 25
            assert not list((node.folder / "quarantine").iterdir())
            r = httpx.post(
                f"http://127.0.0.1:{node.port}/api/labels",
                json={"sop_instance_uid": uid, "label": "covid", "who": "dr_a"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert node.terminate() == 0
            check_sqlite(node.db)
        finally:
            node.kill()


def test_inbox_on_a_full_disk_truncated_file_is_quarantined_then_resent(
    tmp_path: Path,
) -> None:
    """The PACS fills the inbox's disk: the file it was writing is cut short. That file gets a
    quarantine outcome (truncated), the complete ones predictions; when space is freed and the
    file is sent again, it is predicted (its outcome replaced, still one row)."""
    node = node_on(tmp_path / "node")
    src = sample_path("693_UNCR.dcm").read_bytes()  # a real 512x512 CT slice, ~0.5 MB
    with tmpfs(node.folder / "inbox", "2m"):
        node.start()
        try:
            written: list[Path] = []
            cut: Path | None = None
            for i in range(10):
                dst = node.inbox / f"ct{i}.dcm"
                try:
                    with open(dst, "wb") as f:
                        for lo in range(0, len(src), 65536):
                            f.write(src[lo : lo + 65536])
                            f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    cut = dst
                    break
                written.append(dst)
            assert cut is not None and cut.stat().st_size < len(src)
            doc = audit_cli(node.toml, wait_s=60)
            assert doc["missing"] == [] and doc["quarantined"] == 1, doc
            assert doc["predicted"] == 1  # same SOP instance: the copies are duplicates
            assert doc["skipped"] == len(written) - 1
            outcome = node.outcome(cut)
            assert outcome is not None and outcome[0] == "quarantined"
            assert str(outcome[1]).startswith(("truncated", "not_dicom")), outcome

            for p in written[1:]:
                p.unlink()  # the PACS cleans up
            cut.write_bytes(src)  # and sends the cut file again
            wait_for(lambda: (node.outcome(cut) or ("",))[0] == "skipped", 60, "resent file")
            doc = audit_cli(node.toml, wait_s=60)
            assert doc == {
                "files_seen": 2,
                "predicted": 1,
                "skipped": 1,
                "quarantined": 0,
                "missing": [],
            }
            assert node.alive()
            assert node.terminate() == 0
            check_sqlite(node.db)
        finally:
            node.kill()


def _global_manifest(
    version: int, weights: dict[str, np.ndarray], key: Ed25519PrivateKey
) -> tuple[GlobalManifest, list[bytes]]:
    """A global model as the coordinator publishes it: chunks and a manifest signed by ``key``."""
    meta = {"arch": "cnn2d", "texture_dim": "0", "version": str(version), "init": "random"}
    payload, chunks = split(bytes(st_save(weights, metadata=meta)), 64 * 1024)
    manifest = GlobalManifest(
        federation="fedtest", version=version, arch="cnn2d", texture_dim=0, payload=payload
    )
    return sign_manifest(manifest, key, "coordinator"), chunks


def test_read_only_model_dir_refuses_the_swap_and_the_old_model_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A verified global model v2 arrives while the model directory is read-only: it is not
    installed, the error says why, v1 keeps serving and nothing half-written is left; once the
    directory is writable the same manifest installs v2 (real ONNX export) and it serves."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from edge_node.config import config_from_dict
    from edge_node.federate.model_sync import ModelSync
    from edge_node.serve.inference import ModelHolder
    from edge_node.train.compute_service import InProcessCompute
    from export.weights import state_to_numpy
    from export.zoo import create_model

    torch.manual_seed(0)
    weights = state_to_numpy(create_model("cnn2d"))
    key, public = generate_keypair()
    save_public_key(public, tmp_path / "coordinator.pub")
    cfg = config_from_dict(
        {
            "node_id": "n1",
            "paths": {
                "inbox": "inbox",
                "state_dir": "state",
                "quarantine_dir": "quarantine",
                "model_dir": "models",
            },
            "federation": {
                "enabled": True,
                "federation": "fedtest",
                "coordinator_public_key": "coordinator.pub",
            },
        },
        tmp_path,
    )
    holder = ModelHolder(intra_op_threads=1)
    with tmpfs(cfg.paths.model_dir, "64m") as model_dir:
        holder.swap(make_classifier(model_dir / "current.onnx", version="1"))

        def swap_in(path: Path, _version: int) -> None:
            holder.swap(path)

        sync = ModelSync(cfg, InProcessCompute(), swap_in)
        before = sorted(p.name for p in model_dir.iterdir())
        remount(model_dir, "ro")
        manifest, chunks = _global_manifest(2, weights, key)
        sync.check_manifest(manifest)
        assert sync.offer(manifest)
        for i, chunk in enumerate(chunks):
            sync.add_chunk(2, i, chunk)
        with caplog.at_level(logging.ERROR):
            assert sync.complete() is None
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("global model 2 not installed" in m for m in errors), errors
        assert any("Read-only file system" in m for m in errors), errors
        current = holder.current()
        assert current is not None and current.info.model_version == "1"
        assert sorted(p.name for p in model_dir.iterdir()) == before
        assert sync.state.installed_version is None and sync.state.served_version is None

        remount(model_dir, "rw")
        assert sync.offer(manifest)  # a redelivery retries
        for i, chunk in enumerate(chunks):
            sync.add_chunk(2, i, chunk)
        installed = sync.complete()
        assert installed is not None and installed.served
        current = holder.current()
        assert current is not None and current.info.model_version == "2"
        state = json.loads((cfg.paths.state_dir / "federation" / "sync.json").read_text())
        assert state["served_version"] == 2
        sync.close()


def test_quarantine_on_a_full_disk_still_records_the_outcome(tmp_path: Path) -> None:
    """The quarantine folder's disk has room for the copy of a refused file but not for its
    reason file (or for nothing at all): the refusal is still recorded, the node goes on."""
    node = node_on(tmp_path / "node")
    with tmpfs(node.folder / "quarantine", "8k"):
        node.start()
        try:
            exact = node.inbox / "junk_8k.dcm"  # fills the quarantine disk: reason file fails
            exact.write_bytes(b"\x07" * 8192)
            wait_for(lambda: node.outcome(exact), 30, "outcome of the first refused file")
            later = node.inbox / "junk_small.dcm"  # no room left at all
            later.write_bytes(b"\x07" * 100)
            good = node.inbox / "good.dcm"
            write_ct(good, rows=64, cols=64)
            wait_for(lambda: node.outcome(later) and node.outcome(good), 30, "more outcomes")
            assert (node.outcome(exact) or ("",))[0] == "quarantined"
            assert (node.outcome(later) or ("",))[0] == "quarantined"
            assert node.outcome(good) == ("predicted", None)
            assert audit_cli(node.toml, wait_s=30)["missing"] == []
            assert node.alive() and node.terminate() == 0
        finally:
            node.kill()
