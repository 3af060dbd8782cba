"""`fedscan bench inference --json OUT.json`: the inference figures, side by side in one run.

1. onnxruntime vs torch eager, same model (``export.zoo.create_model``, random init, exported
   with ``export.onnx_export.export_onnx``), same real CT slices (preprocessed by
   ``edge_node.ingest.preprocess``), same thread count, batch 1 and 16, resnet18 and
   efficientnet_b0.
2. File-to-stored-prediction latency through a real ``fedscan node run`` process serving
   efficientnet_b0: real 512x512 CT slices (new SOP UIDs) written into the inbox one by one;
   latency = ``predictions.created_at`` (stored by the node) - the moment the writer closed
   the file.
3. Sustained slices/s: a 300-slice series folder renamed into the inbox at once; from the
   rename to the last stored prediction.

Weights are random (no internet here): the timings do not depend on the weights, the labels
do, and the JSON says ``"init": "random"``. The machine may be shared: the load average at
start and end is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_node.layout import StateLayout
from fedscan.bench.results import judge, write_result
from fedscan.errors import BenchError
from fedscan.samples import find_samples, missing

REPO_ROOT = Path(__file__).resolve().parents[2]
CT_SAMPLES = ("693_UNCR.dcm", "693_J2KR.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm")
LATENCY_SOURCE = "693_UNCR.dcm"  # real 512x512 CT slice, uncompressed
ARCHS = ("resnet18", "efficientnet_b0")
BATCHES = (1, 16)
TARGETS = {"ort_vs_torch_b1": 2.5, "file_to_prediction_p95_ms": 50.0, "series_slices_per_s": 40.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="threads for both runtimes (default 2)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed run per runtime/config")
    p.add_argument("--latency-files", type=int, default=40, help="slices dropped one by one")
    p.add_argument("--series-files", type=int, default=300, help="slices in the series folder")
    p.add_argument(
        "--samples",
        type=Path,
        help="folder with the pydicom-data CT samples (default: $FEDSCAN_SAMPLES)",
    )
    p.add_argument("--work-dir", type=Path, help="keep models/node here (default: a temp dir)")
    p.add_argument("--skip-node", action="store_true", help="only onnxruntime vs torch")


def _sample(name: str, folder: Path | None) -> Path:
    found = find_samples((name,), folder)
    if not found:
        raise BenchError(missing("--samples", (name,), folder))
    return found[0]


def _slices(folder: Path | None) -> np.ndarray:
    """Every frame of the real CT samples, preprocessed like the node does: [N, 224, 224]."""
    from edge_node.ingest.preprocess import PreprocessParams, prepare

    frames = [
        f for name in CT_SAMPLES for f in prepare(_sample(name, folder), PreprocessParams()).frames
    ]
    return np.stack(frames).astype(np.float32)


def _batch(slices: np.ndarray, n: int) -> np.ndarray:
    idx = np.arange(n) % len(slices)
    return np.ascontiguousarray(slices[idx][:, None])


def _time_calls(fn: Any, seconds: float, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float], batch: int) -> dict[str, float]:
    t = np.asarray(times)
    return {
        "calls": len(t),
        "ms_per_call_p50": float(np.median(t) * 1000),
        "ms_per_call_mean": float(t.mean() * 1000),
        "images_per_s": float(batch * len(t) / t.sum()),
    }


def _measure(model: Any, ort_model: Any, x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Same batch through onnxruntime (``--threads``) and torch eager (1 and ``--threads``).

    The ratio is taken against torch's faster thread setting: on a busy machine torch's
    lock-step OpenMP threads can lose more than they gain.
    """
    import torch

    xt = torch.from_numpy(x)
    torch_runs: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        ref = model(xt).numpy()
        for threads in sorted({1, args.threads}):
            torch.set_num_threads(threads)
            times = _time_calls(lambda: model(xt), args.seconds)
            torch_runs[f"threads_{threads}"] = _summary(times, len(x))
    feeds = {"image": x}
    logits = ort_model.session.run(None, feeds)[0]
    ort = _summary(_time_calls(lambda: ort_model.session.run(None, feeds), args.seconds), len(x))
    best = max(r["images_per_s"] for r in torch_runs.values())
    same = torch_runs[f"threads_{args.threads}"]["images_per_s"]
    return {
        "onnxruntime": ort,
        "torch_eager": torch_runs,
        "ratio": ort["images_per_s"] / best,
        "ratio_same_threads": ort["images_per_s"] / same,
        "max_abs_logit_diff": float(np.abs(logits - ref).max()),
    }


