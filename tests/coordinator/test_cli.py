"""`fedscan coordinator init | status` through the real console entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedscan.cli import main
from tests.coordinator.fakes import make_delta
from tests.coordinator.world import World


def test_init_writes_a_loadable_config_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["coordinator", "init", str(tmp_path / "c"), "--federation", "h1"]) == 0
    text = (tmp_path / "c" / "coordinator.toml").read_text()
    assert 'federation = "h1"' in text
    assert main(["coordinator", "init", str(tmp_path / "c")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["coordinator", "init", str(tmp_path / "c"), "--force"]) == 0


def test_status_prints_rounds_versions_and_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a round with three updates and two eval reports, status shows the round, the
    accepted / rejected counts and the weighted metrics; --json carries the same."""
    w = World(tmp_path, num_rounds=2)
    w.service.start()
    for i, n in enumerate("abc"):
        w.nodes[n].send_update(make_delta(i), 10 * (i + 1))
    w.nodes["d"].send_update(make_delta(9), 5)  # not an expected node
    w.step()
    w.nodes["a"].send_eval(2, 1, tn=40, fp=10, fn=0, tp=50)
    w.step()
    config = tmp_path / "coordinator.toml"
    config.write_text(f'federation = "test"\nstate_dir = "{w.cfg.state_dir}"\n')

    assert main(["coordinator", "status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "global model v1, 2 round(s)" in out
    assert "aggregated" in out and "collecting" in out
    assert "rejected d: unknown_node" in out
    assert "0.900" in out  # node a's accuracy on v1, reported in round 2

    assert main(["coordinator", "status", "--config", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["global_version"] == 1
    r1, r2 = doc["rounds"]
    assert r1["counted"] == ["a", "b", "c"] and r1["rejected"] == {"d": "unknown_node"}
    assert r2["status"] == "collecting" and r2["weighted"]["accuracy"] == pytest.approx(0.9)
    assert r2["metrics"]["a"]["model_version"] == 1


def test_status_without_state_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('state_dir = "nowhere"\n')
    assert main(["coordinator", "status", "--config", str(config)]) == 4
    assert "no coordinator state" in capsys.readouterr().err
    assert main(["coordinator", "status", "--config", str(tmp_path / "missing.toml")]) == 2


def test_run_refuses_a_bad_rounds_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('state_dir = "s"\n')
    assert main(["coordinator", "run", "--config", str(config), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err
