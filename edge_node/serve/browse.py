"""Read-only queries behind the radiologist's page: studies, their series, the slices behind.

Reads the ``studies``, ``series``, ``predictions`` and ``labels`` tables of the node's SQLite
file (docs/CONTRACTS.md) over its own read-only connection, so a page request never waits on
the daemon's writer lock. Every input is bounded by :class:`StudyQuery` / :class:`SliceQuery`
(``QueryError`` -> HTTP 400). A database from before series tracking (no ``series`` table)
gives an empty page with ``available = False``, not an error.

The rows returned carry patient name, ID and UIDs: they are for the local page on loopback
(the radiologist's own workstation), never for logs or anything published.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_node.errors import QueryError, StoreError
from edge_node.serve.inference import DEFAULT_UNCERTAIN_BAND, verdict_of
from edge_node.store import Store

VERDICTS: tuple[str, ...] = ("covid", "non_covid", "uncertain")
STATUSES: tuple[str, ...] = ("open", "complete", "skipped")
MAX_LIMIT = 200  # studies (or slices) per page
MAX_SLICE_LIMIT = 2000  # slices of one series per request
MAX_OFFSET = 10_000_000
MAX_Q = 64  # characters of the free-text search
PREVIEW_SLICES = 8  # key slices (highest P(covid)) shown per series in the study list
# A DICOM UID is digits and dots (<= 64); the watcher takes non-conformant ones up to 128.
_UID = re.compile(r"^[0-9A-Za-z._-]{1,128}$")


@dataclass(frozen=True)
class StudyQuery:
    """One page of the study list: filters and window (all optional but the window)."""

    limit: int = 20  # studies per page, 1..MAX_LIMIT
    offset: int = 0  # studies skipped, newest first
    verdict: str | None = None  # only series with this verdict (VERDICTS)
    status: str | None = None  # only series with this status (STATUSES)
    q: str = ""  # words that must each match patient name/ID, accession or a description
    date_from: str | None = None  # study date >= (YYYYMMDD, as DICOM stores it)
    date_to: str | None = None  # study date <= (YYYYMMDD)
    preview: int = PREVIEW_SLICES  # key slices per series, 0..MAX_LIMIT

    def __post_init__(self) -> None:
        _check_window(self.limit, self.offset, MAX_LIMIT)
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise QueryError(f"verdict must be one of {list(VERDICTS)}")
        if self.status is not None and self.status not in STATUSES:
            raise QueryError(f"status must be one of {list(STATUSES)}")
        if len(self.q) > MAX_Q or any(ord(c) < 32 for c in self.q):
            raise QueryError(f"q must be at most {MAX_Q} printable characters")
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not _is_da(value):
                raise QueryError(f"{name} must be a date YYYY-MM-DD")
        if not 0 <= self.preview <= MAX_LIMIT:
            raise QueryError(f"preview must be between 0 and {MAX_LIMIT}")

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> StudyQuery:
        """From URL query parameters (strings); empty values mean "no filter"."""
        unknown = set(params) - {*cls.__dataclass_fields__, "token"}
        if unknown:
            raise QueryError(f"unknown parameter(s): {sorted(unknown)}")

        def opt(name: str) -> str | None:
            value = params.get(name, "").strip()
            return value or None

        return cls(
            limit=_int(params, "limit", 20),
            offset=_int(params, "offset", 0),
            verdict=opt("verdict"),
            status=opt("status"),
            q=params.get("q", "").strip(),
            date_from=_to_da(opt("date_from"), "date_from"),
            date_to=_to_da(opt("date_to"), "date_to"),
            preview=_int(params, "preview", PREVIEW_SLICES),
        )


@dataclass(frozen=True)
class SliceQuery:
    """A window on the slices of one series, in arrival order."""

    limit: int = 500  # slices returned, 1..MAX_SLICE_LIMIT
    offset: int = 0  # slices skipped

    def __post_init__(self) -> None:
        _check_window(self.limit, self.offset, MAX_SLICE_LIMIT)

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> SliceQuery:
        unknown = set(params) - {*cls.__dataclass_fields__, "token"}
        if unknown:
            raise QueryError(f"unknown parameter(s): {sorted(unknown)}")
        return cls(limit=_int(params, "limit", 500), offset=_int(params, "offset", 0))


def check_uid(value: str, what: str = "UID") -> str:
    """``value`` if it is a well-formed DICOM UID, else QueryError."""
    if not isinstance(value, str) or not _UID.match(value):
        raise QueryError(f"{what} must be a DICOM UID (digits and dots, at most 128 characters)")
    return value


def _check_window(limit: object, offset: object, max_limit: int) -> None:
    if not isinstance(limit, int) or not 1 <= limit <= max_limit:
        raise QueryError(f"limit must be an integer between 1 and {max_limit}")
    if not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise QueryError(f"offset must be an integer between 0 and {MAX_OFFSET}")


def _int(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise QueryError(f"{name} must be a non-negative integer")
    return int(raw)


def _is_da(value: str) -> bool:
    if not re.fullmatch(r"[0-9]{8}", value):
        return False
    try:
        dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


def _to_da(value: str | None, name: str) -> str | None:
    """``YYYY-MM-DD`` (an HTML date input) or ``YYYYMMDD`` -> ``YYYYMMDD``."""
    if value is None:
        return None
    da = value.replace("-", "") if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value) else value
    if not _is_da(da):
        raise QueryError(f"{name} must be a date YYYY-MM-DD")
    return da


# -- reading -------------------------------------------------------------------------------


class Browser:
    """Read-only view of the node database for the page (one short-lived connection)."""

    def __init__(self, db: Store | Path | str) -> None:
        path = db.db_path if isinstance(db, Store) else Path(db)
        try:
            self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path} for reading: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._tables = {
            str(r[0]): self._columns(str(r[0]))
            for r in self._rows("SELECT name FROM sqlite_master WHERE type='table'")
        }

    def close(self) -> None:
        self._conn.close()

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._conn.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"state database read failed: {exc}") from exc

    def _columns(self, table: str) -> frozenset[str]:
        return frozenset(str(r["name"]) for r in self._rows(f"PRAGMA table_info({table})"))

    @property
    def available(self) -> bool:
        """True when the database tracks series (the ``studies`` and ``series`` tables)."""
        return "series" in self._tables and "studies" in self._tables

    def fingerprint(self) -> str:
        """Changes whenever a slice, series state or label changes (cheap: the page polls it
        and fetches the study list only when it moved)."""
        parts = [self._max("predictions", "id"), self._max("predictions", "created_at")]
        if self.available:
            parts += [self._max("series", "last_seen"), self._max("series", "completed_at")]
            parts.append(self._count("series", "status = 'open'"))
        if "labels" in self._tables:
            parts += [self._max("labels", "at"), self._count("labels")]
        return ":".join(str(p) for p in parts)

    def _max(self, table: str, column: str) -> object:
        if column not in self._tables.get(table, ()):
            return None
        return self._rows(f"SELECT MAX({column}) AS m FROM {table}")[0]["m"]

    def _count(self, table: str, where: str = "1") -> int:
        return int(self._rows(f"SELECT COUNT(*) AS n FROM {table} WHERE {where}")[0]["n"])

    # -- studies ---------------------------------------------------------------------------

    def list_studies(self, query: StudyQuery) -> dict[str, Any]:
        """One page of studies, newest first, each with its (matching) series."""
        page: dict[str, Any] = {
            "available": self.available,
            "total": 0,
            "limit": query.limit,
            "offset": query.offset,
            "studies": [],
        }
        if not self.available:
            return page
        where, params = self._study_filter(query)
        total = self._rows(f"SELECT COUNT(*) AS n FROM studies st WHERE {where}", tuple(params))
        page["total"] = int(total[0]["n"])
        rows = self._rows(
            f"SELECT st.* FROM studies st WHERE {where}"
            " ORDER BY st.last_seen DESC, st.study_instance_uid LIMIT ? OFFSET ?",
            (*params, query.limit, query.offset),
        )
        for row in rows:
            study = dict(row)
            uid = str(study["study_instance_uid"])
            all_series = self._series_of(uid)
            shown = [s for s in all_series if _series_matches(s, query)]
            study["n_series"] = len(all_series)
            study["series"] = [self._series_summary(s, query.preview) for s in shown]
            page["studies"].append(study)
        return page

    def _study_filter(self, query: StudyQuery) -> tuple[str, list[Any]]:
        clauses: list[str] = ["1"]
        params: list[Any] = []
        series_conds, series_params = _series_conditions(query)
        if series_conds:
            clauses.append(
                "EXISTS (SELECT 1 FROM series s WHERE s.study_instance_uid ="
                f" st.study_instance_uid AND {' AND '.join(series_conds)})"
            )
            params += series_params
        for word in query.q.replace("^", " ").split():  # "Doe^Jane" as typed from a PN
            like = "%" + _escape_like(word.lower()) + "%"
            fields = [
                "REPLACE(LOWER(COALESCE(st.patient_name, '')), '^', ' ')",
                "LOWER(COALESCE(st.patient_id, ''))",
                "LOWER(COALESCE(st.accession_number, ''))",
                "LOWER(COALESCE(st.study_description, ''))",
            ]
            ors = [f"{f} LIKE ? ESCAPE '\\'" for f in fields]
            ors.append(
                "EXISTS (SELECT 1 FROM series s2 WHERE s2.study_instance_uid ="
                " st.study_instance_uid AND LOWER(COALESCE(s2.series_description, ''))"
                " LIKE ? ESCAPE '\\')"
            )
            clauses.append("(" + " OR ".join(ors) + ")")
            params += [like] * len(ors)
        if query.date_from is not None:
            clauses.append("st.study_date >= ?")
            params.append(query.date_from)
        if query.date_to is not None:
            clauses.append("st.study_date <= ?")
            params.append(query.date_to)
        return " AND ".join(clauses), params

    def _series_of(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT * FROM series WHERE study_instance_uid = ?"
            " ORDER BY COALESCE(series_number, 1e9), first_seen, series_instance_uid",
            (study_uid,),
        )
        return [dict(r) for r in rows]

    def _series_summary(self, series: dict[str, Any], preview: int) -> dict[str, Any]:
        uid = str(series["series_instance_uid"])
        out = {k: v for k, v in series.items() if k != "results_json"}
        out["state"] = series_state(series)
        counts = self._rows(
            "SELECT COUNT(*) AS n FROM predictions WHERE series_instance_uid = ?", (uid,)
        )
        out["n_slices"] = int(counts[0]["n"]) if counts else 0
        out["labels"] = self._label_summary(uid)
        out["key_slices"] = (
            self._slices(uid, series, order="p.prob_covid DESC, p.id", limit=preview, offset=0)
            if preview
            else []
        )
        return out

    # -- one series ------------------------------------------------------------------------

    def series_detail(self, series_uid: str, query: SliceQuery | None = None) -> dict[str, Any]:
        """A series with its study and a window of its slices; QueryError if unknown."""
        check_uid(series_uid, "series UID")
        query = query or SliceQuery()
        rows = self._rows("SELECT * FROM series WHERE series_instance_uid = ?", (series_uid,))
        if not self.available or not rows:
            raise QueryError("no such series")
        series = dict(rows[0])
        study_rows = self._rows(
            "SELECT * FROM studies WHERE study_instance_uid = ?",
            (series["study_instance_uid"],),
        )
        out = self._series_summary(series, 0)
        out["results_json"] = series.get("results_json")
        out["study"] = dict(study_rows[0]) if study_rows else None
        out["slices"] = self._slices(
            series_uid, series, order="p.id", limit=query.limit, offset=query.offset
        )
        out["slice_limit"], out["slice_offset"] = query.limit, query.offset
        return out

    def series_sop_uids(self, series_uid: str) -> list[str]:
        """Every SOPInstanceUID predicted in a series (what a series label applies to)."""
        check_uid(series_uid, "series UID")
        rows = self._rows(
            "SELECT DISTINCT sop_instance_uid FROM predictions WHERE series_instance_uid = ?"
            " ORDER BY sop_instance_uid",
            (series_uid,),
        )
        return [str(r["sop_instance_uid"]) for r in rows]

    def _label_join(self) -> tuple[str, str]:
        """(select columns, join clause) for the current label of each slice."""
        if "labels" not in self._tables:
            return (
                "NULL AS human_label, NULL AS labelled_by, NULL AS labelled_at,"
                " NULL AS label_source",
                "",
            )
        cols = self._tables["labels"]
        frame_cond = " AND (l.frame IS NULL OR l.frame = p.frame)" if "frame" in cols else ""
        return (
            "l.label AS human_label, l.who AS labelled_by, l.at AS labelled_at,"
            " l.source AS label_source",
            f" LEFT JOIN labels l ON l.sop_instance_uid = p.sop_instance_uid{frame_cond}",
        )

    def _slices(
        self, series_uid: str, series: dict[str, Any], *, order: str, limit: int, offset: int
    ) -> list[dict[str, Any]]:
        label_cols, label_join = self._label_join()
        verdict_col = "p.verdict" if "verdict" in self._tables.get("predictions", ()) else "NULL"
        # n_frames tells the page whether a label names one frame or the whole file.
        rows = self._rows(
            "SELECT p.id, p.sop_instance_uid, p.frame, p.label, p.prob_covid, p.confidence,"
            f" p.model_version, p.created_at, {verdict_col} AS verdict, {label_cols},"
            " (SELECT f.n_frames FROM files f WHERE f.path = p.path) AS n_frames"
            f" FROM predictions p{label_join} WHERE p.series_instance_uid = ?"
            f" ORDER BY {order} LIMIT ? OFFSET ?",
            (series_uid, limit, offset),
        )
        threshold = _float(series.get("threshold"), 0.5)
        band = _float(series.get("uncertain_band"), DEFAULT_UNCERTAIN_BAND)
        out = []
        for r in rows:
            s = dict(r)
            if s["verdict"] is None and s["prob_covid"] is not None:
                s["verdict"] = verdict_of(float(s["prob_covid"]), threshold, band)
            s["thumbnail"] = f"/api/thumbnails/{int(s['id'])}.png"
            s["image"] = f"/api/images/{int(s['id'])}.png"
            out.append(s)
        return out

    def _label_summary(self, series_uid: str) -> dict[str, Any]:
        """Counts of the human labels of a series' slices and the latest who/when."""
        summary: dict[str, Any] = {"covid": 0, "non_covid": 0, "last_who": None, "last_at": None}
        if "labels" not in self._tables:
            return summary
        _cols, join = self._label_join()
        rows = self._rows(
            "SELECT l.label AS label, l.who AS who, l.at AS at FROM predictions p"
            f"{join} WHERE p.series_instance_uid = ? AND l.label IS NOT NULL",
            (series_uid,),
        )
        for r in rows:
            if r["label"] in ("covid", "non_covid"):
                summary[r["label"]] += 1
            if summary["last_at"] is None or float(r["at"]) > summary["last_at"]:
                summary["last_who"], summary["last_at"] = r["who"], float(r["at"])
        return summary


