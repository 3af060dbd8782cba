"""Part 4: the protocol overhead of a real round: real node processes, real training, Mosquitto.

Three node processes (each with a labelled inbox of synthetic CT DICOM from ``fedscan.synthetic``,
patient-disjoint) and one `fedscan coordinator run` (cnn2d, fedavg, fp16 updates, every node
expected) talk through a Mosquitto on loopback. A node process is ``python -m
fedscan.bench.federation.node`` (default: the real federation client with its real compute worker,
as the daemon runs it, without the inference pipeline: the daemon in this tree does not start the
federation client yet) or, with ``node_process="daemon"``, a `fedscan node run` daemon with
``[federation] enabled``. The nodes start first and wait with their compute worker pre-started
(torch imported), as a workstation does; then the coordinator opens round 1. Every round a node
fetches the global model, exports it to ONNX and swaps it in, evaluates it, trains one epoch in its
low-priority worker, and sends its delta; the coordinator aggregates and opens the next round.

Per round: ``wall_s`` = coordinator ``closed_at - opened_at`` (its SQLite);
``slowest_training_s`` = the largest ``seconds`` in the nodes' ``result.json`` (the whole
``train_once``: load slices, evaluate the incoming model, train, save);
``overhead_s = wall_s - slowest_training_s``. The critical path of the node whose update
arrived last is broken down from the nodes' log timestamps and the coordinator's state.
Round 1 is the cold one (first model fetch and first ONNX export in each worker); the
headline figure is the steady-state round (the last one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedscan.bench.federation.common import (
    FEDERATION,
    REPO_ROOT,
    CoordinatorProcess,
    coordinator_keys,
    first_log_time,
    start_mosquitto,
    stop_process,
    tail,
    wait_until,
)

READY = "compute worker ready"
WORKER_CMD = "edge_node.train.compute_service"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            out.append(int(stat.parent.name))
    return out


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def worker_idle(node_pid: int, quiet_s: float = 1.0) -> bool:
    """True once the node's compute worker child has torch loaded and burns no CPU: its
    "ready" line only reaches the node's log with the first job, so it is watched in /proc."""
    for pid in _children(node_pid):
        try:
            if WORKER_CMD not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                continue
            if "libtorch" not in Path(f"/proc/{pid}/maps").read_text(errors="replace"):
                return False
        except OSError:
            continue
        before = _cpu_ticks(pid)
        time.sleep(quiet_s)
        return before is not None and before == _cpu_ticks(pid)
    return False


def node_toml(node_id: str, broker_url: str, trust: Path) -> str:
    """``trust``: the folder holding the coordinator's public key (coordinator_keys)."""
    from edge_node.config import minimal_toml

    return minimal_toml(
        node_id,
        inference={"intra_op_threads": 1},
        api={"port": 0},
        training={
            "arch": "cnn2d",
            "epochs": 1,
            "batch_size": 8,
            "val_fraction": 0.3,
            "early_stopping_patience": 0,
            "torch_threads": 1,
        },
        federation={
            "enabled": True,
            "federation": FEDERATION,
            "broker": broker_url,
            "coordinator_public_key": f"{trust}/coordinator.pub",
        },
    )


