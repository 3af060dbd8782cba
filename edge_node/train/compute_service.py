"""The heavy work the federation client asks for: train, evaluate, export a global model to ONNX.

The federation client itself imports no torch. It hands these jobs to a ``Compute``:

- ``WorkerCompute`` (the daemon): one long-lived low-priority child process
  (``python -m edge_node.train.compute_service serve``) with capped threads runs every job, so
  torch is imported once per node rather than once per job (a few CPU-seconds each on a
  workstation), a radiologist's viewer keeps its CPU, and a crash in torch cannot take the
  daemon down. The child exits after ``idle_exit_s`` without work (its memory goes back) and is
  restarted on the next job; it also exits when the daemon dies (end of its stdin).
- ``InProcessCompute`` (tests, ``fedscan node sync``): the same functions called directly.

Jobs run ``edge_node.train.trainer.train_once`` / ``evaluate_incoming`` and
``export.onnx_export.export_onnx``. Failures raise ``TrainingError`` (train, evaluate) or
``ModelError`` (export). Protocol with the child: one JSON request per stdin line; the child's
log lines go to stdout and are re-logged by the parent; the answer is the stdout line that
starts with ``RESULT_MARK``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_node.errors import ModelError, NodeError, TrainingError
from edge_node.train.job import TrainJob, TrainResult
from fl_protocol.metrics import Metrics

log = logging.getLogger(__name__)

RESULT_MARK = "\x1efedscan-compute-result "
IDLE_EXIT_S = 600.0  # the worker child frees its memory after this long without a job


@dataclass(frozen=True)
class ExportRequest:
    """Export the weights file ``weights`` (safetensors with arch metadata) to ``out``."""

    weights: Path
    out: Path
    model_version: str
    window_center: float = -600.0
    window_width: float = 1500.0
    # ``fedscan.*`` operating-point metadata to write into the export (the coordinator's, from
    # the global manifest), or None: the node then serves at T = 1, threshold 0.5
    calibration: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"], d["out"] = str(self.weights), str(self.out)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportRequest:
        return cls(
            weights=Path(d["weights"]),
            out=Path(d["out"]),
            model_version=str(d["model_version"]),
            window_center=float(d["window_center"]),
            window_width=float(d["window_width"]),
            calibration=None if d.get("calibration") is None else dict(d["calibration"]),
        )


class Compute(Protocol):
    """Where training, evaluation and ONNX export run."""

    def train(self, job: TrainJob) -> TrainResult:
        """``edge_node.train.trainer.train_once(job)``; TrainingError on failure."""
        ...

    def evaluate(self, job: TrainJob) -> tuple[Metrics | None, int]:
        """The model ``job.init_weights`` on the local validation side: (metrics, n_val)."""
        ...

    def export(self, request: ExportRequest) -> Path:
        """Write the ONNX file; ModelError on failure."""
        ...

    def close(self) -> None:
        """Release resources (stop a child process)."""
        ...


def torch_available() -> bool:
    """Whether training and export can run here (the ``train`` extra is installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "onnx"))


@dataclass(frozen=True)
class _Entries:
    """Ready-made ``fedscan.*`` metadata in the shape ``export_onnx(calibration=...)`` takes."""

    entries: dict[str, str]

    def metadata(self) -> dict[str, str]:
        return dict(self.entries)


def export_in_process(request: ExportRequest) -> Path:
    """Rebuild the model from its weights file and export it (imports torch)."""
    from export.errors import ExportError
    from export.onnx_export import export_onnx
    from export.weights import load_weights

    try:
        model = load_weights(request.weights)
        return export_onnx(
            model,
            request.out,
            model_version=request.model_version,
            window_center=request.window_center,
            window_width=request.window_width,
            calibration=None if request.calibration is None else _Entries(request.calibration),
        )
    except ExportError as exc:
        raise ModelError(f"cannot export the global model to ONNX: {exc}") from exc


class InProcessCompute:
    """Runs everything in this process (torch is imported on first use)."""

    def train(self, job: TrainJob) -> TrainResult:
        from edge_node.train.trainer import train_once

        return train_once(job)

    def evaluate(self, job: TrainJob) -> tuple[Metrics | None, int]:
        from edge_node.train.trainer import evaluate_incoming

        return evaluate_incoming(job)

    def export(self, request: ExportRequest) -> Path:
        return export_in_process(request)

    def close(self) -> None:
        pass


# -- the worker child ------------------------------------------------------------------------


