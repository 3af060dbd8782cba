"""A predict-only workstation follows three federated rounds and serves every global version.

The workstation is a real predict-only install: a fresh virtualenv holding the wheel `uv build`
makes from this tree plus only the base dependencies from uv.lock (no `train` extra: no torch,
onnx or timm anywhere in it), installed offline from the uv cache, exactly as the README's
service install does it. Its `fedscan node run` daemon talks to a real Mosquitto. The real
coordinator (in this process: it has torch) exports each global version to ONNX, checks parity,
signs and publishes it; a scripted training node sends a small delta each round. Each version
is served in turn (a slice dropped into the inbox is predicted by it), then `fedscan node sync`
from the same install provisions a second workstation with the last version.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from coordinator.config import BrokerConfig, CoordinatorConfig, ModelConfig, RoundsConfig
from coordinator.onnx_artifact import torch_onnx_exporter
from coordinator.service import CoordinatorService, mqtt_settings
from edge_node.config import minimal_toml
from edge_node.serve.inference import OnnxModel
from fedscan.brokers.mosquitto import Mosquitto
from fl_protocol.signing import generate_keypair, save_private_key, save_public_key
from fl_protocol.transport import MqttSettings, PahoTransport
from tests.coordinator.fakes import FakeNode
from tests.helpers.dicom_factory import CT_SAMPLE, copy_with_new_uid, sample_path
from tests.helpers.wait import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FEDERATION = "fedpo"
TRAIN_EXTRA = ("torch", "torchvision", "timm", "onnx", "onnxscript")
TIMEOUT = 120.0


def _uv() -> list[str]:
    """uv as `uv run` exported it, else the repository's bootstrap wrapper."""
    uv = os.environ.get("UV")
    return [uv] if uv and Path(uv).is_file() else [str(REPO / ".ci" / "uv")]


def _run(cmd: list[str], **kw: Any) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n{out.stderr}")
    return out.stdout


