"""Fault injection on a real `fedscan node run` process: kill -9 at awkward moments.

Each test ends with the invariants of the reliability issue, checked from outside the process:
`fedscan node audit --json --wait` (every inbox file has exactly one recorded outcome once the
node caught up), one prediction per slice (UNIQUE(sop_instance_uid, frame) and nothing lost),
``PRAGMA integrity_check``, and every label the API acknowledged still there.
"""

from __future__ import annotations

import csv
import itertools
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from edge_node.labels import LABELS
from fedscan.brokers.mosquitto import Mosquitto
from tests.conftest import ReliabilityProfile
from tests.helpers.dicom_factory import write_ct
from tests.helpers.onnx_models import make_classifier
from tests.helpers.wait import wait_for
from tests.integration.fault_helpers import (
    REPO,
    FileWriter,
    audit_cli,
    check_sqlite,
    fedscan_cmd,
    one_prediction_per_slice,
    query,
)
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration


def small_ct(i: int, path: Path) -> str:
    """A 64x64 CT slice (real CT IOD, rescale to HU) with a fresh SOPInstanceUID."""
    uid = str(generate_uid())
    write_ct(path, sop_uid=uid, rows=64, cols=64, seed=i % 7, patient_id=f"P{i % 5}")
    return uid


def started_node(folder: Path) -> NodeProcess:
    node = NodeProcess(folder)
    make_classifier(node.folder / "models" / "current.onnx", version="1")
    return node.start()


def written_at_least(writer: FileWriter, n: int) -> bool:
    return writer.n_written >= n


