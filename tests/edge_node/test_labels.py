"""Labels: set / relabel with history, folder convention, CSV import, resolution via the store."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from edge_node.errors import LabelError
from edge_node.ingest.preprocess import read_meta
from edge_node.labels import LabelBook, normalize_label
from edge_node.store import FileRecord, PredictionRow, Store
from tests.helpers.dicom_factory import CT_SAMPLE, sample_path
from tests.helpers.training import write_slice


@pytest.fixture
def ct(tmp_path: Path):
    """A factory of real CT slices (copies of 693_UNCR with new UIDs and patients)."""
    src = sample_path(CT_SAMPLE)
    counter = iter(range(10_000))

    def make(dst: Path, patient: str = "P1") -> tuple[Path, str]:
        uid = write_slice(src, dst, patient_id=patient, covid=False, seed=next(counter))
        return dst, uid

    return make


def test_set_relabel_keeps_history_and_audit(tmp_path: Path, ct) -> None:
    """A radiologist labels a slice covid, a colleague corrects it: both kept, in order."""
    path, uid = ct(tmp_path / "in" / "a.dcm", patient="PX")
    book = LabelBook(tmp_path / "node.sqlite")
    before = time.time()
    assert book.set(uid, "covid", who="dr_a", source="cli", path=path) is True
    assert book.set(uid, "COVID", who="dr_a", source="cli", path=path) is False  # same label
    assert book.set(uid, "non-covid", who="dr_b", source="api") is True  # path known already
    rec = book.get(uid)
    assert rec is not None
    assert (rec.label, rec.who, rec.source, rec.path) == ("non_covid", "dr_b", "api", str(path))
    assert rec.patient_key == read_meta(path).patient_key  # read from the header
    assert rec.at >= before
    hist = book.history(uid)
    assert [(h.label, h.previous, h.who) for h in hist] == [
        ("covid", None, "dr_a"),
        ("non_covid", "covid", "dr_b"),
    ]
    assert book.count_since(before - 1) == 1
    assert book.count_since(time.time() + 1) == 0
    assert book.counts() == {"non_covid": 1, "covid": 0}
    book.close()


def test_unknown_label_and_unknown_slice_are_refused(tmp_path: Path, ct) -> None:
    book = LabelBook(tmp_path / "node.sqlite")
    path, uid = ct(tmp_path / "a.dcm")
    with pytest.raises(LabelError, match="unknown label"):
        book.set(uid, "pneumonia", who="dr", source="cli", path=path)
    with pytest.raises(LabelError, match="unknown slice"):
        book.set("1.2.3.4.5", "covid", who="dr", source="api")
    with pytest.raises(LabelError):
        book.set(uid, "covid", who="dr", source="telepathy", path=path)
    with pytest.raises(LabelError):
        normalize_label("")
    assert book.all() == []


def test_uid_resolves_through_the_stores_tables(tmp_path: Path, ct) -> None:
    """The API labels by UID: the path and patient key come from the daemon's predictions."""
    db = tmp_path / "state" / "node.sqlite"
    path, uid = ct(tmp_path / "inbox" / "x.dcm", patient="PY")
    key = read_meta(path).patient_key
    store = Store(db)
    store.record_file(
        FileRecord(str(path), path.stat().st_size, path.stat().st_mtime, uid, "predicted", None, 1),
        [PredictionRow(uid, 0, "1.2", "1.3", key, str(path), "covid", 0.9, 0.9, "0", 1, 1, 1, 3)],
    )
    store.close()
    with LabelBook(db) as book:
        assert book.locate(uid) == (str(path), key)
        assert book.set(uid, "covid", who="dr", source="api")
        rec = book.get(uid)
    assert rec is not None and (rec.path, rec.patient_key) == (str(path), key)


def test_folder_convention_is_idempotent_and_respects_people(tmp_path: Path, ct) -> None:
    """Files dropped in labelled/covid and labelled/non_covid are labelled once; moving a file
    relabels it; a label a person gave another way wins over the folder."""
    inbox = tmp_path / "inbox"
    _, uid_a = ct(inbox / "labelled" / "covid" / "a.dcm", "P1")
    b, uid_b = ct(inbox / "labelled" / "non_covid" / "b.dcm", "P2")
    _, uid_c = ct(inbox / "labelled" / "covid" / "sub" / "c.dcm", "P3")
    (inbox / "labelled" / "covid" / "notes.dcm").write_bytes(b"not dicom at all" * 20)
    book = LabelBook(tmp_path / "node.sqlite")
    first = book.ingest_folder(inbox)
    assert (first.labelled, first.unchanged, len(first.problems)) == (3, 0, 1)
    assert first.problems[0][1].startswith("not a usable DICOM file")
    assert {r.sop_instance_uid: r.label for r in book.all()} == {
        uid_a: "covid",
        uid_b: "non_covid",
        uid_c: "covid",
    }
    assert book.get(uid_a).source == "folder"  # type: ignore[union-attr]

    again = book.ingest_folder(inbox)
    assert (again.labelled, again.unchanged) == (0, 3)

    # a radiologist overrules c through the page; the folder must not undo it
    book.set(uid_c, "non_covid", who="dr", source="api")
    # and b is moved to the covid folder
    moved = inbox / "labelled" / "covid" / "b.dcm"
    shutil.move(b, moved)
    third = book.ingest_folder(inbox)
    assert (third.labelled, third.kept) == (1, 1)
    assert book.get(uid_b).label == "covid"  # type: ignore[union-attr]
    assert book.get(uid_b).path == str(moved)  # type: ignore[union-attr]
    assert book.get(uid_c).label == "non_covid"  # type: ignore[union-attr]
    assert len(book.history(uid_b)) == 2
    book.close()