@pytest.fixture(scope="module")
def predict_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a predict-only install of this tree (built and installed offline)."""
    root = tmp_path_factory.mktemp("predict-only")
    uv = _uv()
    start = time.monotonic()
    _run([*uv, "build", "--offline", "--wheel", "-q", "-o", str(root / "dist")], cwd=REPO)
    (wheel,) = (root / "dist").glob("fedscan-*.whl")
    base = root / "requirements.txt"
    base.write_text(
        _run(
            [*uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "-q"],
            cwd=REPO,
        )
    )
    venv = root / "venv"
    _run([*uv, "venv", "--offline", "-q", "--python", sys.executable, str(venv)])
    py = venv / "bin" / "python"
    install = [*uv, "pip", "install", "-q", "--python", str(py), "--no-deps", "-r", str(base),
               str(wheel)]  # fmt: skip
    try:
        _run([*install, "--offline"])
    except AssertionError as exc:
        # `uv sync` fills uv's wheel cache but not its index metadata, which an offline
        # `uv pip install` needs on some uv releases: then ask the index (PyPI) once
        if "cache" not in str(exc):
            raise
        _run(install)
    probe = f"import importlib.util as u; print([m for m in {TRAIN_EXTRA!r} if u.find_spec(m)])"
    assert _run([str(py), "-c", probe]).strip() == "[]", "the predict-only venv holds train deps"
    print(f"predict-only venv built in {time.monotonic() - start:.1f} s")
    return venv / "bin"


def node_toml(folder: Path, node_id: str, port: int, coordinator_pub: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inbox").mkdir(exist_ok=True)
    path = folder / "node.toml"
    federation = {
        "enabled": True,
        "federation": FEDERATION,
        "broker": f"mqtt://127.0.0.1:{port}",
        "coordinator_public_key": str(coordinator_pub),
    }
    # the CT sample is a head scan: the default chest-only filter would skip it
    path.write_text(
        minimal_toml(
            node_id,
            inference={"intra_op_threads": 1},
            api={"port": 0},
            federation=federation,
            series={"chest_only": False},
        )
    )
    return path


class Workstation:
    """`fedscan node run` from the predict-only install (cwd outside the repository)."""

    def __init__(self, bin_dir: Path, toml: Path) -> None:
        self.bin = bin_dir
        self.toml = toml
        self.folder = toml.parent
        self.log = self.folder / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> Workstation:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [str(self.bin / "fedscan"), "node", "run", "--config", str(self.toml)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        port_file = self.folder / "state" / "api.port"
        wait_for(
            lambda: port_file.exists() or self.proc.poll() is not None,
            TIMEOUT,
            "api.port",
            (self.log,),
        )  # type: ignore[union-attr]
        assert self.proc.poll() is None, self.log.read_text()
        self.port = int(port_file.read_text())
        return self

    def served(self) -> str | None:
        try:
            doc = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()
        except httpx.HTTPError:
            return None
        version = doc.get("model_version")
        return None if version is None else str(version)

    def predicted_by(self, uid: str) -> str | None:
        try:
            rows = httpx.get(
                f"http://127.0.0.1:{self.port}/api/predictions?limit=50", timeout=5
            ).json()
        except httpx.HTTPError:
            return None
        items = rows.get("predictions", rows) if isinstance(rows, dict) else rows
        for row in items:
            if row.get("sop_instance_uid") == uid:
                return str(row.get("model_version"))
        return None

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None


@pytest.fixture
def started() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing()


def test_a_predict_only_workstation_follows_three_rounds(
    tmp_path: Path, mosquitto: Mosquitto, predict_only: Path, started: list[Any]
) -> None:
    """v0 -> v1 -> v2 -> v3: the workstation without torch installs the coordinator's signed
    ONNX export of each version and predicts a new slice with each; `fedscan node sync` from
    the same install then provisions a second workstation with v3."""
    torch.set_num_threads(1)
    keys = tmp_path / "keys"
    keys.mkdir()
    private, public = generate_keypair()
    save_private_key(private, keys / "coordinator.key")
    save_public_key(public, keys / "coordinator.pub")
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    cfg = CoordinatorConfig(
        state_dir=tmp_path / "coordinator",
        federation=FEDERATION,
        signing_key=keys / "coordinator.key",
        broker=BrokerConfig(url=url),
        model=ModelConfig(arch="cnn2d"),
        rounds=RoundsConfig(
            num_rounds=3,
            min_nodes=1,
            expected_nodes=("trainer",),
            round_timeout_s=300.0,
            chunk_timeout_s=2.0,
            codec="fp16",
        ),
    )
    stop = threading.Event()
    outcome: list[Any] = []

    def run_coordinator() -> None:  # built in its thread: its SQLite state stays in one thread
        try:
            service = CoordinatorService(
                cfg, PahoTransport(mqtt_settings(cfg)), onnx_exporter=torch_onnx_exporter
            )
            outcome.append(service.run(stop))
            outcome.append(service.done)
        except BaseException as exc:
            outcome.append(exc)
            raise

    coordinator = threading.Thread(target=run_coordinator, daemon=True)
    trainer = FakeNode(
        PahoTransport(MqttSettings(host="127.0.0.1", port=mosquitto.port, client_id="trainer")),
        "trainer",
        FEDERATION,
    )
    ward = Workstation(predict_only, node_toml(tmp_path / "ward", "ward", mosquitto.port,
                                               keys / "coordinator.pub"))  # fmt: skip
    started.append(lambda: (stop.set(), coordinator.join(30)))
    started.append(ward.stop)
    started.append(trainer.t.disconnect)
    trainer.connect()
    coordinator.start()
    ward.start()
    logs = (ward.log,)

    for version in range(4):
        wait_for(
            lambda v=version: ward.served() == str(v), TIMEOUT, f"the ward serving v{version}", logs
        )  # type: ignore[misc]
        uid = copy_with_new_uid(
            sample_path(CT_SAMPLE), ward.folder / "inbox" / f"after-v{version}.dcm"
        )
        wait_for(lambda u=uid: ward.predicted_by(u), TIMEOUT, f"a prediction by v{version}", logs)  # type: ignore[misc]
        assert ward.predicted_by(uid) == str(version)
        if version == 3:
            break
        rnd = version + 1
        m = wait_for(
            lambda r=rnd: (
                trainer.manifests
                and trainer.manifest.round is not None
                and trainer.manifest.round.round == r
                and trainer.manifest
            ),
            TIMEOUT,
            f"round {rnd} open",
        )
        assert m.version == version and m.onnx is not None  # signed, with the ONNX artifact
        weights = wait_for(lambda: _weights_or_none(trainer), TIMEOUT, f"v{version} weights")
        rng = np.random.default_rng(rnd)
        delta = {
            k: np.array(1.0, np.float32)
            if k.endswith("num_batches_tracked")
            else (0.001 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in weights.items()
        }
        trainer.send_update(delta, 10, chunk_size=64 * 1024)
        wait_for(lambda r=rnd: (a := trainer.last_ack(r)) is not None and a.status == "complete",
                 TIMEOUT, f"round {rnd} acknowledged")  # fmt: skip

    coordinator.join(60)
    assert not coordinator.is_alive() and outcome == [0, True]
    text = ward.log.read_text(errors="replace")
    assert "predict-only node" in text
    assert text.count("installed and served (the coordinator's ONNX export)") == 4
    assert "Traceback" not in text and "accepted without checking" not in text
    assert not (ward.folder / "models" / "global.safetensors").exists()  # never had weights
    assert ward.stop() == 0

    # `fedscan node sync` on the same install provisions another workstation with v3
    other = node_toml(tmp_path / "ward2", "ward2", mosquitto.port, keys / "coordinator.pub")
    sync = subprocess.run(
        [str(predict_only / "fedscan"), "node", "sync", "--config", str(other), "--timeout", "60"],
        cwd=other.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert OnnxModel(other.parent / "models" / "current.onnx", 1).info.model_version == "3"


def _weights_or_none(node: FakeNode) -> dict[str, np.ndarray] | None:
    try:
        return node.global_weights()
    except KeyError:
        return None  # chunks still arriving
