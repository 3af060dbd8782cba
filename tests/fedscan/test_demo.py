"""fedscan demo's parts: data plan, configuration files, feeder, child processes, live table.
(The whole demo, with real processes and MQTT, runs in tests/integration/test_demo.py.)"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
import tomllib
from pathlib import Path

import pytest

from coordinator.config import load_config as load_coordinator_config
from edge_node.config import load_config as load_node_config
from fedscan.demo import progress, setup
from fedscan.demo.config import DemoConfig
from fedscan.demo.errors import DemoError
from fedscan.demo.feeder import Feeder, schedule
from fedscan.demo.orchestrator import MARKER, prepare_out
from fedscan.demo.plan import make_plan, synthetic_index
from fedscan.demo.processes import Supervisor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, Path]:
    """A synthetic set for 3 nodes x 8 labelled slices + 3 x 4 test slices (64 px)."""
    folder = tmp_path_factory.mktemp("demo-data")
    config = DemoConfig(out=folder / "out", labelled_per_node=8, test_per_node=4,
                        synthetic_size=256)  # fmt: skip
    return config, synthetic_index(config, folder / "synthetic")


def test_plan_deals_patients_to_one_hospital_and_keeps_test_unlabelled(
    tiny: tuple[DemoConfig, Path],
) -> None:
    """Each patient's labelled slices go to one hospital; test patients are never labelled
    anywhere, and are dealt to the inboxes unlabelled; all test slices are the test set."""
    config, index = tiny
    plan = make_plan(config, index, "synthetic")
    assert [p.node for p in plan.nodes] == ["hospital-1", "hospital-2", "hospital-3"]
    owner: dict[str, str] = {}
    for p in plan.nodes:
        assert p.labelled, p.node
        for r in p.labelled:
            assert owner.setdefault(r.patient_key, p.node) == p.node
    test_patients = {r.patient_key for r in plan.test}
    assert not test_patients & set(owner)
    assert {r.path for p in plan.nodes for r in p.unlabelled} == {r.path for r in plan.test}
    assert plan.test_summary()["slices"] == len(plan.test) >= 6
    # the same settings reuse the generated set
    assert synthetic_index(config, index.parent) == index


def test_config_files_load_with_the_daemons_own_loaders(tmp_path: Path) -> None:
    """node.toml from `fedscan node init` + the demo's edits, and coordinator.toml: both load,
    federation on, the broker's port and the round settings in place."""
    config = DemoConfig(out=tmp_path, rounds=2, local_epochs=2, nodes=2)
    private, public = setup.write_keys(tmp_path / "keys")
    node = setup.node_toml(config, tmp_path / "n1", "hospital-1", 18830, public)
    cfg = load_node_config(node)
    assert cfg.node_id == "hospital-1" and cfg.federation.enabled
    assert cfg.federation.broker == "mqtt://127.0.0.1:18830"
    assert cfg.federation.coordinator_public_key == public
    assert cfg.api.port == 0 and cfg.training.epochs == 4
    assert (tmp_path / "n1" / "inbox").is_dir()
    coord = setup.coordinator_toml(config, tmp_path / "c", 18830, private, labels_needed=5)
    cc = load_coordinator_config(coord)
    assert cc.broker.url == "mqtt://127.0.0.1:18830" and cc.signing_key == private
    assert cc.rounds.num_rounds == 2 and cc.rounds.min_labels == 5
    assert cc.rounds.expected_nodes == ("hospital-1", "hospital-2")


def test_dump_toml_round_trips() -> None:
    doc = {"a": 1, "b": 'x"y', "c": [1, 2], "d": None, "t": {"e": True, "f": 0.5, "g": {}}}
    assert tomllib.loads(setup.dump_toml(doc)) == {
        "a": 1, "b": 'x"y', "c": [1, 2], "t": {"e": True, "f": 0.5, "g": {}}
    }  # fmt: skip


