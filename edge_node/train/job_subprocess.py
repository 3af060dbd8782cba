"""One local training job in a low-priority subprocess.

``python -m edge_node.train.job_subprocess JOB.json``.

The parent (the daemon, or ``fedscan node train``) calls :func:`run_subprocess`: it writes the
job, starts this module with the BLAS/OpenMP thread variables capped to
``job.torch_threads``, streams the child's log lines into its own log, waits, and reads
``<out_dir>/result.json`` back. The child lowers its priority (``os.nice(job.nice)``) and caps
torch's threads before any work, so a radiologist's viewer on the same workstation keeps the
CPU it needs. The parent imports no torch.

``--evaluate`` runs :func:`edge_node.train.trainer.evaluate_incoming` instead: the incoming model on
the local validation side, written to ``<out_dir>/evaluation.json``.

Exit codes: 0 done, the NodeError's exit code on a known failure (message in
``<out_dir>/error.json``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_node.errors import NodeError, TrainingError
from edge_node.train.job import ERROR_FILE, RESULT_FILE, TrainJob, TrainResult
from fl_protocol.metrics import Metrics

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
EVALUATION_FILE = "evaluation.json"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def worker_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: thread caps set before torch is imported, package importable."""
    env = dict(os.environ if base is None else base)
    for var in THREAD_VARS:
        env[var] = str(threads)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(_REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(job: TrainJob, *, evaluate: bool = False) -> subprocess.Popen[str]:
    """Write ``<out_dir>/job.json`` and start the worker on it (stdout+stderr piped, text)."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_FILE, ERROR_FILE, EVALUATION_FILE):
        (job.out_dir / name).unlink(missing_ok=True)
    job_path = job.save(job.out_dir / "job.json")
    cmd = [sys.executable, "-m", "edge_node.train.job_subprocess", str(job_path)]
    if evaluate:
        cmd.append("--evaluate")
    return subprocess.Popen(
        cmd,
        env=worker_env(job.torch_threads),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def _wait(proc: subprocess.Popen[str], on_line: Callable[[str], None] | None) -> int:
    emit = on_line or (lambda line: log.info("train: %s", line))
    try:
        if proc.stdout is None:
            raise TrainingError("the training subprocess has no output pipe")
        for line in proc.stdout:
            emit(line.rstrip("\n"))
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _failure(job: TrainJob, rc: int) -> TrainingError:
    err_path = job.out_dir / ERROR_FILE
    if err_path.is_file():
        try:
            message = str(json.loads(err_path.read_text()).get("error", ""))
        except (OSError, ValueError):
            message = ""
        if message:
            return TrainingError(message)
    return TrainingError(f"the training subprocess failed (exit code {rc}); see the log above")


def run_subprocess(job: TrainJob, *, on_line: Callable[[str], None] | None = None) -> TrainResult:
    """Run ``train_once(job)`` in the low-priority worker and return its result."""
    proc = start(job)
    rc = _wait(proc, on_line)
    if rc != 0:
        raise _failure(job, rc)
    return TrainResult.load(job.out_dir / RESULT_FILE)


def evaluate_subprocess(
    job: TrainJob, *, on_line: Callable[[str], None] | None = None
) -> tuple[Metrics | None, int]:
    """The incoming model (``job.init_weights``) on the local validation side, in the worker."""
    proc = start(job, evaluate=True)
    rc = _wait(proc, on_line)
    if rc != 0:
        raise _failure(job, rc)
    d = json.loads((job.out_dir / EVALUATION_FILE).read_text())
    metrics = Metrics.from_dict(d["metrics"]) if d.get("metrics") else None
    return metrics, int(d["n_val"])


def _lower_priority(job: TrainJob) -> None:
    if job.nice > 0:
        try:
            os.nice(job.nice)
        except OSError as exc:
            log.warning("cannot lower the training priority: %s", exc.strerror)
    import torch

    torch.set_num_threads(job.torch_threads)
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_node.train.job_subprocess")
    parser.add_argument("job", type=Path, help="job JSON written by the parent")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the incoming model")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(levelname)s %(name)s: %(message)s",  # the parent's log adds the time
    )
    job: TrainJob | None = None
    try:
        job = TrainJob.load(args.job)
        _lower_priority(job)
        from edge_node.train import trainer

        if args.evaluate:
            metrics, n_val = trainer.evaluate_incoming(job)
            payload = {"metrics": metrics.to_dict() if metrics else None, "n_val": n_val}
            (job.out_dir / EVALUATION_FILE).write_text(json.dumps(payload, indent=1) + "\n")
        else:
            trainer.train_once(job)
        return 0
    except Exception as exc:  # reported to the parent through error.json
        code = int(getattr(exc, "exit_code", 1))
        known = isinstance(exc, NodeError) or type(exc).__module__.startswith("export")
        if known:
            log.error("%s", exc)
        else:
            log.exception("training failed")
        if job is not None:
            message = str(exc) if known else f"{type(exc).__name__}: {exc}"
            (job.out_dir / ERROR_FILE).write_text(json.dumps({"error": message}) + "\n")
        return code


if __name__ == "__main__":
    sys.exit(main())
