"""`fedscan bench ...`: the command surface (fast) and a miniature inference run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedscan.cli import main


@pytest.mark.slow
@pytest.mark.integration
def test_inference_bench_writes_every_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny settings (a few slices, short timings): the JSON has the figures README quotes."""
    pytest.importorskip("timm")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the bench sets, undone afterwards
    out = tmp_path / "inference.json"
    rc = main(
        [
            "bench",
            "inference",
            "--json",
            str(out),
            "--seconds",
            "0.2",
            "--latency-files",
            "4",
            "--series-files",
            "12",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["init"] == "random" and r["machine"]["cores"] >= 1
    for key in ("ort_vs_torch_b1", "file_to_prediction_p95_ms", "series_slices_per_s"):
        assert isinstance(r[key], float) and r[key] > 0
    for arch in ("resnet18", "efficientnet_b0"):
        for b in ("b1", "b16"):
            assert r["ort_vs_torch"][arch][b]["max_abs_logit_diff"] < 1e-3
            assert set(r["ort_vs_torch"][arch][b]["torch_eager"]) == {"threads_1"}
    assert r["series"]["n"] == 12 and r["file_to_prediction"]["n"] == 4
    assert r["node_exit_code"] == 0
