"""SQLite (WAL) state of the node: one outcome per inbox file, one prediction per slice/frame.

The schema is a contract (docs/CONTRACTS.md): labels, training and the audit read these
tables. One connection guarded by a lock serves every thread of the daemon; readers in other
processes (``fedscan node label``, the trainer) see committed rows thanks to WAL.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_node.errors import StoreError
from edge_node.series.header import SeriesHeader

log = logging.getLogger(__name__)

OUTCOMES: tuple[str, ...] = ("predicted", "skipped", "quarantined")

# Write failures an outcome waits out instead of being lost (primary SQLite result codes):
# BUSY, LOCKED, READONLY (disk remounted), IOERR (short write), FULL (no space left).
TRANSIENT_SQLITE_CODES = frozenset({5, 6, 8, 10, 13})
WRITE_RETRY_MAX_S = 10.0  # back-off cap between attempts of a write that keeps failing

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INT,
    mtime REAL,
    sop_instance_uid TEXT,
    outcome TEXT CHECK(outcome IN ('predicted','skipped','quarantined')),
    reason TEXT,
    n_frames INT,
    updated_at REAL
);
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT,
    frame INT,
    series_instance_uid TEXT,
    study_instance_uid TEXT,
    patient_key TEXT,
    path TEXT,
    label TEXT,
    confidence REAL,
    prob_covid REAL,
    model_version TEXT,
    read_ms REAL,
    preprocess_ms REAL,
    infer_ms REAL,
    total_ms REAL,
    created_at REAL,
    UNIQUE(sop_instance_uid, frame)
);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions(created_at);
CREATE INDEX IF NOT EXISTS files_sop ON files(sop_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    patient_name TEXT,
    patient_id TEXT,
    patient_key TEXT,
    accession_number TEXT,
    study_date TEXT,
    study_time TEXT,
    study_description TEXT,
    referring_physician TEXT,
    first_seen REAL,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT,
    modality TEXT,
    series_number INT,
    series_description TEXT,
    body_part TEXT,
    protocol_name TEXT,
    n_instances INT,
    expected_instances INT,
    first_seen REAL,
    last_seen REAL,
    status TEXT CHECK(status IN ('open','complete','skipped')),
    skip_reason TEXT,
    verdict TEXT CHECK(verdict IN ('covid','non_covid','uncertain') OR verdict IS NULL),
    score REAL,
    threshold REAL,
    uncertain_band REAL,
    rule TEXT,
    n_slices_used INT,
    model_version TEXT,
    calibrated INT,
    completed_at REAL,
    results_json TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_instance_uid);
CREATE INDEX IF NOT EXISTS series_status ON series(status);
"""

# Columns added after the first release: (table, column, declaration), added when missing.
MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("predictions", "verdict", "TEXT"),  # per slice: covid | non_covid | uncertain
)
# Created after the migrations (they index columns an old database gains there).
POST_MIGRATION_SQL = (
    "CREATE INDEX IF NOT EXISTS predictions_series ON predictions(series_instance_uid)"
)


@dataclass(frozen=True)
class FileRecord:
    """The outcome of one inbox file (row of ``files``)."""

    path: str
    size: int
    mtime: float
    sop_instance_uid: str | None
    outcome: str
    reason: str | None = None
    n_frames: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise StoreError(f"outcome must be one of {OUTCOMES}, not {self.outcome!r}")


@dataclass(frozen=True)
class PredictionRow:
    """One predicted slice or frame (row of ``predictions`` without id/created_at)."""

    sop_instance_uid: str
    frame: int
    series_instance_uid: str | None
    study_instance_uid: str | None
    patient_key: str | None
    path: str
    label: str
    confidence: float
    prob_covid: float | None
    model_version: str
    read_ms: float | None
    preprocess_ms: float | None
    infer_ms: float | None
    total_ms: float | None
    verdict: str | None = None  # covid | non_covid | uncertain at the model's operating point


_PRED_COLS = tuple(PredictionRow.__dataclass_fields__)