def kill_when(node: NodeProcess, predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Start `fedscan node run` and SIGKILL it as soon as ``predicate`` holds (without waiting
    for the API, as ``NodeProcess.start`` does): e.g. in the middle of the catch-up scan."""
    cmd = fedscan_cmd("node", "run", "--config", str(node.toml), "--api-port", "0")
    with open(node.log, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
    node.proc = proc
    try:
        wait_for(lambda: predicate() or proc.poll() is not None, timeout, "the kill point")
        assert proc.poll() is None, f"node exited {proc.returncode} before the kill point"
    finally:
        node.kill()


def test_kill_9_during_a_burst_and_during_catch_up_loses_and_duplicates_nothing(
    tmp_path: Path, reliability: ReliabilityProfile
) -> None:
    """Files keep arriving while the node is SIGKILLed twice mid-burst (and while it is down);
    then a batch lands while it is down and a third SIGKILL hits the catch-up scan right after
    the restart. The last restart finishes every file: audit complete, one prediction per
    slice, every written UID predicted, nothing quarantined."""
    node = started_node(tmp_path / "node")
    total = reliability.burst_files
    writer = FileWriter(
        node.inbox / "burst", total, small_ct, pause_every=max(1, total // 20), pause_s=0.5
    )
    kills: list[tuple[int, int]] = []  # (files written, predictions) at each kill
    try:
        writer.start()
        for _ in range(2):
            goal = min(total - 1, writer.n_written + total // 5)
            wait_for(partial(written_at_least, writer, goal), 120, f"{goal} files written")
            wait_for(lambda: node.n_predictions() > 0, 60, "a first prediction")
            node.kill()
            kills.append((writer.n_written, node.n_predictions()))
            time.sleep(0.5)  # files land while the node is down
            node.start()
        writer.join()
        wait_for(lambda: node.n_predictions() >= total, 120, "the burst predicted")
        node.kill()
        late = FileWriter(node.inbox / "while_down", total // 2, small_ct)
        late.start().join()
        before = node.n_predictions()
        kill_when(node, lambda: node.n_predictions() > before)  # mid catch-up scan
        kills.append((total + late.n_written, node.n_predictions()))
        node.start()
        expected = total + late.n_written
        doc = audit_cli(node.toml, wait_s=120)
        assert doc == {
            "files_seen": expected,
            "predicted": expected,
            "skipped": 0,
            "quarantined": 0,
            "missing": [],
        }, (doc, kills)
        assert one_prediction_per_slice(node.db) == expected
        stored = {r[0] for r in node.query("SELECT sop_instance_uid FROM predictions")}
        assert stored == {uid for _path, uid in writer.written + late.written}
        assert node.query("SELECT COUNT(*) FROM files")[0][0] == expected
        assert not list((node.folder / "quarantine").iterdir())
        assert node.terminate() == 0
        check_sqlite(node.db)
    finally:
        node.kill()
    print(f"kills at (written, predicted): {kills}")


@dataclass
class LabelPoster:
    """Posts labels through the API until the node stops answering, cycling over ``uids`` and
    flipping each slice's label on every pass (so relabels happen too). ``acked`` holds the
    last label whose HTTP 200 came back for each slice (committed, by the API's contract),
    ``in_flight`` the request that was under way when the connection broke."""

    port: int
    uids: list[str]
    acked: dict[str, str] = field(default_factory=dict)
    posts: int = 0
    in_flight: tuple[str, str] | None = None

    def run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as client:
            for k in itertools.count():
                uid = self.uids[k % len(self.uids)]
                label = LABELS[(k // len(self.uids) + k) % 2]
                self.in_flight = (uid, label)
                try:
                    r = client.post(
                        "/api/labels", json={"sop_instance_uid": uid, "label": label, "who": "a"}
                    )
                except httpx.HTTPError:
                    return  # killed
                assert r.status_code == 200, r.text
                self.acked[uid] = label
                self.posts += 1


def labels_table(db: Path) -> dict[str, str]:
    return dict(query(db, "SELECT sop_instance_uid, label FROM labels"))


def check_label_history(db: Path) -> None:
    """Each current label is the last entry of its history (label + history: one commit)."""
    rows = query(
        db,
        "SELECT l.sop_instance_uid, l.label, h.label FROM labels l JOIN label_history h ON h.id ="
        " (SELECT MAX(id) FROM label_history WHERE sop_instance_uid = l.sop_instance_uid)",
    )
    assert len(rows) == len(labels_table(db))
    assert all(cur == last for _u, cur, last in rows)


def test_kill_9_while_labels_are_recorded_keeps_every_committed_label(
    tmp_path: Path, reliability: ReliabilityProfile
) -> None:
    """Labels and relabels posted through the API while the node is SIGKILLed: after the
    restart every slice has exactly its last acknowledged label (the one request in flight may
    or may not have been committed). Then a `fedscan node label
    --csv` import is SIGKILLed halfway while the node runs: the database stays sound, labels
    and their history agree, and the node keeps serving."""
    node = started_node(tmp_path / "node")
    n = reliability.labels
    uids = [small_ct(i, node.inbox / "series" / f"s{i:04d}.dcm") for i in range(n)]
    try:
        wait_for(lambda: node.n_predictions() >= n, 120, f"{n} predictions")
        poster = LabelPoster(node.port, uids)
        thread = threading.Thread(target=poster.run)
        thread.start()
        wait_for(lambda: poster.posts >= n + n // 2, 120, "labels and relabels acknowledged")
        node.kill()
        thread.join(30)
        node.start()
        stored = labels_table(node.db)
        assert poster.in_flight is not None
        uid, label = poster.in_flight  # committed or not: either outcome is allowed
        expected = dict(poster.acked)
        if stored.get(uid) == label:
            expected[uid] = label
        assert stored == expected
        check_label_history(node.db)

        # a CLI import killed halfway, the node running alongside
        table = tmp_path / "relabel.csv"
        with table.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sop_instance_uid", "label"])
            w.writerows([u, "covid" if i % 3 else "non_covid"] for i, u in enumerate(uids))
        relabel = ("node", "label", "--config", str(node.toml), "--csv", str(table))
        cli = subprocess.Popen(
            fedscan_cmd(*relabel, "--who", "dr_cli"),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cli_rows = "SELECT COUNT(*) FROM label_history WHERE who = 'dr_cli'"
        wait_for(
            lambda: cli.poll() is not None or node.query(cli_rows)[0][0] > 0, 60, "CLI started"
        )
        cli.kill()
        cli.wait(10)
        print(f"API posts acked {poster.posts}; CLI rows at its kill {node.query(cli_rows)[0][0]}")
        check_sqlite(node.db)
        check_label_history(node.db)
        assert node.alive() and node.health()["status"] == "ok"
        labels = subprocess.run(
            fedscan_cmd("node", "labels", "--config", str(node.toml), "--json"),
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert labels.returncode == 0, labels.stderr.decode()[-2000:]
        assert node.terminate() == 0
        check_sqlite(node.db)
    finally:
        node.kill()


def test_a_file_that_crashes_the_decoder_does_not_crash_loop_the_node(tmp_path: Path) -> None:
    """A CT file that makes the JPEG-LS decoder abort lands in the inbox: the node must stay up
    (or come back up) and give the file an outcome, not die at every start."""
    import pydicom

    from tests.helpers.dicom_factory import sample_path

    node = started_node(tmp_path / "node")
    try:
        ds = pydicom.dcmread(sample_path("JLSL_16_15_1_1F.dcm"))
        ds.Rows, ds.Modality = 256, "CT"
        poison = node.inbox / "poison.dcm"
        ds.save_as(poison, enforce_file_format=False)
        wait_for(lambda: node.outcome(poison) or not node.alive(), 60, "poison outcome")
        if not node.alive():
            node.start()  # what systemd's Restart=on-failure does
            wait_for(lambda: node.outcome(poison) or not node.alive(), 60, "outcome after restart")
        assert node.alive(), "the node died on the file again after a restart"
        assert (node.outcome(poison) or ("",))[0] == "quarantined"
    finally:
        node.kill()


def children(pid: int) -> set[int]:
    """Direct child processes of ``pid`` (e.g. the node's compute worker)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return out


def serves(node: Any, version: str) -> bool:
    return bool(node.served() == version)


def gone(pids: set[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() for p in pids)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_during_training_and_during_upload(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Two real federated nodes, one round on Mosquitto. Node a is SIGKILLed while it trains
    (its compute worker must not outlive it); node b while its stored update waits for an
    ack (the coordinator is paused with SIGSTOP meanwhile). After restarts a trains again, b
    resends without training again, the round aggregates with both counted once, and both
    serve global v1. Slow: two nodes export and train with torch (minutes on two cores)."""
    from tests.helpers.wait import wait_for as fwait
    from tests.integration.federation_harness import (
        TIMEOUT,
        Coordinator,
        FedNode,
        write_coordinator,
    )

    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    coord = Coordinator(write_coordinator(tmp_path / "coordinator", url, "ab", num_rounds=1))
    nodes = {n: FedNode(tmp_path / n, n, url) for n in "ab"}
    a, b = nodes["a"], nodes["b"]
    logs = (coord.log, a.log, b.log)
    training = "round 1: training from global model 0"
    try:
        coord.start()
        fwait(lambda: coord.round_status(1) == "collecting", TIMEOUT, "round 1", logs)
        coord.signal(signal.SIGSTOP)  # no ack can come until both faults are injected
        a.start()
        b.start()
        fwait(lambda: training in a.log.read_text(), TIMEOUT, "a training", logs)
        assert a.proc is not None
        workers = children(a.proc.pid)
        a.kill()
        wait_for(lambda: gone(workers), 30, "a's compute worker to exit with it")
        fwait(lambda: b.outbox_rounds() == ["round-1"], TIMEOUT, "b's stored update", logs)
        b.kill()
        coord.signal(signal.SIGCONT)
        a.start()
        b.start()
        for node in (a, b):
            fwait(partial(serves, node, "1"), TIMEOUT, f"{node.node_id} on v1", logs)
        assert coord.proc is not None and coord.proc.wait(60) == 0
        doc = coord.status()
        assert doc["global_version"] == 1
        [rnd] = doc["rounds"]
        assert (rnd["outcome"], rnd["version_out"]) == ("aggregated", 1)
        assert rnd["accepted"] == ["a", "b"] and rnd["counted"] == ["a", "b"]
        assert a.log.read_text().count(training) == 2  # the killed training ran again
        assert b.log.read_text().count(training) == 1  # the stored update was resent
        assert a.outbox_rounds() == b.outbox_rounds() == []
        for node in (a, b):
            assert node.terminate() == 0
            check_sqlite(node.db)
            doc = audit_cli(node.toml, wait_s=60)
            assert doc["missing"] == [] and doc["predicted"] == doc["files_seen"]
    finally:
        coord.stop()
        for node in (a, b):
            node.kill()
