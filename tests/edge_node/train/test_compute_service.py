"""The compute worker child: jobs go to one long-lived process that survives a failed job.

One real child process (it imports torch once), two real exports: a broken weights file fails
with ModelError and the same child then exports a good one, which onnxruntime serves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import save_file

from edge_node.errors import ModelError
from edge_node.serve.inference import OnnxModel
from edge_node.train.compute_service import ExportRequest, WorkerCompute
from tests.helpers.federation import cnn2d_weights, weights_payload


def test_worker_exports_survives_a_failed_job_and_closes(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(weights_payload(cnn2d_weights(0), 4))
    broken = tmp_path / "broken.safetensors"
    save_file(cnn2d_weights(0), str(broken), metadata={"arch": "no_such_arch", "texture_dim": "0"})

    worker = WorkerCompute(threads=1, nice=0)
    try:
        with pytest.raises(ModelError, match="no_such_arch"):
            worker.export(ExportRequest(broken, tmp_path / "broken.onnx", "4"))
        proc = worker._proc
        assert proc is not None and proc.poll() is None  # still the same, still alive

        out = worker.export(ExportRequest(good, tmp_path / "good.onnx", "4"))
        assert worker._proc is proc
        assert OnnxModel(out, 1).info.model_version == "4"
    finally:
        worker.close()
    assert proc.poll() is not None
    with pytest.raises(ModelError):  # closed: no new child is started behind our back
        worker.export(ExportRequest(good, tmp_path / "again.onnx", "4"))
