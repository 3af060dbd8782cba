"""Part 3: time and peak memory of the coordinator's aggregation step for N updates.

What is measured is the coordinator's own step, ``coordinator.aggregate.aggregate_round``,
on a real ``coordinator.state.State``: N accepted update rows whose spool files are encoded
payloads exactly as the coordinator spools them (the verified wire bytes), then load the
global checkpoint, stream every update through the ``fedavg`` strategy (each decoded from its
bytes by ``SpoolFile.load``, one at a time), write the new checkpoint and commit. ``K``
distinct payloads (real-looking deltas: the resnet18 delta of part 1 rescaled and perturbed
per payload) are shared by the N rows, so the disk holds K files, not N.

Each N runs in a fresh child process (``python -m fedscan.bench.federation.aggregate``) so that
memory figures are not polluted by torch or by the other parts:

- ``peak_traced_mb``: tracemalloc peak over the whole step (numpy buffers and Python bytes are
  traced), counted from just before the step; the global model is loaded INSIDE the step.
- ``phase_peaks_traced_mb``: the traced peak in each phase (loading the global checkpoint,
  streaming the updates, writing the new checkpoint), so the largest one names the culprit.
- ``streaming_peak_above_start_mb``: the part of the streaming phase's peak above what was
  resident when it began (the loaded global weights): accumulator + one update being decoded.
- ``rss_peak_above_start_mb``: the process's peak RSS (VmHWM, reset just before the step via
  /proc/self/clear_refs) minus its RSS at that moment.
- ``seconds``: wall time of the step, in a separate run without tracemalloc.

Ratios divide by one model: the fp32 size of the global weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedscan.bench.federation.common import REPO_ROOT

RESULT_MARK = "FEDSCAN-AGGREGATE "
METADATA = {"format": "fedscan.weights/1", "texture_dim": "0", "init": "random"}


# -- parent: the payload files -------------------------------------------------------------------


def prepare(
    folder: Path,
    base: Mapping[str, np.ndarray],
    template: Mapping[str, np.ndarray],
    codec: str,
    distinct: int,
    arch: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``global.safetensors`` and ``distinct`` encoded payloads under ``folder``."""
    from coordinator.spool import save_tensors
    from coordinator.strategy.utils import l2_norm
    from fl_protocol.codecs import decode, encode
    from fl_protocol.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "global.safetensors", base, {**METADATA, "arch": arch, "version": "0"})
    rng = np.random.default_rng(seed)
    payloads = []
    for k in range(distinct):
        delta: dict[str, np.ndarray] = {}
        for name, t in template.items():
            if name.endswith("num_batches_tracked") or t.dtype.kind != "f":
                delta[name] = np.array(t, copy=True)
                continue
            scale = float(np.std(t)) or 1e-6
            noise = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(0.2 * scale)
            delta[name] = (t * np.float32(rng.uniform(0.7, 1.3)) + noise).astype(np.float32)
        data = encode(delta, codec)
        path = folder / f"payload-{codec}-{k}.safetensors"
        write_atomic(path, data, sync_dir=True)
        payloads.append({"path": path.name, "bytes": len(data), "norm": l2_norm(decode(data))})
    meta = {"codec": codec, "arch": arch, "payloads": payloads}
    (folder / f"payloads-{codec}.json").write_text(json.dumps(meta, indent=1))
    return meta


