"""`fedscan bench federation` at --quick sizes: every part runs on real components (codecs,
chunking, the coordinator's aggregation in a child process, a real Mosquitto with real
federation clients and a real coordinator process) and writes its figures to the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedscan.bench.federation.command import targets
from fedscan.brokers.mosquitto import mosquitto_binary
from fedscan.cli import main


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def run_bench(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "fed.json"
    argv = ["bench", "federation", "--quick", "--threads", "1", "--json", str(out)]
    argv += ["--work-dir", str(tmp_path / "work"), "--timeout", "120", *extra]
    rc = main(argv)
    return rc, json.loads(out.read_text())


def test_quick_run_measures_bytes_accuracy_aggregation_and_a_swarm_round(tmp_path: Path) -> None:
    """Without UCSD data the accuracy part falls back to the synthetic CT set; the swarm part
    runs when Mosquitto is installed and is skipped with its reason otherwise."""
    rc, doc = run_bench(
        tmp_path,
        "--dataset",
        str(tmp_path / "no-ucsd-here"),
        "--parts",
        "bytes",
        "accuracy",
        "aggregation",
        "swarm",
    )
    assert rc == 0, doc["errors"]
    assert doc["init"] == "random" and doc["quick"] is True
    assert len(doc["loadavg_start"]) == 3 and doc["machine"]["cores"] >= 1

    # 1. bytes: what the node publishes (manifest + chunks), smaller with every codec step
    assert doc["bytes_arch"] == "cnn2d"
    b32, b16, b8 = (doc[f"bytes_per_round_{c}"] for c in ("fp32", "fp16", "int8"))
    assert b32 > b16 > b8 > 0
    assert doc["bytes_ratio_fp32_over_int8"] == pytest.approx(b32 / b8)
    rows = doc["bytes"]["per_model"]["cnn2d"]["codecs"]
    assert rows["fp32"]["relative_l2_error"] == 0.0
    assert 0 < rows["int8"]["relative_l2_error"] < 0.05
    assert rows["int8_head"]["tensors"] < rows["int8"]["tensors"]
    assert all(r["mqtt_bytes"] > r["bytes"] for r in rows.values())

    # 2. accuracy: the same three updates through every codec, fp32 as the reference
    acc = doc["accuracy"]["per_model"]["cnn2d"]
    assert "synthetic" in doc["accuracy"]["data"]
    assert set(acc["codecs"]) == {"fp32", "fp16", "int8", "int8_channel"}
    assert acc["codecs"]["fp32"]["accuracy_diff_points_vs_fp32"] == 0.0
    assert acc["codecs"]["fp32"]["agreement_with_fp32"] == 1.0
    assert 0.0 <= acc["codecs"]["int8"]["agreement_with_fp32"] <= 1.0
    assert acc["codecs"]["int8"]["update_relative_l2_error_vs_fp32"] > 0
    assert len(acc["hospitals"]) == 3

    # 3. aggregation: every update counted; peak memory measured in the child process
    for n in (2, 3):
        run = doc["aggregation"]["runs"][f"fp16_{n}"]
        assert run["counted"] == n
        assert doc[f"aggregation_peak_mb_{n}_nodes"] > 0
        assert doc[f"aggregation_peak_ratio_{n}_nodes"] > 1.0  # accumulator + decoded update

    # 5. swarm
    if mosquitto_binary() is None:
        assert "mosquitto" in doc["skipped"]["swarm"]
    else:
        assert doc["nodes_completed_4"] == 4
        assert doc["swarm"]["nodes_acked_complete"] == 4
        assert doc["swarm"]["outcome"] == "aggregated"
    assert "| measure |" in doc["summary_markdown"]


def test_parts_needing_a_broker_are_skipped_with_the_reason(tmp_path: Path) -> None:
    """No Mosquitto binary: the round and swarm parts are skipped, not failed."""
    rc, doc = run_bench(
        tmp_path, "--parts", "round", "swarm", "--mosquitto", str(tmp_path / "no-mosquitto")
    )
    assert rc == 0
    assert set(doc["skipped"]) == {"round", "swarm"}
    assert all("mosquitto not found" in why for why in doc["skipped"].values())
    assert doc["errors"] == {}
    assert doc["targets"]["protocol_overhead_s"]["met"] is None


def test_targets_compare_each_figure_with_its_threshold() -> None:
    doc = {
        "bytes_ratio_fp32_over_int8": 3.99,
        "accuracy_abs_diff_points_int8": 0.6,
        "aggregation_peak_ratio_100_nodes": 2.5,
        "nodes_completed_100": 100,
    }
    t = targets(doc)
    assert t["bytes_ratio_fp32_over_int8"]["met"] is True
    assert t["accuracy_abs_diff_points_int8"]["met"] is False
    assert t["aggregation_peak_ratio_100_nodes"]["met"] is True
    assert t["protocol_overhead_s"]["met"] is None  # not measured
    assert t["nodes_completed_100"]["met"] is True


@pytest.mark.integration
@pytest.mark.slow
def test_quick_protocol_round_with_real_node_processes(tmp_path: Path) -> None:
    """Two real node federation processes (compute worker, real training) and the real
    coordinator over Mosquitto: one round, both updates counted, overhead measured."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    rc, doc = run_bench(tmp_path, "--parts", "round")
    assert rc == 0, doc["errors"]
    (rnd,) = doc["round"]["rounds"]
    assert rnd["outcome"] == "aggregated" and rnd["counted"] == ["node1", "node2"]
    assert rnd["slowest_training_s"] > 0
    assert doc["protocol_overhead_s"] == pytest.approx(rnd["wall_s"] - rnd["slowest_training_s"])
