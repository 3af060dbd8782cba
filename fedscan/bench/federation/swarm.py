"""Part 5: one round completed by many lightweight simulated nodes on Mosquitto over loopback.

Each simulated node is the node's real federation client (``edge_node.federate.client.
FederationClient``) with its own ``PahoTransport`` connection (client id ``fedscan-node-<id>``,
persistent session, last will) and its own state folder: it receives the retained global manifest,
fetches and verifies the retained global chunks (``edge_node.federate.model_sync``), counts its
labels, "trains", then builds, stores in its outbox, signs-if-configured and publishes its update
through the real upload path (``edge_node.federate.update_sender.UpdateSender``: fp16 codec, chunks
of ``chunk_kib``, acks, resends on ``missing``). Only the compute is simulated (``SimCompute``): no
torch, the local weights are the global ones plus small Gaussian noise (a real encoded delta of the
cnn2d's 44 k parameters), the exported "ONNX" is a placeholder file, and the training metrics are
made up. The coordinator is a real `fedscan coordinator run` process expecting every node (round
closes as soon as all reported, quorum half).

``nodes_completed`` = updates accepted AND counted in the new global version (coordinator
SQLite, ``counted_in_aggregate``); ``round_wall_s`` = its ``closed_at - opened_at``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.bench.federation.common import (
    FEDERATION,
    CoordinatorProcess,
    coordinator_keys,
    raise_open_files_limit,
    start_mosquitto,
    tail,
    wait_until,
)

NOISE = 1e-3  # local = global + NOISE * std(tensor) * N(0, 1)
QUIET_LOGGERS = ("edge_node", "fl_protocol", "paho")


class SimCompute:
    """The ``edge_node.train.compute_service.Compute`` of a simulated node: numpy only, no torch."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.trained = 0

    def train(self, job: Any) -> Any:
        from safetensors.numpy import load_file, save_file

        from edge_node.train.job import WEIGHTS_FILE, TrainResult
        from fl_protocol.metrics import classification_metrics

        weights = load_file(str(job.init_weights))
        local: dict[str, np.ndarray] = {}
        for name, w in weights.items():
            if w.dtype.kind == "f" and not name.endswith("num_batches_tracked"):
                scale = np.float32(NOISE * (float(np.std(w)) or 1.0))
                local[name] = w + self.rng.standard_normal(w.shape, dtype=np.float32) * scale
            else:
                local[name] = w
        job.out_dir.mkdir(parents=True, exist_ok=True)
        path = job.out_dir / WEIGHTS_FILE
        save_file(local, str(path))
        n = int(self.rng.integers(8, 65))
        y = np.arange(n) % 2
        pred = np.where(self.rng.random(n) < 0.8, y, 1 - y)
        metrics = classification_metrics(y, pred, self.rng.random(n))
        self.trained += 1
        return TrainResult(
            weights_path=path,
            onnx_path=None,
            metrics_path=job.out_dir / "metrics.json",
            num_samples=n,
            n_val=n,
            train_metrics=metrics,
            val_metrics=metrics,
            init_val_metrics=metrics,
            best_epoch=1,
            epochs_run=1,
            images_per_s=0.0,
            init="random",
            model_version="simulated",
            arch="cnn2d",
            mode="full",
            trainable_keys=tuple(sorted(weights)),
            resumed_from_epoch=0,
            seconds=0.0,
        )

    def evaluate(self, job: Any) -> tuple[Any, int]:
        return None, 0

    def export(self, request: Any) -> Path:
        out = Path(request.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"simulated node: placeholder, not an ONNX model\n")
        return out

    def close(self) -> None:
        pass


@contextlib.contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Send the node-side loggers to ``path`` only (100 clients would flood the console)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in QUIET_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, lg.level))
        lg.propagate = False
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, propagate, level in saved:
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level
        handler.close()