def run_child(folder: Path, codec: str, nodes: int, *, trace: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedscan.bench.federation.aggregate", "--dir", str(folder)]
    cmd += ["--codec", codec, "--nodes", str(nodes)] + (["--trace"] if trace else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return dict(json.loads(line[len(RESULT_MARK) :]))
    raise RuntimeError(f"aggregation child failed ({proc.returncode}): {proc.stderr[-2000:]}")


def measure_aggregation(
    work: Path,
    arch: str,
    base: Mapping[str, np.ndarray],
    template: Mapping[str, np.ndarray],
    *,
    node_counts: Sequence[int],
    codec: str,
    extra_codecs: Sequence[str],
    distinct: int,
) -> dict[str, Any]:
    """The step for every N with ``codec``, and at the smallest N with each extra codec."""
    folder = work / "aggregation"
    model_bytes = int(sum(np.asarray(v).nbytes for v in base.values()))
    runs: dict[str, Any] = {}
    for c in (codec, *extra_codecs):
        meta = prepare(folder, base, template, c, distinct, arch)
        counts = node_counts if c == codec else node_counts[:1]
        for n in counts:
            timed = run_child(folder, c, n, trace=False)
            traced = run_child(folder, c, n, trace=True)
            row = {
                "codec": c,
                "nodes": n,
                "payload_bytes": meta["payloads"][0]["bytes"],
                "seconds": timed["seconds"],
                "seconds_per_update": timed["seconds"] / n,
                "seconds_with_tracemalloc": traced["seconds"],
                "counted": timed["counted"],
                "peak_traced_mb": traced["peak_traced_bytes"] / 1e6,
                "peak_traced_ratio": traced["peak_traced_bytes"] / model_bytes,
                "phase_peaks_traced_mb": {
                    "load_global": traced["load_peak_bytes"] / 1e6,
                    "streaming": traced["streaming_peak_bytes"] / 1e6,
                    "write_checkpoint": traced["write_peak_bytes"] / 1e6,
                },
                "resident_when_streaming_starts_mb": traced["resident_at_streaming_bytes"] / 1e6,
                "streaming_peak_above_start_mb": traced["streaming_peak_above_start_bytes"] / 1e6,
                "streaming_peak_ratio": traced["streaming_peak_above_start_bytes"] / model_bytes,
                "rss_peak_above_start_mb": timed["rss_peak_above_start_bytes"] / 1e6,
                "rss_peak_ratio": timed["rss_peak_above_start_bytes"] / model_bytes,
                "rss_start_mb": timed["rss_start_bytes"] / 1e6,
            }
            runs[f"{c}_{n}"] = row
            print(
                f"  {c} x{n}: {row['seconds']:.1f} s, traced peak {row['peak_traced_mb']:.0f} MB "
                f"({row['peak_traced_ratio']:.2f} x model), "
                f"RSS +{row['rss_peak_above_start_mb']:.0f} MB, "
                f"streaming +{row['streaming_peak_above_start_mb']:.0f} MB",
                flush=True,
            )
    return {
        "arch": arch,
        "model_mb": model_bytes / 1e6,
        "codec": codec,
        "distinct_payloads": distinct,
        "runs": runs,
    }


# -- child: one aggregation ----------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _measured_fedavg() -> Any:
    """The registered ``fedavg`` strategy, noting the traced peak of its streaming loop."""
    from coordinator.strategy.fedavg import FedAvg

    class MeasuredFedAvg(FedAvg):
        peak_before = 0  # traced peak before streaming began (loading the global checkpoint)
        resident = 0  # traced memory when streaming began
        streaming_peak = 0  # absolute traced peak while streaming
        write_peak = 0  # absolute traced peak from the end of streaming to the checkpoint

        def aggregate(self, global_weights: Any, updates: Any) -> Any:
            if not tracemalloc.is_tracing():
                return super().aggregate(global_weights, updates)
            self.resident, self.peak_before = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            out = super().aggregate(global_weights, updates)
            self.streaming_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            return out

        def hook(self, phase: str) -> None:
            if phase == "checkpoint_written" and tracemalloc.is_tracing():
                self.write_peak = tracemalloc.get_traced_memory()[1]

    return MeasuredFedAvg()


def child(folder: Path, codec: str, nodes: int, trace: bool) -> dict[str, Any]:
    from coordinator.aggregate import aggregate_round
    from coordinator.records import UpdateRow
    from coordinator.spool import load_tensors
    from coordinator.state import State
    from fl_protocol.schemas import RoundConfig

    meta = json.loads((folder / f"payloads-{codec}.json").read_text())
    state_dir = folder / f"state-{codec}-{nodes}-{'traced' if trace else 'timed'}-{os.getpid()}"
    state = State(state_dir)
    weights, wmeta = load_tensors(folder / "global.safetensors")
    state.add_version(0, state.write_checkpoint(0, weights, wmeta))
    del weights
    now = time.time()
    config = RoundConfig(round=1, deadline_ts=now + 600, codec=codec).to_dict()
    state.open_round(1, config, now, now + 600, 0)
    state.set_status(1, "aggregating")
    payloads = meta["payloads"]
    for i in range(nodes):
        p = payloads[i % len(payloads)]
        state.record_update(
            UpdateRow(
                round=1,
                node=f"node-{i:03d}",
                nonce=uuid.uuid4().hex,
                num_samples=20 + i % 7,
                accepted=True,
                reason=None,
                norm=float(p["norm"]),
                spool_path=os.path.relpath(folder / p["path"], state_dir),
                counted_in_aggregate=False,
                received_at=now,
            )
        )
    strategy = _measured_fedavg()
    gc.collect()
    reset = _reset_peak_rss()
    rss0 = (_status_kb("VmRSS") or 0) * 1024
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    result = aggregate_round(
        state,
        state.round(1),
        strategy,
        min_nodes=1,
        max_norm_ratio=10.0,
        metadata={**METADATA, "arch": meta["arch"]},
        now=time.time(),
        hook=strategy.hook,
    )
    seconds = time.perf_counter() - t0
    peak = 0
    if trace:
        peak = max(strategy.peak_before, strategy.streaming_peak, strategy.write_peak)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    hwm = (_status_kb("VmHWM") or 0) * 1024 if reset else 0
    state.close()
    for f in state_dir.rglob("*.safetensors"):
        f.unlink()
    return {
        "nodes": nodes,
        "codec": codec,
        "seconds": seconds,
        "counted": len(result.counted),
        "version": result.version,
        "peak_traced_bytes": peak,
        "load_peak_bytes": strategy.peak_before,
        "resident_at_streaming_bytes": strategy.resident,
        "streaming_peak_bytes": strategy.streaming_peak,
        "streaming_peak_above_start_bytes": max(strategy.streaming_peak - strategy.resident, 0),
        "write_peak_bytes": strategy.write_peak,
        "rss_start_bytes": rss0,
        "rss_peak_above_start_bytes": max(hwm - rss0, 0),
        "rss_peak_reset": reset,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one aggregation step (fedscan bench federation)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--codec", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--trace", action="store_true", help="tracemalloc on (peak; slower)")
    args = p.parse_args(argv)
    out = child(args.dir, args.codec, args.nodes, args.trace)
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
