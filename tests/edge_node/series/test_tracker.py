"""SeriesTracker on a real store with an injected clock: quiet time, expected count, late
instances, restart, and the verdict written with how it was made."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edge_node.results.common import SeriesFinding
from edge_node.series.header import SeriesHeader
from edge_node.series.tracker import OperatingPoint, SeriesTracker
from edge_node.store import FileRecord, PredictionRow, SeriesNote, Store

STUDY, SERIES = "1.2.826.0.1.1", "1.2.826.0.1.1.2"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _slice(store: Store, i: int, p: float, *, series: str = SERIES, expected: int | None = None,
           skip: str | None = None) -> None:  # fmt: skip
    sop = f"{series}.{i}"
    note = SeriesNote(
        study_instance_uid=STUDY,
        series_instance_uid=series,
        sop_instance_uid=sop,
        patient_key="k",
        modality="CT",
        header=SeriesHeader(
            patient_name="Doe^Jane",
            patient_id="TP-1",
            series_description="Lung 1.0",
            expected_instances=expected,
        ),
        skip_reason=skip,
    )
    outcome = "skipped" if skip else "predicted"
    rec = FileRecord(f"/in/{sop}.dcm", 1, 1.0, sop, outcome, skip, 1)
    label = "covid" if p >= 0.5 else "non_covid"
    rows = [] if skip else [
        PredictionRow(sop, 0, series, STUDY, "k", rec.path, label, max(p, 1 - p), p, "7",
                      1.0, 1.0, 1.0, 3.0, label)
    ]  # fmt: skip
    store.record_file(rec, rows, note)


def _tracker(store: Store, clock: Clock, published: list[Any] | None = None) -> SeriesTracker:
    def publish(f: SeriesFinding, row: dict[str, Any]) -> dict[str, Any]:
        assert published is not None
        published.append((f, row))
        return {"sr": {"sop_instance_uid": "9.9", "outbox": "pending"}}

    return SeriesTracker(
        store,
        rule="majority",
        top_k=5,
        quiet_time_s=30.0,
        operating_point=lambda: OperatingPoint(0.5, 0.1, False, False, "7"),
        publish=publish if published is not None else None,
        clock=clock,
    )


def test_series_completes_after_the_quiet_time(tmp_path: Path) -> None:
    """Three slices (two covid) arrive; nothing completes before 30 s of quiet; after, the
    series is complete with verdict covid by majority 2/3, the operating point, the slice count,
    the model version, uncalibrated, and the results of publish in results_json."""
    store, clock, published = Store(tmp_path / "s.sqlite"), Clock(), []
    for i, p in enumerate((0.9, 0.8, 0.2)):
        _slice(store, i, p)
    tracker = _tracker(store, clock, published)
    clock.now += 29.0
    assert tracker.tick() == [] and store.series(SERIES)["status"] == "open"
    clock.now += 2.0
    assert tracker.tick() == [SERIES]
    row = store.series(SERIES)
    assert row["status"] == "complete" and row["verdict"] == "covid"
    assert abs(row["score"] - 2 / 3) < 1e-9 and row["threshold"] == 0.5
    assert row["uncertain_band"] == 0.1 and row["rule"] == "majority"
    assert (row["n_slices_used"], row["model_version"], row["calibrated"]) == (3, "7", 0)
    assert row["n_instances"] == 3 and row["completed_at"] is not None
    assert json.loads(row["results_json"])["sr"]["outbox"] == "pending"
    (finding, info), = published  # fmt: skip
    assert finding.verdict == "covid" and len(finding.slices) == 3 and len(info["paths"]) == 3
    assert "uncalibrated" in finding.calibration_text
    study = store.study(STUDY)
    assert (study["patient_name"], study["patient_id"]) == ("Doe^Jane", "TP-1")
    assert tracker.tick() == []  # once


def test_expected_count_completes_at_once(tmp_path: Path) -> None:
    """With NumberOfSlices = 2 in the header the series completes at its second slice, with
    no quiet time; a declared count (the API's) works the same."""
    store, clock = Store(tmp_path / "s.sqlite"), Clock()
    tracker = _tracker(store, clock)
    _slice(store, 0, 0.1, expected=2)
    assert tracker.tick() == []
    _slice(store, 1, 0.2, expected=2)
    assert tracker.tick() == [SERIES] and store.series(SERIES)["verdict"] == "non_covid"
    other = SERIES + ".9"
    _slice(store, 0, 0.9, series=other)
    assert store.set_expected_instances(other, 1)
    assert tracker.tick() == [other]


def test_late_instance_reopens_and_resent_slice_does_not_count(tmp_path: Path) -> None:
    """A slice sent again (same SOP instance) does not count twice; a new slice after
    completion reopens the series, which completes again with the new evidence."""
    store, clock = Store(tmp_path / "s.sqlite"), Clock()
    tracker = _tracker(store, clock)
    _slice(store, 0, 0.9)
    _slice(store, 0, 0.9)
    assert store.series(SERIES)["n_instances"] == 1
    clock.now += 31
    assert tracker.tick() == [SERIES]
    _slice(store, 1, 0.1)
    _slice(store, 2, 0.1)
    assert store.series(SERIES)["status"] == "open"
    clock.now = time.time() + 31
    assert tracker.tick() == [SERIES]
    row = store.series(SERIES)
    assert row["verdict"] == "non_covid" and row["n_slices_used"] == 3


def test_skipped_series_is_not_completed(tmp_path: Path) -> None:
    """A series whose slices were all skipped as not chest stays 'skipped' with the reason."""
    store, clock = Store(tmp_path / "s.sqlite"), Clock()
    tracker = _tracker(store, clock)
    _slice(store, 0, 0.0, skip="not_chest:no_lung_air")
    _slice(store, 1, 0.0, skip="not_chest:no_lung_air")
    clock.now += 60
    assert tracker.tick() == []
    row = store.series(SERIES)
    assert (row["status"], row["skip_reason"], row["n_instances"]) == (
        "skipped", "not_chest:no_lung_air", 2,
    )  # fmt: skip


def test_open_series_resume_after_a_restart(tmp_path: Path) -> None:
    """The state is the table: a series left open by a stopped node completes in the next
    process (a new Store and tracker on the same database)."""
    db = tmp_path / "s.sqlite"
    first = Store(db)
    _slice(first, 0, 0.95)
    first.close()
    again, clock = Store(db), Clock()
    clock.now += 31
    assert _tracker(again, clock).tick() == [SERIES]
    assert again.series(SERIES)["verdict"] == "covid"


def test_no_model_no_decision(tmp_path: Path) -> None:
    """Before any model is served the tracker decides nothing."""
    store = Store(tmp_path / "s.sqlite")
    _slice(store, 0, 0.9)
    t = SeriesTracker(store, rule="majority", top_k=5, quiet_time_s=0.0,
                      operating_point=lambda: None)  # fmt: skip
    assert t.tick() == []
