"""Real federations for the integration tests: a coordinator process and node daemons with
labelled inboxes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from coordinator.config import load_config
from coordinator.model_init import ensure_initial_version, torch_model_source
from coordinator.state import State
from edge_node.config import minimal_toml
from edge_node.ingest.preprocess import patient_key
from edge_node.train.split import VAL, side_of
from fl_protocol.signing import generate_keypair, save_private_key, save_public_key
from tests.helpers.dicom_factory import CT_SAMPLE, sample_path
from tests.helpers.training import write_slice
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

REPO = Path(__file__).resolve().parents[2]


FEDERATION = "fedint"


TIMEOUT = 240.0  # generous: two cores shared with the rest of the suite


def coordinator_key(folder: Path) -> Path:
    """Without provisioned ``keys``: the coordinator's own signing pair in ``folder.parent/keys``
    (nodes refuse unsigned global models: no key, no federation), made once and shared by the
    coordinator and the nodes of the test."""
    keys = folder.parent / "keys"
    if not (keys / "coordinator.key").exists():
        keys.mkdir(parents=True, exist_ok=True)
        private, public = generate_keypair()
        save_private_key(private, keys / "coordinator.key")
        save_public_key(public, keys / "coordinator.pub")
    return keys


def write_coordinator(
    folder: Path, broker_url: str | None, nodes: str, keys: Path | None = None, **rounds: Any
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    broker = f'url = "{broker_url}"' if broker_url else "embedded_port = 0"
    params: dict[str, Any] = {
        "num_rounds": 2,
        "min_nodes": len(nodes),
        "expected_nodes": list(nodes),
        "round_timeout_s": 300.0,
        "chunk_timeout_s": 2.0,
        "codec": "fp16",
        "local_epochs": 1,
        "batch_size": 4,
        "min_labels": 4,
        "eval_wait_s": 0.0,
    }
    params.update(rounds)
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    path = folder / "coordinator.toml"
    if keys is not None:
        signing = f'signing_key = "{keys}/coordinator.key"\nnode_keys_dir = "{keys}/nodes"\n'
    else:  # global manifests signed; node updates not (no node keys provisioned)
        signing = f'signing_key = "{coordinator_key(folder)}/coordinator.key"\n'
    path.write_text(
        f'federation = "{FEDERATION}"\nstate_dir = "state"\n{signing}[broker]\n{broker}\n'
        f'[model]\narch = "cnn2d"\n[rounds]\n{lines}\n'
    )
    cfg = load_config(path)
    state = State(cfg.state_dir)  # version 0 from the real cnn2d, made in this process
    try:
        ensure_initial_version(state, cfg.model, torch_model_source)
    finally:
        state.close()
    return path


class Coordinator:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.state_dir = config.parent / "state"
        self.log = config.parent / "coordinator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Coordinator:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "fedscan.cli", "coordinator", "run"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--config", str(self.config)],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        db = self.state_dir / "coordinator.sqlite"
        if not db.exists():
            return []
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def round_status(self, round_id: int) -> str | None:
        rows = self.query(f"SELECT status FROM rounds WHERE id = {int(round_id)}")
        return str(rows[0][0]) if rows else None

    def status(self) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "fedscan.cli", "coordinator", "status", "--json"]
        out = subprocess.run(
            [*cmd, "--config", str(self.config)],
            cwd=REPO,
            capture_output=True,
            timeout=120,
            check=True,
        )
        return dict(json.loads(out.stdout))


# The node.toml sections every federated test node shares (all but [federation]).
# the slices are the real head CT 693_UNCR standing for "a CT slice": no chest-only filter
NODE_LOCAL: dict[str, dict[str, Any]] = {
    "inference": {"intra_op_threads": 1},
    "api": {"port": 0},
    "training": {
        "arch": "cnn2d",
        "epochs": 1,
        "batch_size": 4,
        "val_fraction": 0.5,
        "augment": False,
        "early_stopping_patience": 0,
        "torch_threads": 1,
        "nice": 5,
    },
    "series": {"chest_only": False},
}


def node_toml(node_id: str, broker_url: str, keys: Path | None, trust: Path | None = None) -> str:
    """``keys``: provisioned keys (the node signs its updates); else ``trust`` holds only the
    coordinator's public key (see coordinator_key), which a federation node always needs."""
    federation: dict[str, Any] = {"enabled": True, "federation": FEDERATION, "broker": broker_url}
    if trust:
        federation["coordinator_public_key"] = f"{trust}/coordinator.pub"
    if keys is not None:
        federation["signing_key"] = f"{keys}/{node_id}.key"
        federation["coordinator_public_key"] = f"{keys}/coordinator.pub"
    return minimal_toml(node_id, **NODE_LOCAL, federation=federation)


def labelled_inbox(inbox: Path, node_id: str) -> list[str]:
    """Six real CT slices of six patients under inbox/labelled/<class>/: per class two on the
    train side and one on the validation side of the federation's patient split."""
    src = sample_path(CT_SAMPLE)
    want = {("train", 0): 2, ("train", 1): 2, (VAL, 0): 1, (VAL, 1): 1}
    uids: list[str] = []
    i = 0
    while any(want.values()):
        pid = f"{node_id}-P{i}"
        side = side_of(patient_key(pid), salt=FEDERATION, val_fraction=0.5)
        cls = i % 2
        key = (VAL if side == VAL else "train", cls)
        if want[key]:
            want[key] -= 1
            folder = inbox / "labelled" / ("covid" if cls else "non_covid")
            uids.append(write_slice(src, folder / f"{pid}.dcm", patient_id=pid,
                                    covid=bool(cls), seed=i))  # fmt: skip
        i += 1
    return uids


class FedNode(NodeProcess):
    """A `fedscan node run` daemon that gets its model from the federation."""

    def __init__(
        self, folder: Path, node_id: str, broker_url: str, keys: Path | None = None
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        trust = None if keys is not None else folder.parent / "keys"
        (folder / "node.toml").write_text(node_toml(node_id, broker_url, keys, trust))
        super().__init__(folder)
        self.node_id = node_id
        self.uids = labelled_inbox(self.inbox, node_id)

    def start(self) -> FedNode:
        port_file = self.folder / "state" / "api.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fedscan.cli", "node", "run", "--config", str(self.toml)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        wait_for(lambda: port_file.exists(), 60, f"{self.node_id} API", (self.log,), (self.proc,))
        self.port = int(port_file.read_text())
        return self

    def served(self) -> str | None:
        version = self.health().get("model_version")
        return None if version is None else str(version)

    def outbox_rounds(self) -> list[str]:
        outbox = self.folder / "state" / "federation" / "outbox"
        return sorted(p.name for p in outbox.glob("round-*")) if outbox.exists() else []

    def predicted_version(self, uid: str) -> str | None:
        rows = self.query(
            "SELECT model_version FROM predictions WHERE sop_instance_uid = ?", (uid,)
        )
        return str(rows[0][0]) if rows else None
