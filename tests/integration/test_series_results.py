"""A real `fedscan node run` process groups slices into series: a chest CT series completes
after its quiet time and its DICOM SR and Secondary Capture wait in the outbox; a head CT
series (no header hint: the content probe decides) is skipped with the reason recorded."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.helpers.dicom_factory import sample_path, write_series
from tests.helpers.onnx_models import make_classifier
from tests.helpers.study_factory import new_study, write_chest_series
from tests.helpers.wait import wait_for
from tests.integration.node_process import NodeProcess

pytestmark = pytest.mark.integration

SERIES_TOML = """
[series]
quiet_time_s = 1.0
check_interval_s = 0.2
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "node", extra_toml=SERIES_TOML, chest_only=True)
    make_classifier(tmp_path / "node" / "models" / "current.onnx", version="3")
    n.start()
    yield n
    try:
        assert n.terminate() == 0
    finally:
        n.kill()


def _deliver(paths: list[Path], dst: Path) -> list[Path]:
    """Move finished files into the inbox (rename: the watcher sees whole files)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        os.replace(p, dst / p.name)
        out.append((dst / p.name).resolve())
    return out


def test_chest_series_gets_results_head_series_is_skipped(
    node: NodeProcess, tmp_path: Path
) -> None:
    """Four chest slices and two head slices arrive; the chest series completes (verdict,
    rule, threshold, 'uncalibrated' model state) and an SR + SC referencing it are queued in
    state/outbox/pending; the head slices are skipped as not_chest:no_lung_air, their series
    row says skipped, and no prediction exists for them."""
    study = new_study("Doe^Jane", "TP-001", "ACC-1001", "CT THORAX", "20240102")
    chest = _deliver(
        write_chest_series(tmp_path / "c", study, hu_offsets=[0.0, 20.0, 40.0, 60.0]),
        node.inbox / "chest",
    )
    head_src = write_series(sample_path("693_UNCR.dcm"), tmp_path / "h", 2)
    head = _deliver(head_src, node.inbox / "head")
    chest_series = str(pydicom.dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
    head_series = str(pydicom.dcmread(head[0], stop_before_pixels=True).SeriesInstanceUID)

    def complete() -> list[tuple[object, ...]]:
        return node.query(
            "SELECT verdict, rule, threshold, uncertain_band, n_slices_used, calibrated,"
            " results_json FROM series WHERE series_instance_uid = ? AND status = 'complete'"
            " AND results_json IS NOT NULL",
            (chest_series,),
        )

    ((verdict, rule, threshold, band, n_used, calibrated, results),) = wait_for(
        complete, 60, "the chest series complete with results"
    )
    assert verdict in ("covid", "non_covid", "uncertain") and rule == "vote"  # the default
    assert (threshold, band, n_used, calibrated) == (0.5, 0.1, 4, 0)
    res = json.loads(results)
    assert {"sr", "sc"} <= set(res), res
    pending = node.folder / "state" / "outbox" / "pending"
    files = {f.name: pydicom.dcmread(f) for f in pending.glob("*.dcm")}
    assert res["sr"]["file"] in files and res["sc"]["file"] in files
    sr = files[res["sr"]["file"]]
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study.study_uid
    assert sr.PatientName == "Doe^Jane" and "uncalibrated" in sr.SeriesDescription
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == chest_series and len(refs.ReferencedSOPSequence) == 4
    verdicts = node.query(
        "SELECT verdict FROM predictions WHERE series_instance_uid = ?", (chest_series,)
    )
    assert len(verdicts) == 4 and all(v in ("covid", "non_covid", "uncertain") for (v,) in verdicts)

    for path in head:
        outcome = wait_for(lambda p=path: node.outcome(p), 30, "head slice outcome")
        assert outcome[0] == "skipped" and outcome[1].startswith("not_chest:no_lung_air")
    ((status, reason, n),) = node.query(
        "SELECT status, skip_reason, n_instances FROM series WHERE series_instance_uid = ?",
        (head_series,),
    )
    assert (status, reason, n) == ("skipped", "not_chest:no_lung_air", 2)
    assert node.query(
        "SELECT COUNT(*) FROM predictions WHERE series_instance_uid = ?", (head_series,)
    ) == [(0,)]
    ((name, pid, acc),) = node.query(
        "SELECT patient_name, patient_id, accession_number FROM studies"
        " WHERE study_instance_uid = ?",
        (study.study_uid,),
    )
    assert (name, pid, acc) == ("Doe^Jane", "TP-001", "ACC-1001")
    shutil.rmtree(tmp_path / "c", ignore_errors=True)


@pytest.mark.slow
def test_open_series_completes_after_a_restart(tmp_path: Path) -> None:
    """A node stopped (SIGTERM) while a predicted series waits out its quiet time leaves it
    open; the next start of the same node completes it and queues its results."""
    toml = SERIES_TOML.replace("quiet_time_s = 1.0", "quiet_time_s = 10.0")  # > stop time
    node = NodeProcess(tmp_path / "node", extra_toml=toml, chest_only=True)
    make_classifier(tmp_path / "node" / "models" / "current.onnx", version="3")
    study = new_study("Roe^Rick", "TP-002", "ACC-2", "CT CHEST", "20240103")
    try:
        node.start()
        chest = _deliver(
            write_chest_series(tmp_path / "c", study, hu_offsets=[0.0, 30.0]),
            node.inbox / "chest",
        )
        uid = str(pydicom.dcmread(chest[0], stop_before_pixels=True).SeriesInstanceUID)
        wait_for(
            lambda: (
                node.query("SELECT COUNT(*) FROM predictions WHERE series_instance_uid = ?", (uid,))
                == [(2,)]
            ),
            30,
            "both slices predicted",
        )
        assert node.terminate() == 0
        assert node.query("SELECT status FROM series WHERE series_instance_uid = ?", (uid,)) == [
            ("open",)
        ]
        node.start()
        wait_for(
            lambda: node.query(
                "SELECT 1 FROM series WHERE series_instance_uid = ? AND status = 'complete'"
                " AND results_json LIKE '%\"sr\"%'",
                (uid,),
            ),
            60,
            "the series completed by the restarted node",
        )
        assert node.terminate() == 0
    finally:
        node.kill()