def _run_request(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "train":
        from edge_node.train.trainer import train_once

        return train_once(TrainJob.from_dict(req["job"])).to_dict()
    if op == "evaluate":
        from edge_node.train.trainer import evaluate_incoming

        metrics, n_val = evaluate_incoming(TrainJob.from_dict(req["job"]))
        return {"metrics": metrics.to_dict() if metrics else None, "n_val": n_val}
    if op == "export":
        return {"path": str(export_in_process(ExportRequest.from_dict(req["request"])))}
    raise NodeError(f"unknown compute request {op!r}")


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A job holds the loop for minutes and nothing reads stdin meanwhile: when the daemon is
    killed (kill -9, OOM) mid-job, leave at once instead of training on for nobody (and then
    beside the restarted daemon's new worker)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(threads: int, nice: int, idle_exit_s: float) -> int:
    _exit_with_parent()
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("cannot lower the worker priority: %s", exc.strerror)
    import torch

    torch.set_num_threads(max(1, threads))
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    # Import what jobs need while there is no job yet: the first one then starts at once.
    for module in ("edge_node.train.trainer", "export.zoo", "export.onnx_export", "export.weights"):
        importlib.import_module(module)

    log.info("compute worker ready")
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], idle_exit_s)
        if not ready:
            log.info("compute worker idle for %.0f s; exiting", idle_exit_s)
            return 0
        line = sys.stdin.readline()
        if not line:
            return 0  # the parent is gone
        try:
            answer: dict[str, Any] = {"ok": True, "result": _run_request(json.loads(line))}
        except NodeError as exc:
            log.error("%s", exc)
            answer = {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("compute job failed")
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(RESULT_MARK + json.dumps(answer) + "\n")
        sys.stdout.flush()


class WorkerCompute:
    """Jobs in one long-lived low-priority child process (see the module docstring)."""

    def __init__(self, threads: int = 1, nice: int = 10, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.threads = threads
        self.nice = nice
        self.idle_exit_s = idle_exit_s
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _child(self) -> subprocess.Popen[str]:
        if self._closed:
            raise OSError("the compute worker is closed")
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        from edge_node.train.job_subprocess import worker_env

        cmd = [
            sys.executable,
            "-m",
            "edge_node.train.compute_service",
            "serve",
            "--threads",
            str(self.threads),
            "--nice",
            str(self.nice),
            "--idle-exit-s",
            str(self.idle_exit_s),
        ]
        self._proc = subprocess.Popen(
            cmd,
            env=worker_env(self.threads),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        log.info("compute worker started (pid %d)", self._proc.pid)
        return self._proc

    def prestart(self) -> None:
        """Start the child now (it imports torch while the node has nothing for it yet)."""
        with self._lock:
            self._child()

    def _send(self, request: dict[str, Any]) -> subprocess.Popen[str]:
        """Write ``request`` to a live child (starting one, or another if it just exited)."""
        for _attempt in range(2):
            proc = self._child()
            if proc.stdin is None:
                raise OSError("compute worker has no stdin")
            try:
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
                return proc
            except OSError:  # exited (idle) just now
                self._proc = None
        raise OSError("the compute worker does not accept jobs")

    def _call(self, request: dict[str, Any], error: type[NodeError]) -> Any:
        with self._lock:
            for _attempt in range(2):
                try:
                    proc = self._send(request)
                except OSError as exc:
                    raise error(f"cannot run a {request['op']} job: {exc}") from exc
                if proc.stdout is None:
                    raise error("compute worker has no stdout")
                for line in proc.stdout:
                    if line.startswith(RESULT_MARK):
                        answer = json.loads(line[len(RESULT_MARK) :])
                        if not answer.get("ok"):
                            raise error(str(answer.get("error", "compute job failed")))
                        return answer["result"]
                    log.info("worker: %s", line.rstrip("\n"))
                rc = proc.wait()
                self._proc = None
                if rc != 0 or self._closed:
                    raise error(f"compute worker exited (code {rc}) during a {request['op']} job")
                # exit 0 without an answer: it left on its idle timeout as the job arrived
                log.info("compute worker had just left (idle); starting a new one")
            raise error(f"compute worker did not take the {request['op']} job")

    def train(self, job: TrainJob) -> TrainResult:
        return TrainResult.from_dict(
            self._call({"op": "train", "job": job.to_dict()}, TrainingError)
        )

    def evaluate(self, job: TrainJob) -> tuple[Metrics | None, int]:
        d = self._call({"op": "evaluate", "job": job.to_dict()}, TrainingError)
        return (Metrics.from_dict(d["metrics"]) if d["metrics"] else None), int(d["n_val"])

    def export(self, request: ExportRequest) -> Path:
        d = self._call({"op": "export", "request": request.to_dict()}, ModelError)
        return Path(d["path"])

    def close(self) -> None:
        self._closed = True
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # lets an idle child exit by itself
            proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()  # a job is running: the trainer resumes from its checkpoint
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_node.train.compute_service")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run compute jobs read from stdin (one JSON per line)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--nice", type=int, default=10)
    s.add_argument("--idle-exit-s", type=float, default=IDLE_EXIT_S)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s"
    )
    code = _serve(args.threads, args.nice, args.idle_exit_s)
    # Nothing is left to clean up, and tearing down torch's modules takes seconds on a busy
    # machine: leave at once so the daemon's shutdown does not wait for it.
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