def labelled_inboxes(work: Path, nodes: list[str], slices_per_node: int) -> dict[str, int]:
    """Synthetic CT slices dealt to the nodes by patient, under inbox/labelled/<class>/."""
    from fedscan.dataset import read_index
    from fedscan.synthetic import generate

    n_per_class = max(2, len(nodes) * slices_per_node // 2)
    index = generate(work / "round-data", n_per_class, seed=3)
    patients = sorted({r.patient_key for r in read_index(index)})
    owner = {p: nodes[i % len(nodes)] for i, p in enumerate(patients)}
    counts = dict.fromkeys(nodes, 0)
    for row in read_index(index):
        node = owner[row.patient_key]
        dst = work / node / "inbox" / "labelled" / row.label / Path(row.path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(index.parent / row.path, dst)
        counts[node] += 1
    return counts


NODE_PROCESSES = ("client", "daemon")


class NodeProcess:
    """A node as a child process: the federation client (``node``) or the whole daemon."""

    def __init__(self, folder: Path, node_id: str, broker_url: str, kind: str) -> None:
        if kind not in NODE_PROCESSES:
            raise ValueError(f"node process must be one of {NODE_PROCESSES}, not {kind!r}")
        self.folder, self.node_id, self.kind = folder, node_id, kind
        (folder / "inbox").mkdir(parents=True, exist_ok=True)  # a node never creates its inbox
        trust = coordinator_keys(folder.parent)
        (folder / "node.toml").write_text(node_toml(node_id, broker_url, trust))
        self.log = folder / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        toml = str(self.folder / "node.toml")
        if self.kind == "daemon":
            cmd = [sys.executable, "-m", "fedscan.cli", "node", "run", "--config", toml]
            cmd += ["--api-port", "0"]
        else:
            cmd = [sys.executable, "-m", "fedscan.bench.federation.node", "--config", toml]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        if READY in (self.log.read_text(errors="replace") if self.log.exists() else ""):
            return True
        return self.proc is not None and worker_idle(self.proc.pid)

    def result(self, round_id: int) -> dict[str, Any] | None:
        path = self.folder / "state" / "federation" / "rounds" / f"round-{round_id}" / "result.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def stop(self) -> int | None:
        return stop_process(self.proc, 60.0)


def _timeline(node: NodeProcess, round_id: int, version: int, t0: float) -> dict[str, Any]:
    """Log events of one node in one round, in seconds after the round opened."""

    def at(needle: str) -> float | None:
        t = first_log_time(node.log, needle)
        return None if t is None else round(t - t0, 3)

    return {
        "fetch_start": at(f"fetching global model {version} ("),
        "installed": at(f"global model {version} installed and served"),
        "train_start": at(f"round {round_id}: training from global model {version}"),
        "update_stored": at(f"round {round_id}: update stored"),
        "update_published": at(f"round {round_id}: update published"),
        "acked": at(f"round {round_id}: update acknowledged"),
    }


def _round_figures(
    coord: CoordinatorProcess, nodes: list[NodeProcess], rnd: dict[str, Any]
) -> dict[str, Any]:
    rid, t0 = int(rnd["round"]), float(rnd["opened_at"])
    wall = float(rnd["closed_at"]) - t0
    results = {n.node_id: n.result(rid) for n in nodes}
    training = {k: float(r["seconds"]) for k, r in results.items() if r is not None}
    updates = coord.updates(rid)
    received = {u["node"]: float(u["received_at"]) - t0 for u in updates}
    slowest = max(training.values()) if training else None
    last = max(received, key=lambda k: received[k]) if received else None
    timelines = {n.node_id: _timeline(n, rid, int(rnd["version_in"]), t0) for n in nodes}
    critical: dict[str, Any] | None = None
    if last is not None:
        tl = timelines[last]
        start, installed, train = tl["fetch_start"], tl["installed"], tl["train_start"]
        seconds = training.get(last)
        trained = None if train is None or seconds is None else train + seconds
        critical = {
            "node": last,
            "round_open_to_manifest_s": start,
            "fetch_export_swap_s": None
            if start is None or installed is None
            else installed - start,
            "installed_to_train_start_s": None
            if installed is None or train is None
            else train - installed,
            "training_s": seconds,
            "train_end_to_update_stored_s": None
            if trained is None or tl["update_stored"] is None
            else tl["update_stored"] - trained,
            "stored_to_received_by_coordinator_s": None
            if tl["update_stored"] is None
            else received[last] - tl["update_stored"],
            "last_received_to_round_closed_s": wall - received[last],
        }
    return {
        "round": rid,
        "version_in": rnd["version_in"],
        "version_out": rnd["version_out"],
        "outcome": rnd["outcome"],
        "wall_s": wall,
        "training_s": training,
        "slowest_training_s": slowest,
        "overhead_s": None if slowest is None else wall - slowest,
        "num_samples": {k: r["num_samples"] for k, r in results.items() if r is not None},
        "updates_received_s": received,
        "accepted": sorted(u["node"] for u in updates if u["accepted"]),
        "counted": sorted(u["node"] for u in updates if u["counted"]),
        "critical_path": critical,
        "timelines": timelines,
    }


def protocol_round(
    work: Path,
    mosquitto: str | None,
    *,
    n_nodes: int,
    rounds: int,
    slices_per_node: int,
    timeout_s: float,
    node_process: str = "client",
) -> dict[str, Any]:
    """Run ``rounds`` rounds of ``n_nodes`` real daemons; raises PartSkipped without Mosquitto."""
    broker = start_mosquitto(work / "broker", mosquitto)
    url = f"mqtt://127.0.0.1:{broker.port}"
    ids = [f"node{i + 1}" for i in range(n_nodes)]
    nodes: list[NodeProcess] = []
    coord: CoordinatorProcess | None = None
    try:
        counts = labelled_inboxes(work, ids, slices_per_node)
        nodes = [NodeProcess(work / i, i, url, node_process) for i in ids]
        t_start = time.monotonic()
        for n in nodes:
            n.start()
        wait_until(
            lambda: all(n.ready() for n in nodes),
            timeout_s,
            "the nodes' compute workers",
            alive=lambda: all(n.alive() for n in nodes),
        )
        nodes_ready_s = time.monotonic() - t_start
        coord = CoordinatorProcess(
            work / "coordinator",
            url,
            "cnn2d",
            num_rounds=rounds,
            min_nodes=n_nodes,
            expected_nodes=ids,
            round_timeout_s=timeout_s,
            chunk_timeout_s=5.0,
            codec="fp16",
            local_epochs=1,
            batch_size=8,
            min_labels=4,
            eval_wait_s=0.0,
        ).start()
        c = coord
        wait_until(lambda: c.closed(rounds), timeout_s, f"{rounds} round(s)", alive=c.alive)
        figures = [_round_figures(c, nodes, r) for r in c.rounds()[:rounds]]
    except RuntimeError as exc:
        logs = "".join(f"\n--- {n.node_id}\n{tail(n.log)}" for n in nodes)
        if coord is not None:
            logs += f"\n--- coordinator\n{tail(coord.log)}"
        raise RuntimeError(f"{exc}{logs}") from None
    finally:
        exits = {n.node_id: n.stop() for n in nodes}
        coord_exit = coord.stop() if coord is not None else None
        broker.stop()
    steady = figures[-1]
    return {
        "nodes": n_nodes,
        "node_process": node_process,
        "labelled_slices": counts,
        "rounds": figures,
        "nodes_ready_s": nodes_ready_s,
        "protocol_overhead_s": steady["overhead_s"],
        "protocol_overhead_round": steady["round"],
        "protocol_overhead_first_round_s": figures[0]["overhead_s"],
        "round_wall_s": steady["wall_s"],
        "slowest_training_s": steady["slowest_training_s"],
        "exit_codes": {**exits, "coordinator": coord_exit},
        "logs": str(work),
    }
