"""Store: the contract schema in a real SQLite file (WAL), from several threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from edge_node.errors import StoreError
from edge_node.store import FileRecord, PredictionRow, Store


def _row(sop: str, frame: int = 0, label: str = "covid", version: str = "1") -> PredictionRow:
    return PredictionRow(
        sop_instance_uid=sop,
        frame=frame,
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        patient_key="ab" * 32,
        path=f"/inbox/{sop}.dcm",
        label=label,
        confidence=0.9,
        prob_covid=0.9 if label == "covid" else 0.1,
        model_version=version,
        read_ms=1.0,
        preprocess_ms=2.0,
        infer_ms=3.0,
        total_ms=7.0,
    )


def _file(sop: str, outcome: str = "predicted", n: int = 1) -> FileRecord:
    return FileRecord(f"/inbox/{sop}.dcm", 100, 1.5, sop, outcome, None, n)


def test_schema_matches_the_contract(tmp_path: Path) -> None:
    """Other modules read these tables: the columns must be exactly the documented ones."""
    Store(tmp_path / "s.sqlite").close()
    con = sqlite3.connect(tmp_path / "s.sqlite")
    cols = {
        t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in ("files", "predictions")
    }
    assert cols["files"] == [
        "path",
        "size",
        "mtime",
        "sop_instance_uid",
        "outcome",
        "reason",
        "n_frames",
        "updated_at",
    ]
    assert cols["predictions"] == [
        "id",
        "sop_instance_uid",
        "frame",
        "series_instance_uid",
        "study_instance_uid",
        "patient_key",
        "path",
        "label",
        "confidence",
        "prob_covid",
        "model_version",
        "read_ms",
        "preprocess_ms",
        "infer_ms",
        "total_ms",
        "created_at",
        "verdict",  # added by migration (old databases gain it at open)
    ]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO files(path, outcome) VALUES ('x', 'lost')")


def test_record_and_read_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    ids = store.record_file(_file("1.1", n=2), [_row("1.1", 0), _row("1.1", 1, "non_covid")])
    assert len(ids) == 2
    store.record_file(FileRecord("/inbox/bad.dcm", 5, 1.0, None, "quarantined", "not_dicom: x"))
    store.record_file(FileRecord("/inbox/mr.dcm", 5, 1.0, "9.9", "skipped", "modality:MR: x", 1))
    assert store.counts_by_outcome() == {"predicted": 1, "skipped": 1, "quarantined": 1}
    assert store.counts_by_label() == {"covid": 1, "non_covid": 1}
    assert store.predicted_path("1.1") == "/inbox/1.1.dcm"
    assert store.predicted_path("9.9") is None
    assert [r["frame"] for r in store.predictions_for("1.1")] == [0, 1]
    one = store.prediction(ids[1])
    assert one is not None and one["label"] == "non_covid" and one["created_at"] > 0
    assert store.prediction(12345) is None
    assert store.file_signatures()["/inbox/bad.dcm"] == (5, 1.0)
    f = store.file("/inbox/mr.dcm")
    assert f is not None and f["outcome"] == "skipped" and f["reason"].startswith("modality:MR")
    store.close()


def test_one_row_per_slice_and_one_outcome_per_file(tmp_path: Path) -> None:
    """The same slice stored again (new model) replaces its row, keeping the id."""
    store = Store(tmp_path / "s.sqlite")
    (first,) = store.record_file(_file("2.2"), [_row("2.2", version="1")])
    (second,) = store.record_file(_file("2.2"), [_row("2.2", label="non_covid", version="2")])
    assert first == second
    assert store.count_predictions() == 1
    assert store.predictions_for("2.2")[0]["model_version"] == "2"
    store.record_file(FileRecord("/inbox/2.2.dcm", 100, 1.5, "2.2", "skipped", "dup", 1))
    assert store.counts_by_outcome()["predicted"] == 0


def test_recent_predictions_newest_first_and_joined_with_labels(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    for i in range(5):
        store.record_file(_file(f"3.{i}"), [_row(f"3.{i}")])
    recent = store.recent_predictions(limit=3)
    assert [r["sop_instance_uid"] for r in recent] == ["3.4", "3.3", "3.2"]
    assert "human_label" not in recent[0]
    # edge_node.labels creates its table in the same file; the page shows the human label.
    con = sqlite3.connect(tmp_path / "s.sqlite")
    con.execute(
        "CREATE TABLE labels(sop_instance_uid TEXT PRIMARY KEY, label TEXT, path TEXT,"
        " patient_key TEXT, who TEXT, source TEXT, at REAL)"
    )
    con.execute("INSERT INTO labels VALUES ('3.4', 'non_covid', NULL, NULL, 'dr', 'api', 1)")
    con.commit()
    recent = store.recent_predictions(limit=2)
    assert recent[0]["human_label"] == "non_covid" and recent[1]["human_label"] is None


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for i in range(50):
                store.record_file(_file(f"4.{t}.{i}"), [_row(f"4.{t}.{i}")])
                store.recent_predictions(5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert store.count_predictions() == 200
    # another process (a connection of its own) sees committed rows
    con = sqlite3.connect(tmp_path / "s.sqlite")
    assert con.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 200


def test_errors_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        FileRecord("/x", 1, 1.0, None, "lost")
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "dir.sqlite")
    store = Store(tmp_path / "s.sqlite")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.recent_predictions()
