"""One hostile participant in a real federation (issue 14): `fedscan coordinator run` as a
subprocess on a real Mosquitto, two honest simulated nodes and one hostile one speaking the
real protocol. Round 1: the hostile node claims 1,000,000 samples with delta = -0.99 x the
global weights; round 2: it sets the BatchNorm counters to float32 max. Both rounds complete
from the two honest nodes, every published version is finite, and the model is not shrunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.state import State
from coordinator.strategy.utils import is_counter, l2_norm
from fedscan.brokers.mosquitto import Mosquitto
from tests.coordinator.fakes import tiny_weights
from tests.integration.coordinator_harness import (
    await_rounds,
    kill_if_running,
    make_nodes,
    seed_state,
    start_coordinator,
    status_json,
    stop_all,
    write_config,
)

pytestmark = pytest.mark.integration


def hostile_update(round_id: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Round 1: shrink the model to 1% with a huge sample claim; then: counters to f32 max."""
    if round_id == 1:
        return {
            k: np.array(0.0, np.float32) if is_counter(k, v) else (-0.99 * v).astype(np.float32)
            for k, v in weights.items()
        }
    big = np.finfo(np.float32).max
    return {
        k: np.array(big, np.float32) if is_counter(k, v) else np.zeros_like(v)
        for k, v in weights.items()
    }


def test_three_nodes_one_hostile_every_round_completes_from_the_other_two(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The hostile node is refused in both rounds (norm_outlier at aggregation, then counter
    at once); rounds 1 and 2 are aggregated from a and b; the nodes end on v2, which is finite
    everywhere and keeps the model's norm."""
    config = write_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}", codec="fp32")
    # the tiny numpy model has no ONNX export: do not make the coordinator import torch for it
    text = config.read_text().replace('arch = "cnn2d"\n', 'arch = "cnn2d"\npublish_onnx = false\n')
    config.write_text(text)
    seed_state(config)
    log = tmp_path / "coordinator.log"
    threads = make_nodes(mosquitto.port, "abc", {"a": 10, "b": 20, "c": 1_000_000})
    threads["c"].make_update = hostile_update
    threads["c"].codec = "fp32"  # float32 max does not fit fp16: the encoder would refuse it
    proc = start_coordinator(config, log)
    try:
        for t in threads.values():
            t.node.connect()
            t.start()
        honest = (threads["a"], threads["b"])
        await_rounds(proc, log, lambda: all(t.finished.is_set() for t in honest), 90, "two rounds")
    finally:
        kill_if_running(proc)
        stop_all(threads)
    doc = status_json(config)
    rounds = doc["rounds"]
    assert [(r["round"], r["outcome"], r["version_out"]) for r in rounds] == [
        (1, "aggregated", 1),
        (2, "aggregated", 2),
    ]
    assert [r["counted"] for r in rounds] == [["a", "b"], ["a", "b"]]
    assert rounds[0]["rejected"] == {"c": "norm_outlier"}
    assert rounds[1]["rejected"] == {"c": "counter"}
    state = State(tmp_path / "state", readonly=True)
    try:
        for version in (1, 2):
            weights, _ = state.load_checkpoint(version)
            assert all(np.isfinite(v).all() for v in weights.values())
        final, _ = state.load_checkpoint(2)
    finally:
        state.close()
    assert l2_norm(final) > 0.95 * l2_norm(tiny_weights())
    for t in threads.values():
        assert not t.errors, t.errors
    assert threads["a"].node.manifest.version == 2
    assert "norm_outlier" in log.read_text() and "Traceback" not in log.read_text()