def test_csv_import_reports_rows_not_uids(tmp_path: Path, ct, caplog) -> None:
    """A CSV mixing path rows, UID rows and bad rows: good rows land, bad ones are reported by
    row number, and no UID or path reaches the log."""
    db = tmp_path / "state" / "node.sqlite"
    p1, uid1 = ct(tmp_path / "scans" / "1.dcm", "P1")
    p2, uid2 = ct(tmp_path / "scans" / "2.dcm", "P2")
    p3, uid3 = ct(tmp_path / "inbox" / "3.dcm", "P3")
    store = Store(db)  # slice 3 is known to the daemon only by UID
    store.record_file(FileRecord(str(p3), 1, 1.0, uid3, "predicted", None, 1))
    store.close()
    csv_path = tmp_path / "scans" / "labels.csv"
    csv_path.write_text(
        "path,sop_instance_uid,label\n"
        "1.dcm,,covid\n"  # row 2: relative to the CSV
        f"{p2},,Non-COVID\n"  # row 3: absolute path, alias
        f",{uid3},covid\n"  # row 4: by UID via the files table
        ",1.2.3.999,covid\n"  # row 5: unknown UID
        "2.dcm,,flu\n"  # row 6: bad label
        "missing.dcm,,covid\n"  # row 7: no such file
        f"1.dcm,{uid2},covid\n"  # row 8: UID does not match the file
    )
    caplog.set_level(logging.DEBUG)
    with LabelBook(db) as book:
        report = book.import_csv(csv_path, who="importer")
        labels = {r.sop_instance_uid: (r.label, r.source, r.who) for r in book.all()}
    assert report.labelled == 3
    assert [row for row, _ in report.problems] == [5, 6, 7, 8]
    assert labels == {
        uid1: ("covid", "csv", "importer"),
        uid2: ("non_covid", "csv", "importer"),
        uid3: ("covid", "csv", "importer"),
    }
    logged = caplog.text
    for secret in (uid1, uid2, uid3, "1.2.3.999", str(p1), "missing.dcm"):
        assert secret not in logged
    assert "row 5" in logged


def test_csv_without_the_needed_columns_is_refused(tmp_path: Path) -> None:
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("file,diagnosis\na.dcm,covid\n")
    with LabelBook(tmp_path / "n.sqlite") as book, pytest.raises(LabelError, match="column"):
        book.import_csv(csv_path, who="x")


def test_other_process_sees_labels_through_wal(tmp_path: Path, ct) -> None:
    """The daemon (another connection) reads labels committed by the CLI's LabelBook."""
    db = tmp_path / "node.sqlite"
    path, uid = ct(tmp_path / "a.dcm")
    with LabelBook(db) as book:
        book.set(uid, "covid", who="dr", source="cli", path=path)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT label, who FROM labels").fetchall() == [("covid", "dr")]
    con.close()


def _two_frames(tmp_path: Path) -> tuple[Path, str]:
    from tests.helpers.dicom_factory import copy_with_new_uid

    path = tmp_path / "in" / "ect.dcm"
    return path, copy_with_new_uid(sample_path("eCT_Supplemental.dcm"), path)


def test_labelling_one_frame_labels_that_frame_only(tmp_path: Path, ct) -> None:
    """A two-frame Enhanced CT: frame 1 labelled covid leaves frame 0 unlabelled, and training
    sees frame 1 only; a whole-file label then a frame relabel splits the file's label (frame 0
    keeps it, with its author), a whole-file relabel joins it again; a frame past the end is
    refused, and frame 0 of a single-frame file is the file."""
    from edge_node.ingest.preprocess import PreprocessParams
    from edge_node.train.data import load_labelled

    path, uid = _two_frames(tmp_path)
    book = LabelBook(tmp_path / "node.sqlite")
    assert book.set(uid, "covid", who="dr_a", source="cli", path=path, frame=1) is True
    assert [(r.frame, r.label) for r in book.all()] == [(1, "covid")]
    assert book.get(uid, 0) is None and book.get(uid) is None
    got = book.get(uid, 1)
    assert got is not None and got.label == "covid"
    samples, _report = load_labelled(book.all(), PreprocessParams(-600.0, 1500.0, 64), tmp_path)
    assert samples.ids == (f"{uid}#1",) and list(samples.labels) == [1]

    assert book.set(uid, "non_covid", who="dr_b", source="cli", path=path) is True  # whole file
    assert [(r.frame, r.label) for r in book.all()] == [(None, "non_covid")]
    assert book.set(uid, "covid", who="dr_c", source="api", frame=1) is True
    rows = {r.frame: (r.label, r.who) for r in book.all()}
    assert rows == {0: ("non_covid", "dr_b"), 1: ("covid", "dr_c")}
    assert book.set(uid, "covid", who="dr_c", source="api", frame=1) is False  # unchanged
    assert book.set(uid, "covid", who="dr_d", source="api") is True  # whole file again
    assert [(r.frame, r.label, r.who) for r in book.all()] == [(None, "covid", "dr_d")]
    history = [(h.frame, h.label, h.previous) for h in book.history(uid)]
    assert history == [
        (1, "covid", None),
        (None, "non_covid", "covid"),
        (1, "covid", "non_covid"),
        (None, "covid", None),  # the frames differed: no single previous label
    ]
    with pytest.raises(LabelError, match="unknown frame 2: the file has 2 frame"):
        book.set(uid, "covid", who="dr", source="cli", frame=2)
    with pytest.raises(LabelError, match="frame must be an integer"):
        book.set(uid, "covid", who="dr", source="cli", frame=-1)
    single, suid = ct(tmp_path / "in" / "one.dcm")
    assert book.set(suid, "covid", who="dr", source="cli", path=single, frame=0) is True
    one = book.get(suid)
    assert one is not None and one.frame is None
    book.close()