@dataclass(frozen=True)
class SeriesNote:
    """One predicted or skipped instance's study and series header, filed with its outcome
    (rows of ``studies`` and ``series``; edge_node.series completes the series later)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    patient_key: str | None = None
    modality: str = ""
    header: SeriesHeader = field(default_factory=SeriesHeader)  # what the file's header says
    skip_reason: str | None = None  # set when the instance was skipped (e.g. not_chest:*)

    def column(self, name: str) -> Any:
        """A studies/series column: the note's own field, else the header's."""
        return getattr(self, name) if name in _NOTE_FIELDS else getattr(self.header, name)


_NOTE_FIELDS = frozenset(SeriesNote.__dataclass_fields__)


_STUDY_COLS = (
    "patient_name",
    "patient_id",
    "patient_key",
    "accession_number",
    "study_date",
    "study_time",
    "study_description",
    "referring_physician",
)
_SERIES_HEADER_COLS = (
    "modality",
    "series_number",
    "series_description",
    "body_part",
    "protocol_name",
)
SERIES_STATUSES = ("open", "complete", "skipped")


@contextmanager
def write_transaction(conn: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on ``conn`` (autocommit mode), rolled back on any
    error, including a COMMIT that fails on a full disk; SQLite errors become StoreError."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:  # e.g. COMMIT failed on a full disk
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise StoreError(f"{what} write failed: {exc}") from exc


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns of ``MIGRATIONS`` that an older database lacks (ALTER TABLE ADD COLUMN)."""
    for table, column, decl in MIGRATIONS:
        have = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    conn.execute(POST_MIGRATION_SQL)


def _file_series(c: sqlite3.Connection, note: SeriesNote, now: float) -> None:
    """Upsert the study and series rows of one instance (inside the file's transaction).

    A new instance (its SOP UID has no outcome yet) counts in ``n_instances`` and moves
    ``last_seen``; a predicted one (re)opens the series (a late slice reopens a complete
    series, whose verdict is then made again); a skipped one opens a new series as
    ``skipped`` and leaves an existing series as it is."""
    seen = c.execute(
        "SELECT 1 FROM files WHERE sop_instance_uid = ? AND outcome IN ('predicted','skipped')"
        " LIMIT 1",
        (note.sop_instance_uid,),
    ).fetchone()
    new = 0 if seen else 1
    study = [note.column(k) for k in _STUDY_COLS]
    c.execute(
        f"INSERT INTO studies(study_instance_uid, {', '.join(_STUDY_COLS)}, first_seen,"
        f" last_seen) VALUES (?, {', '.join('?' for _ in _STUDY_COLS)}, ?, ?)"
        " ON CONFLICT(study_instance_uid) DO UPDATE SET "
        + ", ".join(f"{k} = COALESCE(NULLIF(excluded.{k}, ''), {k})" for k in _STUDY_COLS)
        + ", last_seen = excluded.last_seen",
        (note.study_instance_uid, *study, now, now),
    )
    status = "skipped" if note.skip_reason else "open"
    header = [note.column(k) for k in _SERIES_HEADER_COLS]
    # (in SET, column names read the row as it was before this UPDATE)
    reopen = (
        ""
        if note.skip_reason
        else (
            ", status = CASE WHEN ? OR status = 'skipped' THEN 'open' ELSE status END,"
            " skip_reason = CASE WHEN status = 'skipped' THEN NULL ELSE skip_reason END"
        )
    )
    params: list[Any] = [
        note.series_instance_uid,
        note.study_instance_uid,
        *header,
        new,
        note.header.expected_instances,
        now,
        now,
        status,
        note.skip_reason,
        new,
        new,
        now,
    ]
    if not note.skip_reason:
        params.append(new)
    c.execute(
        f"INSERT INTO series(series_instance_uid, study_instance_uid,"
        f" {', '.join(_SERIES_HEADER_COLS)}, n_instances, expected_instances, first_seen,"
        f" last_seen, status, skip_reason) VALUES (?, ?,"
        f" {', '.join('?' for _ in _SERIES_HEADER_COLS)}, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(series_instance_uid) DO UPDATE SET"
        " n_instances = n_instances + ?,"
        " expected_instances = COALESCE(excluded.expected_instances, expected_instances),"
        " last_seen = CASE WHEN ? THEN ? ELSE last_seen END" + reopen,
        params,
    )