def test_feeder_drips_every_slice_into_place(tiny: tuple[DemoConfig, Path], tmp_path: Path) -> None:
    """Labelled slices land in inbox/labelled/<label>/, unlabelled ones in inbox/, each once,
    complete (byte-equal to the source), and nothing is left in the staging folder."""
    config, index = tiny
    plan = make_plan(config, index, "synthetic")
    inboxes = {p.node: tmp_path / p.node / "inbox" for p in plan.nodes}
    drops = schedule(plan.nodes, inboxes, plan.base, duration_s=0.3, seed=1)
    n = sum(len(p.labelled) + len(p.unlabelled) for p in plan.nodes)
    assert len(drops) == n == len({d.dst for d in drops})
    assert all(0 <= d.at_s <= 0.3 for d in drops)
    feeder = Feeder(drops, tmp_path / "staging")
    feeder.start()
    assert feeder.wait(30) and feeder.error is None
    for d in drops:
        rel = d.dst.relative_to(inboxes[d.node])
        assert (rel.parts[0] == "labelled") == d.labelled
        assert d.dst.read_bytes() == d.src.read_bytes()
    assert not list((tmp_path / "staging").iterdir())
    assert sum(sum(v.values()) for v in feeder.delivered.values()) == n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_supervisor_stops_children_and_grandchildren_on_error(tmp_path: Path) -> None:
    """A child that started a grandchild: leaving the block with an exception stops both."""
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(RuntimeError), Supervisor(tmp_path / "logs") as sup:
        child = sup.start("sleeper", [sys.executable, "-c", code])
        deadline = time.monotonic() + 30
        while not child.log_path.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(child.log_path.read_text().split()[0])
        assert _alive(grandchild)
        raise RuntimeError("the demo failed")
    assert child.poll() is not None
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)  # reaped by init once killed
    assert not _alive(grandchild) or _is_zombie(grandchild)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


def test_supervisor_child_gets_sigterm_first(tmp_path: Path) -> None:
    """SIGTERM comes first, so a daemon can drain: a child that exits 0 on SIGTERM does."""
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    sup = Supervisor(tmp_path)
    child = sup.start("polite", [sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while "ready" not in child.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sup.stop(child) == 0
    assert child.proc.returncode != -signal.SIGKILL


def test_out_folder_is_reused_only_when_it_is_a_demo_folder(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(DemoError):
        prepare_out(other)
    demo = tmp_path / "demo"
    prepare_out(demo)
    (demo / "nodes").mkdir()
    (demo / "data").mkdir()
    prepare_out(demo)
    assert (demo / MARKER).is_file() and (demo / "data").is_dir()
    assert not (demo / "nodes").exists()


def test_live_table_redraws_in_place_and_log_mode_prints_changes() -> None:
    nodes = [progress.NodeView("hospital-1", 5, 10, 3, 4, 1, 3, "2", 1, True)]
    coord = progress.CoordinatorView(2, 3, "collecting", 1, 1, 0.75, True)
    lines = progress.render(nodes, coord, 12.0, "federating")
    assert "hospital-1" in lines[2] and "5/10" in lines[2] and "1 skipped/quarantined" in lines[2]
    assert "round 2/3" in lines[3] and "75.0%" in lines[3]
    tty = io.StringIO()
    table = progress.LiveTable(tty, live=True)
    table.show(lines)
    table.show(lines)
    assert tty.getvalue().count(f"\x1b[{len(lines)}F") == 1  # second drawing moved back up
    log = io.StringIO()
    table = progress.LiveTable(log, live=False, every_s=0)
    table.show(lines)
    table.show(lines)  # unchanged: not printed again
    assert log.getvalue().count("hospital-1") == 1


def test_capped_share_keeps_both_classes(tiny: tuple[DemoConfig, Path]) -> None:
    """With --dataset and --labelled-per-node, a hospital's share is cut by whole patients
    with the classes taken in turn (the index lists one class folder first)."""
    base, index = tiny
    config = DemoConfig(out=base.out, dataset=index.parent, labelled_per_node=6)
    plan = make_plan(config, index, "imported")
    for p in plan.nodes:
        labels = {r.label for r in p.labelled}
        assert labels == {"covid", "non_covid"}, p.node
        assert len(p.labelled) <= 6