def test_a_labels_table_from_before_frames_is_migrated(tmp_path: Path, ct) -> None:
    """An old database (labels keyed by SOPInstanceUID only) opens with its labels as
    whole-file labels and history intact; frame labels work on it; opening again is a no-op."""
    db = tmp_path / "node.sqlite"
    path, uid = _two_frames(tmp_path)
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE labels (sop_instance_uid TEXT PRIMARY KEY, label TEXT NOT NULL
            CHECK(label IN ('covid','non_covid')), path TEXT, patient_key TEXT,
            who TEXT NOT NULL, source TEXT NOT NULL, at REAL NOT NULL);
        CREATE TABLE label_history (id INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL,
            label TEXT NOT NULL, previous TEXT, who TEXT NOT NULL, source TEXT NOT NULL,
            at REAL NOT NULL);
        """
    )
    con.execute(
        "INSERT INTO labels VALUES (?, 'covid', ?, 'pk', 'dr_old', 'cli', 1.0)", (uid, str(path))
    )
    con.execute(
        "INSERT INTO label_history (sop_instance_uid, label, previous, who, source, at)"
        " VALUES (?, 'covid', NULL, 'dr_old', 'cli', 1.0)",
        (uid,),
    )
    con.commit()
    con.close()
    with LabelBook(db) as book:
        (rec,) = book.all()
        assert (rec.frame, rec.label, rec.who, rec.at, rec.path) == (
            None,
            "covid",
            "dr_old",
            1.0,
            str(path),
        )
        assert book.set(uid, "non_covid", who="dr_new", source="cli", frame=0) is True
        assert {r.frame: r.label for r in book.all()} == {0: "non_covid", 1: "covid"}
        assert [(h.frame, h.who) for h in book.history(uid)] == [(None, "dr_old"), (0, "dr_new")]
    with LabelBook(db) as book:
        assert len(book.all()) == 2


def test_cli_labels_one_frame_and_refuses_a_frame_past_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedscan node label --path F --frame 1`: one frame labelled; `--frame 5` on a two-frame
    file exits 5 with one line."""
    from edge_node.cli.daemon import init_node
    from fedscan.cli import main

    toml = init_node(tmp_path / "n")
    path, _uid = _two_frames(tmp_path)
    base = ["node", "label", "--config", str(toml), "--path", str(path), "--label", "covid"]
    assert main([*base, "--frame", "1", "--json"]) == 0
    assert '"changed": true' in capsys.readouterr().out
    assert main([*base, "--frame", "5"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown frame 5" in err[0]
    with LabelBook(tmp_path / "n" / "state" / "node.sqlite") as book:
        assert [(r.frame, r.label) for r in book.all()] == [(1, "covid")]


def test_the_page_shows_each_frame_with_its_own_label(tmp_path: Path) -> None:
    """Two predicted frames of one file, frame 1 labelled: the recent predictions list each
    frame once, frame 1 with its label and frame 0 without (no row doubled by the join)."""
    db = tmp_path / "state" / "node.sqlite"
    path, uid = _two_frames(tmp_path)
    st = path.stat()
    store = Store(db)
    store.record_file(
        FileRecord(str(path), st.st_size, st.st_mtime, uid, "predicted", None, 2),
        [
            PredictionRow(uid, f, "1.2", "1.3", "pk", str(path), "covid", 0.9, 0.9, "0", 1, 1, 1, 3)
            for f in (0, 1)
        ],
    )
    with LabelBook(db) as book:
        book.set(uid, "non_covid", who="dr", source="api")
        book.set(uid, "covid", who="dr", source="api", frame=1)
    rows = sorted((r["frame"], r["human_label"]) for r in store.recent_predictions(10))
    store.close()
    assert rows == [(0, "non_covid"), (1, "covid")]
