"""Radiologist labels (covid / non_covid per SOPInstanceUID and frame), who, when, history.

Stored in the node's SQLite file (WAL) next to the store's ``files`` and ``predictions`` tables,
in ``labels`` (the current labels) and ``label_history`` (every change, oldest first). A label
is keyed by (sop_instance_uid, frame): ``frame`` NULL labels the whole file (every frame), a
frame number labels that frame of a multi-frame file only. One file has either one whole-file
row or one row per frame, never both: labelling one frame of a file labelled as a whole splits
the file's label into per-frame rows (same who/when) and changes that frame, and labelling the
whole file again replaces the frame rows. A single-frame file's frame 0 is the whole file.
Databases from before frames are migrated on open (their labels become whole-file labels).
Four ways in, all ending in :meth:`LabelBook.set`:

- the folder convention: DICOM files under ``<inbox>/labelled/covid/`` and
  ``<inbox>/labelled/non_covid/`` (:meth:`LabelBook.ingest_folder`, source ``folder``);
- a CSV file with ``label`` and ``sop_instance_uid`` or ``path`` columns, optionally ``frame``
  (:meth:`LabelBook.import_csv`, source ``csv``);
- the local HTTP API and the page's label buttons (source ``api``);
- ``fedscan node label`` (source ``cli``).

A folder never overrides a label given by a person another way: a file in ``labelled/covid/``
labels its slice only when the slice has no label yet, or when its current label also came
from the folder (the file was moved to the other folder). Logs carry counts and CSV row numbers,
never UIDs, paths or patient keys.
"""

from __future__ import annotations

import csv
import getpass
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge_node.errors import InputError, LabelError, StoreError
from edge_node.store import write_transaction

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("non_covid", "covid")  # index = class id (CONTRACTS.md)
SOURCES: tuple[str, ...] = ("folder", "csv", "api", "cli")
LABELLED_DIR = "labelled"  # <inbox>/labelled/<label>/...

LABELS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    frame INTEGER CHECK(frame IS NULL OR frame >= 0),  -- NULL: the whole file
    label TEXT NOT NULL CHECK(label IN ('covid','non_covid')),
    path TEXT,
    patient_key TEXT,
    who TEXT NOT NULL,
    source TEXT NOT NULL,
    at REAL NOT NULL
);
"""
SCHEMA = (
    LABELS_TABLE.format(name="labels")
    + """
CREATE UNIQUE INDEX IF NOT EXISTS labels_key ON labels(sop_instance_uid, IFNULL(frame, -1));
CREATE INDEX IF NOT EXISTS labels_at ON labels(at);
CREATE INDEX IF NOT EXISTS labels_path ON labels(path);
CREATE TABLE IF NOT EXISTS label_history (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    label TEXT NOT NULL,
    previous TEXT,
    who TEXT NOT NULL,
    source TEXT NOT NULL,
    at REAL NOT NULL,
    frame INTEGER
);
CREATE INDEX IF NOT EXISTS label_history_uid ON label_history(sop_instance_uid);
"""
)
_RECORD_COLS = "sop_instance_uid, label, path, patient_key, who, source, at, frame"
MAX_FRAME = 100_000  # a frame number past this is a typo, not a frame

_ALIASES = {"covid": "covid", "non_covid": "non_covid", "noncovid": "non_covid"}
# Field bounds: every way in (API, CSV, CLI) is refused past them, so a label row stays small.
MAX_UID_CHARS = 128  # what the watcher accepts as a SOPInstanceUID (DICOM says 64)
MAX_WHO_CHARS = 64  # author: a user name or "dr_a", not a document
MAX_LABEL_CHARS = 32


def check_text(name: str, value: object, max_chars: int) -> str:
    """``value`` as a non-empty printable string of at most ``max_chars`` (LabelError)."""
    if not isinstance(value, str):
        raise LabelError(f"{name} must be a string")
    if not value or len(value) > max_chars:
        raise LabelError(f"{name} must be 1-{max_chars} characters")
    if not value.isprintable():
        raise LabelError(f"{name} must not contain control characters")
    return value


def normalize_label(value: str) -> str:
    """``covid`` or ``non_covid`` (case, ``-`` and spaces tolerated); anything else LabelError."""
    check_text("label", value, MAX_LABEL_CHARS)
    key = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _ALIASES:
        raise LabelError(f"unknown label {value!r}: use one of {list(LABELS)}")
    return _ALIASES[key]


def default_who() -> str:
    """The OS user, the default author of CLI and CSV labels."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class LabelRecord:
    """The current label of one slice (row of ``labels``)."""

    sop_instance_uid: str
    label: str
    path: str | None
    patient_key: str | None
    who: str
    source: str
    at: float
    frame: int | None = None  # None: the whole file (every frame); else that frame only

    @property
    def class_id(self) -> int:
        return LABELS.index(self.label)