def _client(folder: Path, node_id: str, url: str, seed: int, chunk_size: int) -> Any:
    from edge_node.config import config_from_dict
    from edge_node.federate.client import FederationClient

    raw = {
        "node_id": node_id,
        "paths": {
            "inbox": "inbox",
            "state_dir": "state",
            "quarantine_dir": "quarantine",
            "model_dir": "models",
        },
        "federation": {
            "enabled": True,
            "federation": FEDERATION,
            "broker": url,
            "coordinator_public_key": str(coordinator_keys(folder.parent) / "coordinator.pub"),
        },
    }
    config = config_from_dict(raw, folder)
    client = FederationClient(
        config, lambda _path, _version: None, compute=SimCompute(seed), can_train=True
    )
    client.sender.chunk_size = chunk_size
    return client


def _acked(client: Any, round_id: int) -> bool:
    return any(a.round == round_id and a.status == "complete" for a in client.sender.acks)


def swarm_round(
    work: Path, mosquitto: str | None, *, n_nodes: int, chunk_kib: int, timeout_s: float
) -> dict[str, Any]:
    """One round of ``n_nodes`` simulated nodes; raises PartSkipped without Mosquitto."""
    fd_limit = raise_open_files_limit(max(4096, 8 * n_nodes))
    broker = start_mosquitto(work / "broker", mosquitto)
    url = f"mqtt://127.0.0.1:{broker.port}"
    ids = [f"sim-{i:03d}" for i in range(n_nodes)]
    coord: CoordinatorProcess | None = None
    clients: list[Any] = []
    pool = ThreadPoolExecutor(max_workers=min(n_nodes, 64))
    with logs_to(work / "nodes.log"):
        try:
            t0 = time.monotonic()
            clients = [_client(work / i, i, url, k, chunk_kib * 1024) for k, i in enumerate(ids)]
            for c in clients:
                c.start()
            wait_until(
                lambda: all(c.transport.is_connected for c in clients), 120, "node connections"
            )
            connect_s = time.monotonic() - t0
            coord = CoordinatorProcess(
                work / "coordinator",
                url,
                "cnn2d",
                num_rounds=1,
                min_nodes=max(1, n_nodes // 2),
                expected_nodes=ids,
                round_timeout_s=timeout_s,
                chunk_timeout_s=5.0,
                codec="fp16",
                min_labels=0,
                eval_wait_s=0.0,
            ).start()
            cp = coord
            wait_until(lambda: cp.closed(1), timeout_s + 120, "the round to close", alive=cp.alive)
            wait_until(lambda: all(_acked(c, 1) for c in clients), 15, "acks", poll_s=0.2)
        except RuntimeError as exc:
            if coord is None or not coord.closed(1):
                log = tail(coord.log) if coord is not None else ""
                raise RuntimeError(f"{exc}\n--- coordinator\n{log}") from None
        finally:
            list(pool.map(lambda c: c.stop(timeout=5), clients))
            pool.shutdown()
            coord_exit = coord.stop() if coord is not None else None
            broker.stop()
    rnd = coord.rounds()[0]
    updates = coord.updates(1)
    opened = float(rnd["opened_at"])
    received = sorted(float(u["received_at"]) - opened for u in updates if u["accepted"])
    rejected: dict[str, int] = {}
    for u in updates:
        if not u["accepted"]:
            rejected[str(u["reason"])] = rejected.get(str(u["reason"]), 0) + 1
    counted = sum(1 for u in updates if u["counted"])
    return {
        "nodes": n_nodes,
        "model": "cnn2d",
        "codec": "fp16",
        "chunk_kib": chunk_kib,
        "open_files_limit": fd_limit,
        "connect_all_s": connect_s,
        "round_wall_s": float(rnd["closed_at"]) - opened,
        "outcome": rnd["outcome"],
        "version_out": rnd["version_out"],
        "updates_accepted": len(received),
        "updates_rejected": rejected,
        "nodes_completed": counted if rnd["outcome"] == "aggregated" else 0,
        "nodes_acked_complete": sum(1 for c in clients if _acked(c, 1)),
        "nodes_trained": sum(1 for c in clients if c.compute.trained),
        "received_s": {
            "first": received[0] if received else None,
            "median": float(np.median(received)) if received else None,
            "last": received[-1] if received else None,
        },
        "coordinator_exit": coord_exit,
        "logs": str(work),
    }