def compare_runtimes(args: argparse.Namespace, work: Path, slices: np.ndarray) -> dict[str, Any]:
    import torch

    from edge_node.serve.inference import OnnxModel
    from export.onnx_export import export_onnx
    from export.zoo import create_model

    out: dict[str, Any] = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = create_model(arch).eval()
        t0 = time.perf_counter()
        path = export_onnx(model, work / f"{arch}.onnx", model_version="bench")
        export_s = time.perf_counter() - t0
        ort_model = OnnxModel(path, intra_op_threads=args.threads)
        out[arch] = {"export_s": export_s, "onnx_mb": path.stat().st_size / 1e6}
        for b in BATCHES:
            r = _measure(model, ort_model, _batch(slices, b), args)
            out[arch][f"b{b}"] = r
            torch_ips = ", ".join(
                f"{k.split('_')[1]} thr {v['images_per_s']:.1f}"
                for k, v in r["torch_eager"].items()
            )
            print(
                f"  {arch} b{b}: ort {r['onnxruntime']['images_per_s']:.1f} img/s, "
                f"torch ({torch_ips}) img/s: x{r['ratio']:.2f} vs the faster torch",
                flush=True,
            )
    return out


class _Node:
    """A real `fedscan node run` on ``folder`` serving ``model``; rows read from its SQLite."""

    def __init__(self, folder: Path, model: Path, threads: int) -> None:
        from edge_node.cli.daemon import init_node

        toml = init_node(folder, force=True)
        text = toml.read_text().replace("intra_op_threads = 2", f"intra_op_threads = {threads}")
        toml.write_text(text)
        self.folder, self.inbox = folder, folder / "inbox"
        self.db = folder / "state" / "node.sqlite"
        cmd = [
            sys.executable,
            "-m",
            "fedscan.cli",
            "--log-level",
            "WARNING",
            "node",
            "run",
            "--config",
            str(toml),
            "--model",
            str(model),
            "--api-port",
            "0",
        ]
        self.log = open(folder / "node.log", "wb")  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        port_file = StateLayout(folder / "state").api_port
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"node exited {self.proc.returncode}; see {folder / 'node.log'}")
            time.sleep(0.01)
        self.start_s = time.perf_counter() - t0
        self.con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the node process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def created_at(self, uid: str) -> float | None:
        row = self.con.execute(
            "SELECT created_at FROM predictions WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
        return float(row[0]) if row else None

    def stop(self) -> int:
        self.con.close()
        self.proc.terminate()
        rc = self.proc.wait(timeout=120)
        self.log.close()
        return rc


def _variants(src: Path, n: int) -> list[tuple[str, bytes]]:
    """``n`` copies of a real slice as file bytes, each with a new SOPInstanceUID."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    out = []
    for _ in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((str(uid), buf.getvalue()))
    return out


def _wait_row(node: _Node, uid: str, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = node.created_at(uid)
        if t is not None:
            return t
        time.sleep(0.002)
    raise BenchError("a dropped slice was not predicted within 60 s; see node.log")


def file_latency(args: argparse.Namespace, node: _Node) -> dict[str, Any]:
    files = _variants(_sample(LATENCY_SOURCE, args.samples), args.latency_files + 3)
    lat: list[float] = []
    for i, (uid, data) in enumerate(files):
        with open(node.inbox / f"lat_{i:04d}.dcm", "wb") as f:
            f.write(data)
        closed = time.time()
        stored = _wait_row(node, uid)
        if i >= 3:  # the first few warm the page cache and the session
            lat.append((stored - closed) * 1000)
        time.sleep(0.05)
    a = np.asarray(lat)
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
        "samples_ms": [round(float(v), 2) for v in a],
    }


def series_throughput(args: argparse.Namespace, node: _Node) -> dict[str, Any]:
    # Staged as a hidden folder inside the inbox (ignored by the watcher), then renamed: the
    # whole series lands at once, as complete files (a rename needs no quiet period).
    staging = node.inbox / ".staging_series"
    staging.mkdir()
    uids = []
    for i, (uid, data) in enumerate(
        _variants(_sample(LATENCY_SOURCE, args.samples), args.series_files)
    ):
        (staging / f"slice_{i:04d}.dcm").write_bytes(data)
        uids.append(uid)
    os.sync()
    cpu0 = node.cpu_s()
    t0 = time.time()
    os.rename(staging, node.inbox / "series")  # the whole series lands at once
    last = max(_wait_row(node, uid, timeout=600) for uid in uids)
    elapsed = last - t0
    cpu_per_slice = (node.cpu_s() - cpu0) / len(uids)
    cores = os.cpu_count() or 1
    return {
        "n": len(uids),
        "elapsed_s": elapsed,
        "slices_per_s": len(uids) / elapsed,
        # Load-independent: what the node spends per slice, and the rate that would allow
        # with every core to itself (an upper bound, not a measurement).
        "node_cpu_ms_per_slice": cpu_per_slice * 1000,
        "cpu_bound_slices_per_s": cores / cpu_per_slice if cpu_per_slice > 0 else None,
    }


def import_cost() -> dict[str, float]:
    """Wall and CPU seconds of a fresh interpreter importing the whole inference path."""
    import resource

    code = (
        "import edge_node.daemon, edge_node.ingest.preprocess, edge_node.serve.api,"
        " edge_node.cli.daemon"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def _machine() -> dict[str, Any]:
    import onnxruntime

    cpu = ""
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else ""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def run(args: argparse.Namespace) -> int:
    # torch's OpenMP threads spin by default; onnxruntime's are told not to. Same rule for both
    # (must be set before torch is imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import export.zoo  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"the export package (torch, timm) is needed: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="fedscan-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {
            "init": "random",
            "machine": _machine(),
            "threads": args.threads,
            "loadavg_start": os.getloadavg(),
        }
        result["daemon_import"] = import_cost()
        slices = _slices(args.samples)
        result["slices"] = {"n": len(slices), "from": list(CT_SAMPLES)}
        print(f"onnxruntime vs torch eager ({args.threads} threads, {len(slices)} real CT slices)")
        runtimes = compare_runtimes(args, work, slices)
        result["ort_vs_torch"] = runtimes
        result["ort_vs_torch_b1"] = runtimes["efficientnet_b0"]["b1"]["ratio"]
        result["ort_vs_torch_b16"] = runtimes["efficientnet_b0"]["b16"]["ratio"]
        policy = os.environ.get("OMP_WAIT_POLICY")
        result["ratio_definition"] = (
            "onnxruntime images/s (--threads, no spinning) / torch eager images/s at its faster "
            f"of 1 and --threads threads (OMP_WAIT_POLICY={policy}); same model, same batch"
        )
        if not args.skip_node:
            print("file -> stored prediction through `fedscan node run` (efficientnet_b0)")
            node = _Node(work / "node", work / "efficientnet_b0.onnx", args.threads)
            try:
                result["node_start_s"] = node.start_s
                lat = file_latency(args, node)
                result["file_to_prediction"] = lat
                result["file_to_prediction_p50_ms"] = lat["p50_ms"]
                result["file_to_prediction_p95_ms"] = lat["p95_ms"]
                print(
                    f"  p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms ({lat['n']} slices)"
                )
                series = series_throughput(args, node)
                result["series"] = series
                result["series_slices_per_s"] = series["slices_per_s"]
                print(
                    f"  series: {series['n']} slices in {series['elapsed_s']:.2f} s = "
                    f"{series['slices_per_s']:.1f} slices/s; node CPU "
                    f"{series['node_cpu_ms_per_slice']:.1f} ms/slice"
                )
            finally:
                result["node_exit_code"] = node.stop()
        result["loadavg_end"] = os.getloadavg()
        result["targets"] = judge(result, TARGETS, is_ceiling=lambda k: k.endswith("_ms"))
    return write_result(result, args.json)