@dataclass(frozen=True)
class HistoryEntry:
    """One change of a slice's label (row of ``label_history``)."""

    sop_instance_uid: str
    label: str
    previous: str | None
    who: str
    source: str
    at: float
    frame: int | None = None


@dataclass(frozen=True)
class IngestReport:
    """What a folder scan or CSV import did; ``problems`` are (row or item number, reason)."""

    labelled: int = 0  # new labels and relabels written
    unchanged: int = 0  # already had that label
    kept: int = 0  # folder label not applied: a person labelled the slice another way
    problems: tuple[tuple[int, str], ...] = field(default_factory=tuple)

    def summary(self) -> str:
        return (
            f"labelled={self.labelled} unchanged={self.unchanged} kept={self.kept} "
            f"problems={len(self.problems)}"
        )


class LabelBook:
    """Labels in the node's SQLite file; safe to use from another process than the daemon."""

    def __init__(self, db_path: Path | str) -> None:
        self.db_path = Path(db_path)
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.db_path), isolation_level=None, timeout=30.0)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._migrate()
            self._conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open label database {self.db_path}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    def _columns(self, table: str) -> set[str]:
        return {str(r[1]) for r in self._conn.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        """Labels tables from before frame labels: every label becomes a whole-file label.

        One transaction (other processes wait on the lock, then find the new table): copy into
        the new table, drop the old, rename; history gains a NULL ``frame`` column."""
        if "frame" in self._columns("labels") or not self._columns("labels"):
            if self._columns("label_history") and "frame" not in self._columns("label_history"):
                with self._tx() as conn:
                    if "frame" not in self._columns("label_history"):
                        conn.execute("ALTER TABLE label_history ADD COLUMN frame INTEGER")
            return
        with self._tx() as conn:
            if "frame" in self._columns("labels"):
                return  # another process migrated it meanwhile
            conn.execute(LABELS_TABLE.format(name="labels_v2"))
            conn.execute(
                "INSERT INTO labels_v2 (sop_instance_uid, frame, label, path, patient_key, who,"
                " source, at) SELECT sop_instance_uid, NULL, label, path, patient_key, who,"
                " source, at FROM labels"
            )
            conn.execute("DROP TABLE labels")
            conn.execute("ALTER TABLE labels_v2 RENAME TO labels")
            if self._columns("label_history") and "frame" not in self._columns("label_history"):
                conn.execute("ALTER TABLE label_history ADD COLUMN frame INTEGER")
        log.info("label database migrated to per-frame labels (existing labels: whole files)")

    def __enter__(self) -> LabelBook:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with write_transaction(self._conn, "label database"):
            yield self._conn

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._conn.execute(sql, params).fetchall())
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # the store has not created files/predictions yet
            raise StoreError(f"label database read failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"label database read failed: {exc}") from exc

    # -- resolution -----------------------------------------------------------------------

    def locate(self, sop_instance_uid: str) -> tuple[str | None, str | None]:
        """(path, patient_key) of a slice the daemon has seen, from ``predictions``/``files``."""
        rows = self._rows(
            "SELECT path, patient_key FROM predictions WHERE sop_instance_uid = ? "
            "ORDER BY frame LIMIT 1",
            (sop_instance_uid,),
        )
        if rows:
            return rows[0]["path"], rows[0]["patient_key"]
        rows = self._rows(
            "SELECT path FROM files WHERE sop_instance_uid = ? ORDER BY updated_at DESC LIMIT 1",
            (sop_instance_uid,),
        )
        if rows:
            return rows[0]["path"], None
        return None, None

    # -- writes ---------------------------------------------------------------------------

    def set(
        self,
        sop_instance_uid: str,
        label: str,
        *,
        who: str,
        source: str,
        path: str | Path | None = None,
        patient_key: str | None = None,
        frame: int | None = None,
    ) -> bool:
        """Record ``label`` for a slice (``frame`` None: the whole file; else that frame only);
        returns False when it already had that label.

        A slice the node has never seen (not in ``predictions`` or ``files``) needs ``path``;
        a missing ``patient_key`` is read from the file header. A different label is a relabel:
        the row is replaced and the change appended to ``label_history``. A frame past the
        file's last frame is refused (LabelError).
        """
        label = normalize_label(label)
        if source not in SOURCES:
            raise LabelError(f"unknown label source {source!r}: one of {list(SOURCES)}")
        if not sop_instance_uid:
            raise LabelError("a label needs a SOPInstanceUID")
        if not who:
            raise LabelError("a label needs an author (who)")
        check_text("sop_instance_uid", sop_instance_uid, MAX_UID_CHARS)
        check_text("who", who, MAX_WHO_CHARS)
        if frame is not None and (
            isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame <= MAX_FRAME
        ):
            raise LabelError(f"frame must be an integer in 0..{MAX_FRAME}")
        rows = self.records_of(sop_instance_uid)
        current = rows[0] if rows else None
        path_s = str(path) if path is not None else None
        if path_s is None:
            path_s, known_key = self.locate(sop_instance_uid)
            patient_key = patient_key or known_key
            if path_s is None and current is not None:
                path_s, patient_key = current.path, patient_key or current.patient_key
            if path_s is None:
                raise LabelError(
                    "unknown slice: the node has no file with that SOPInstanceUID "
                    "(give the file path instead)"
                )
        if patient_key is None and current is not None and current.path == path_s:
            patient_key = current.patient_key
        if patient_key is None:
            patient_key = _patient_key_of(Path(path_s))
        n_frames = 1
        if frame is not None or len(rows) > 1:
            n_frames = self._n_frames(sop_instance_uid, Path(path_s))
        if frame is not None and frame >= n_frames:
            raise LabelError(f"unknown frame {frame}: the file has {n_frames} frame(s)")
        if frame is not None and n_frames == 1:
            frame = None  # frame 0 of a single-frame file is the file
        whole = next((r for r in rows if r.frame is None), None)
        if frame is None:
            unchanged = whole is not None and len(rows) == 1 and whole.label == label
            previous = _uniform(rows)
        else:
            mine = next((r for r in rows if r.frame == frame), whole)
            unchanged = mine is not None and mine.label == label
            previous = mine.label if mine is not None else None
        if unchanged:
            if current is not None and (
                current.path != path_s or current.patient_key != patient_key
            ):
                with self._tx() as conn:
                    conn.execute(
                        "UPDATE labels SET path = ?, patient_key = ? WHERE sop_instance_uid = ?",
                        (path_s, patient_key, sop_instance_uid),
                    )
            return False
        now = time.time()
        insert = (
            "INSERT OR REPLACE INTO labels "
            "(sop_instance_uid, frame, label, path, patient_key, who, source, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        with self._tx() as conn:
            if frame is None:
                conn.execute("DELETE FROM labels WHERE sop_instance_uid = ?", (sop_instance_uid,))
            elif whole is not None:
                # split the whole-file label: the other frames keep it, with its who and when
                conn.execute(
                    "DELETE FROM labels WHERE sop_instance_uid = ? AND frame IS NULL",
                    (sop_instance_uid,),
                )
                for i in range(n_frames):
                    if i != frame:
                        conn.execute(
                            insert,
                            (sop_instance_uid, i, whole.label, path_s, patient_key,
                             whole.who, whole.source, whole.at),
                        )  # fmt: skip
            conn.execute(
                insert, (sop_instance_uid, frame, label, path_s, patient_key, who, source, now)
            )
            conn.execute(
                "INSERT INTO label_history"
                " (sop_instance_uid, frame, label, previous, who, source, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, frame, label, previous, who, source, now),
            )
        return True

    def _n_frames(self, sop_instance_uid: str, path: Path) -> int:
        """Frames of the file holding ``sop_instance_uid``: stored outcome, else its header."""
        rows = self._rows(
            "SELECT n_frames FROM files WHERE sop_instance_uid = ? AND n_frames IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT 1",
            (sop_instance_uid,),
        )
        if rows:
            return max(1, int(rows[0]["n_frames"]))
        rows = self._rows(
            "SELECT MAX(frame) AS last FROM predictions WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        if rows and rows[0]["last"] is not None:
            return int(rows[0]["last"]) + 1
        from edge_node.ingest.preprocess import read_meta  # torch-free; imported late

        try:
            return max(1, int(read_meta(path).n_frames))
        except (InputError, OSError) as exc:
            raise LabelError("cannot tell how many frames the file has (give its path)") from exc

    # -- reads ----------------------------------------------------------------------------

    def get(self, sop_instance_uid: str, frame: int | None = None) -> LabelRecord | None:
        """The label of the file (``frame`` None) or of one frame: its own row, else the
        file's whole-file label."""
        for rec in self.records_of(sop_instance_uid):
            if rec.frame == frame:
                return rec
        if frame is None:
            return None
        return next((r for r in self.records_of(sop_instance_uid) if r.frame is None), None)

    def records_of(self, sop_instance_uid: str) -> list[LabelRecord]:
        """The file's rows: one whole-file row, or one per labelled frame (by frame)."""
        rows = self._rows(
            f"SELECT {_RECORD_COLS} FROM labels WHERE sop_instance_uid = ?"
            " ORDER BY IFNULL(frame, -1)",
            (sop_instance_uid,),
        )
        return [_record(r) for r in rows]

    def history(self, sop_instance_uid: str) -> list[HistoryEntry]:
        rows = self._rows(
            "SELECT sop_instance_uid, label, previous, who, source, at, frame FROM label_history "
            "WHERE sop_instance_uid = ? ORDER BY id",
            (sop_instance_uid,),
        )
        return [HistoryEntry(**dict(r)) for r in rows]

    def all(self) -> list[LabelRecord]:
        """Every current label, in a stable order (by UID, then frame)."""
        rows = self._rows(
            f"SELECT {_RECORD_COLS} FROM labels ORDER BY sop_instance_uid, IFNULL(frame, -1)"
        )
        return [_record(r) for r in rows]

    def count_since(self, ts: float) -> int:
        """Labels given or changed after ``ts`` (seconds since the epoch)."""
        rows = self._rows("SELECT COUNT(*) AS n FROM labels WHERE at > ?", (ts,))
        return int(rows[0]["n"]) if rows else 0

    def counts(self) -> dict[str, int]:
        """Current labels per class (both classes always present)."""
        out = dict.fromkeys(LABELS, 0)
        for r in self._rows("SELECT label, COUNT(*) AS n FROM labels GROUP BY label"):
            out[r["label"]] = int(r["n"])
        return out

    def counts_by_source(self) -> dict[str, int]:
        rows = self._rows("SELECT source, COUNT(*) AS n FROM labels GROUP BY source")
        return {r["source"]: int(r["n"]) for r in rows}

    # -- bulk ways in ---------------------------------------------------------------------

    def ingest_folder(self, inbox: Path | str, *, who: str = "folder") -> IngestReport:
        """Label the files under ``<inbox>/labelled/covid/`` and ``.../non_covid/``.

        Idempotent and cheap to repeat: a file already labelled from the folder with the same
        label is not read again. Files that are not readable DICOM are counted as problems
        (numbered in scan order), not raised.
        """
        root = Path(inbox) / LABELLED_DIR
        labelled = unchanged = kept = 0
        problems: list[tuple[int, str]] = []
        known = {
            r["path"]: (r["label"], r["source"])
            for r in self._rows("SELECT path, label, source FROM labels WHERE path IS NOT NULL")
        }
        item = 0
        for label in LABELS:
            folder = root / label
            if not folder.is_dir():
                continue
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                item += 1
                if path.name.startswith(".") or path.suffix.lower() in _NOT_DICOM_SUFFIXES:
                    continue
                if known.get(str(path)) == (label, "folder"):
                    unchanged += 1
                    continue
                try:
                    uid, patient_key = slice_identity(path)
                except InputError as exc:
                    problems.append((item, f"not a usable DICOM file ({exc.reason})"))
                    continue
                by_person = [r for r in self.records_of(uid) if r.source != "folder"]
                if by_person:  # a person labelled the file (or some of its frames) otherwise
                    if any(r.label != label for r in by_person):
                        kept += 1
                    else:
                        unchanged += 1
                    continue
                changed = self.set(
                    uid, label, who=who, source="folder", path=path, patient_key=patient_key
                )
                labelled += int(changed)
                unchanged += int(not changed)
        report = IngestReport(labelled, unchanged, kept, tuple(problems))
        if labelled or problems:
            log.info("label folder scan: %s", report.summary())
        return report

    def import_csv(self, csv_path: Path | str, who: str) -> IngestReport:
        """Import ``label`` + (``sop_instance_uid`` | ``path``) rows; source ``csv``.

        Relative paths are taken relative to the CSV file. A row that cannot be resolved (bad
        label, unknown UID, unreadable file) is reported by its row number (the header is row
        1) and the rest are imported.
        """
        csv_path = Path(csv_path)
        try:
            text = csv_path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise LabelError(f"cannot read CSV {csv_path}: {exc.strerror}") from exc
        reader = csv.DictReader(text.splitlines())
        columns = {c.strip().lower() for c in reader.fieldnames or []}
        if "label" not in columns or not columns & {"sop_instance_uid", "path"}:
            raise LabelError(
                "CSV needs a 'label' column and a 'sop_instance_uid' or 'path' column "
                f"(found {sorted(columns)})"
            )
        labelled = unchanged = 0
        problems: list[tuple[int, str]] = []
        for row_no, raw in enumerate(reader, start=2):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            try:
                changed = self._set_from_row(row, csv_path.parent, who)
            except LabelError as exc:
                problems.append((row_no, str(exc)))
                continue
            except InputError as exc:
                problems.append((row_no, f"file is not usable DICOM ({exc.reason})"))
                continue
            labelled += int(changed)
            unchanged += int(not changed)
        report = IngestReport(labelled, unchanged, 0, tuple(problems))
        log.info("CSV label import: %s", report.summary())
        for row_no, reason in problems:
            log.warning("CSV row %d not imported: %s", row_no, reason)
        return report

    def _set_from_row(self, row: dict[str, str], base: Path, who: str) -> bool:
        label = normalize_label(row.get("label", ""))
        uid = row.get("sop_instance_uid", "")
        path_text = row.get("path", "")
        frame_text = row.get("frame", "")
        frame: int | None = None
        if frame_text:
            if not frame_text.isdigit():
                raise LabelError("frame must be a frame number (0, 1, ...) or empty")
            frame = int(frame_text)
        if path_text:
            path = Path(path_text).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise LabelError("file not found")
            file_uid, patient_key = slice_identity(path)
            if uid and uid != file_uid:
                raise LabelError("sop_instance_uid does not match the file's")
            return self.set(
                file_uid,
                label,
                who=who,
                source="csv",
                path=path,
                patient_key=patient_key,
                frame=frame,
            )
        if not uid:
            raise LabelError("row has neither sop_instance_uid nor path")
        return self.set(uid, label, who=who, source="csv", frame=frame)


_NOT_DICOM_SUFFIXES = frozenset({".txt", ".csv", ".json", ".md", ".png", ".jpg", ".jpeg"})


def _record(row: sqlite3.Row) -> LabelRecord:
    return LabelRecord(**dict(row))


def _uniform(rows: list[LabelRecord]) -> str | None:
    """The one label of ``rows`` (a file's rows), None when there are none or several."""
    labels = {r.label for r in rows}
    return labels.pop() if len(labels) == 1 else None


def slice_identity(path: Path) -> tuple[str, str | None]:
    """(SOPInstanceUID, patient_key) from a file's header (InputError if it is not DICOM)."""
    from edge_node.ingest.preprocess import (
        read_meta,  # torch-free; imported late to keep this light
    )

    meta = read_meta(path)
    return str(meta.sop_instance_uid), meta.patient_key


def _patient_key_of(path: Path) -> str | None:
    """The patient key from the file header, or None if the file cannot be read now."""
    try:
        return slice_identity(path)[1]
    except (InputError, OSError):
        return None