class Store:
    """Thread-safe access to ``node.sqlite``."""

    def __init__(self, db_path: Path | str) -> None:
        self.db_path = Path(db_path)
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.db_path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(SCHEMA)
            _migrate(self._conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {self.db_path}: {exc}") from exc
        self._lock = threading.RLock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            with write_transaction(self._conn, "state database"):
                yield self._conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            try:
                return list(self._conn.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"state database read failed: {exc}") from exc

    # -- writes ----------------------------------------------------------------------------

    def record_file(
        self,
        rec: FileRecord,
        predictions: Sequence[PredictionRow] = (),
        note: SeriesNote | None = None,
    ) -> list[int]:
        """Write one file's outcome and its predictions in one transaction; returns row ids."""
        return self.record_files([(rec, predictions)], [note])[0]

    def record_files(
        self,
        items: Sequence[tuple[FileRecord, Sequence[PredictionRow]]],
        notes: Sequence[SeriesNote | None] = (),
    ) -> list[list[int]]:
        """Write several files' outcomes and predictions in one transaction.

        A prediction for a (sop_instance_uid, frame) already stored is replaced (the same slice
        sent again, e.g. through the API after a model update): one row per slice, ever.
        A transient failure (disk full, read-only remount, lock) is logged and retried with
        back-off until it succeeds or the store is closed: outcomes wait, none is lost.
        """
        delay = 0.25
        while True:
            try:
                return self._record_files_once(items, notes)
            except StoreError as exc:
                code = getattr(exc.__cause__, "sqlite_errorcode", None)
                if code is None or code & 0xFF not in TRANSIENT_SQLITE_CODES or self._closed:
                    raise
                log.error("%s; %d file outcome(s) wait, retrying in %.1f s", exc, len(items), delay)
                time.sleep(delay)
                delay = min(2.0 * delay, WRITE_RETRY_MAX_S)

    def _record_files_once(
        self,
        items: Sequence[tuple[FileRecord, Sequence[PredictionRow]]],
        notes: Sequence[SeriesNote | None] = (),
    ) -> list[list[int]]:
        now = time.time()
        out: list[list[int]] = []
        cols = ", ".join(_PRED_COLS)
        marks = ", ".join("?" for _ in _PRED_COLS)
        updates = ", ".join(f"{k}=excluded.{k}" for k in _PRED_COLS if k != "frame")
        with self._tx() as c:
            for k, (rec, predictions) in enumerate(items):
                note = notes[k] if k < len(notes) else None
                if note is not None:
                    _file_series(c, note, now)
                c.execute(
                    "INSERT INTO files(path, size, mtime, sop_instance_uid, outcome, reason,"
                    " n_frames, updated_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE"
                    " SET size=excluded.size, mtime=excluded.mtime,"
                    " sop_instance_uid=excluded.sop_instance_uid, outcome=excluded.outcome,"
                    " reason=excluded.reason, n_frames=excluded.n_frames,"
                    " updated_at=excluded.updated_at",
                    (
                        rec.path,
                        rec.size,
                        rec.mtime,
                        rec.sop_instance_uid,
                        rec.outcome,
                        rec.reason,
                        rec.n_frames,
                        now,
                    ),
                )
                ids: list[int] = []
                for p in predictions:
                    row = c.execute(
                        f"INSERT INTO predictions({cols}, created_at) VALUES ({marks}, ?)"
                        f" ON CONFLICT(sop_instance_uid, frame) DO UPDATE SET {updates},"
                        " created_at=excluded.created_at RETURNING id",
                        (*asdict(p).values(), now),
                    ).fetchone()
                    ids.append(int(row[0]))
                out.append(ids)
        return out

    # -- reads -----------------------------------------------------------------------------

    def file_signatures(self) -> dict[str, tuple[int, float]]:
        """path -> (size, mtime) of every file with an outcome (for the catch-up scan)."""
        rows = self._query("SELECT path, size, mtime FROM files")
        return {r["path"]: (int(r["size"] or 0), float(r["mtime"] or 0.0)) for r in rows}

    def file(self, path: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM files WHERE path = ?", (path,))
        return dict(rows[0]) if rows else None

    def predicted_path(self, sop_instance_uid: str) -> str | None:
        """Path of the file a SOP instance was predicted from, or None if never predicted."""
        rows = self._query(
            "SELECT path FROM predictions WHERE sop_instance_uid = ? ORDER BY frame LIMIT 1",
            (sop_instance_uid,),
        )
        return str(rows[0]["path"]) if rows else None

    def predictions_for(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT * FROM predictions WHERE sop_instance_uid = ? ORDER BY frame",
            (sop_instance_uid,),
        )
        return [dict(r) for r in rows]

    def recent_predictions(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first; joined with the human label when edge_node.labels created its table."""
        limit = max(1, min(int(limit), 10_000))
        if self._has_table("labels"):
            # per-frame labels; an older labels table has none until edge_node.labels migrates it
            frame = " AND (l.frame IS NULL OR l.frame = p.frame)"
            sql = (
                "SELECT p.*, l.label AS human_label, l.who AS labelled_by FROM predictions p"
                " LEFT JOIN labels l ON l.sop_instance_uid = p.sop_instance_uid"
                + (frame if self._has_column("labels", "frame") else "")
                + " ORDER BY p.created_at DESC, p.id DESC LIMIT ?"
            )
        else:
            sql = "SELECT * FROM predictions ORDER BY created_at DESC, id DESC LIMIT ?"
        return [dict(r) for r in self._query(sql, (limit,))]

    def prediction(self, pred_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM predictions WHERE id = ?", (pred_id,))
        return dict(rows[0]) if rows else None

    def counts_by_outcome(self) -> dict[str, int]:
        rows = self._query("SELECT outcome, COUNT(*) AS n FROM files GROUP BY outcome")
        counts = dict.fromkeys(OUTCOMES, 0)
        counts.update({str(r["outcome"]): int(r["n"]) for r in rows})
        return counts

    def counts_by_label(self) -> dict[str, int]:
        rows = self._query("SELECT label, COUNT(*) AS n FROM predictions GROUP BY label")
        return {str(r["label"]): int(r["n"]) for r in rows}

    def count_predictions(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM predictions")[0]["n"])

    # -- series (edge_node.series) ----------------------------------------------------------

    def open_series(self) -> list[dict[str, Any]]:
        """Series still waiting for completion, oldest activity first."""
        rows = self._query("SELECT * FROM series WHERE status = 'open' ORDER BY last_seen")
        return [dict(r) for r in rows]

    def series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,))
        return dict(rows[0]) if rows else None

    def study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM studies WHERE study_instance_uid = ?", (study_uid,))
        return dict(rows[0]) if rows else None

    def series_predictions(self, series_uid: str) -> list[dict[str, Any]]:
        """Every predicted slice/frame of a series (the evidence of its verdict)."""
        rows = self._query(
            "SELECT * FROM predictions WHERE series_instance_uid = ? ORDER BY path, frame",
            (series_uid,),
        )
        return [dict(r) for r in rows]

    def set_expected_instances(self, series_uid: str, n: int) -> bool:
        """Declare how many instances a series will hold (completes it at that count)."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE series SET expected_instances = ? WHERE series_instance_uid = ?",
                (int(n), series_uid),
            )
            return cur.rowcount > 0

    def complete_series(self, series_uid: str, last_seen: float, values: dict[str, Any]) -> bool:
        """Mark an open series complete with its verdict ``values`` (columns of ``series``),
        unless an instance arrived since ``last_seen`` (then it stays open: False)."""
        allowed = {
            "verdict", "score", "threshold", "uncertain_band", "rule", "n_slices_used",
            "model_version", "calibrated", "results_json", "status", "skip_reason",
        }  # fmt: skip
        bad = set(values) - allowed
        if bad:
            raise StoreError(f"not series verdict columns: {sorted(bad)}")
        values = {"status": "complete", **values, "completed_at": time.time()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as c:
            cur = c.execute(
                f"UPDATE series SET {sets} WHERE series_instance_uid = ? AND status = 'open'"
                " AND last_seen <= ?",
                (*values.values(), series_uid, last_seen),
            )
            return cur.rowcount > 0

    def set_series_results(self, series_uid: str, results_json: str) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE series SET results_json = ? WHERE series_instance_uid = ?",
                (results_json, series_uid),
            )

    def recent_series(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest activity first, each with its study's columns (for listings)."""
        limit = max(1, min(int(limit), 10_000))
        rows = self._query(
            "SELECT s.*, st.patient_name, st.patient_id, st.accession_number, st.study_date,"
            " st.study_description FROM series s LEFT JOIN studies st"
            " ON st.study_instance_uid = s.study_instance_uid"
            " ORDER BY s.last_seen DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]

    def _has_table(self, name: str) -> bool:
        rows = self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
        return bool(rows)

    def _has_column(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self._query(f"PRAGMA table_info({table})"))