def series_state(series: Mapping[str, Any]) -> str:
    """What the page shows for a series: skipped, pending (open), or its verdict."""
    if series.get("status") == "skipped":
        return "skipped"
    verdict = series.get("verdict")
    if verdict in VERDICTS:
        return str(verdict)
    return "pending"


def _series_conditions(query: StudyQuery) -> tuple[list[str], list[Any]]:
    conds: list[str] = []
    params: list[Any] = []
    if query.verdict is not None:
        conds.append("s.verdict = ?")
        params.append(query.verdict)
    if query.status is not None:
        conds.append("s.status = ?")
        params.append(query.status)
    return conds, params


def _series_matches(series: Mapping[str, Any], query: StudyQuery) -> bool:
    if query.verdict is not None and series.get("verdict") != query.verdict:
        return False
    return query.status is None or series.get("status") == query.status


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _float(value: object, default: float) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


@contextmanager
def browsing(db: Store | Path | str) -> Iterator[Browser]:
    """``with browsing(store) as b: b.list_studies(...)`` (closes the connection)."""
    b = Browser(db)
    try:
        yield b
    finally:
        b.close()


def list_studies(db: Store | Path | str, query: StudyQuery) -> dict[str, Any]:
    """One page of the study list (see :meth:`Browser.list_studies`)."""
    with browsing(db) as b:
        return b.list_studies(query)


def fingerprint(db: Store | Path | str) -> str:
    """See :meth:`Browser.fingerprint`."""
    with browsing(db) as b:
        return b.fingerprint()


def series_detail(
    db: Store | Path | str, series_uid: str, query: SliceQuery | None = None
) -> dict[str, Any]:
    """One series, its study and a window of its slices (see :meth:`Browser.series_detail`)."""
    with browsing(db) as b:
        return b.series_detail(series_uid, query)
