"""Durable coordinator state: SQLite (WAL, synchronous=FULL) plus safetensors checkpoints.

Layout of ``state_dir``::

    coordinator.sqlite                      rounds, updates, versions, metrics
    checkpoints/global_v{N}.safetensors     global weights of version N (the wire payload)
    checkpoints/strategy_v{N}.safetensors   server strategy state after producing N (FedAdam)
    spool/round_{R}/{node}.safetensors      accepted float32 deltas of round R

Crash safety rests on three rules: (1) a file is written atomically before the row that points
to it is committed, so a row never points to a partial file and an orphan file is harmless;
(2) a received update is one row keyed (round, node): it is counted at most once; (3) the new
version row, the round's close and the ``counted_in_aggregate`` marks are one transaction, so
after a crash either nothing of the aggregation happened (it is recomputed from the spool) or
all of it did.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from coordinator.errors import StateError
from coordinator.records import (
    MetricsRow,
    RoundRow,
    UpdateRow,
    VersionRow,
    round_row,
    update_row,
    version_row,
)
from coordinator.spool import load_tensors, save_tensors

__all__ = ["MetricsRow", "RoundRow", "State", "UpdateRow", "VersionRow"]

ROUND_STATUSES = ("open", "collecting", "aggregating", "closed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('open', 'collecting', 'aggregating', 'closed')),
    config TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    extended INTEGER NOT NULL DEFAULT 0,
    closed_at REAL,
    version_in INTEGER NOT NULL,
    version_out INTEGER,
    outcome TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL,
    node TEXT NOT NULL,
    nonce TEXT,
    num_samples INTEGER,
    accepted INTEGER NOT NULL,
    reason TEXT,
    norm REAL,
    spool_path TEXT,
    counted_in_aggregate INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    PRIMARY KEY (round, node)
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    round INTEGER,
    retired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL,
    node TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    n_val INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round, node, model_version)
);
"""


class State:
    """The coordinator's SQLite state and checkpoint files under ``state_dir``."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.dir = Path(state_dir)
        self.db_path = self.dir / "coordinator.sqlite"
        self.checkpoints = self.dir / "checkpoints"
        self.spool = self.dir / "spool"
        try:
            if readonly:
                if not self.db_path.exists():
                    raise StateError(f"no coordinator state in {self.dir}")
                uri = f"file:{self.db_path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10)
            else:
                self.checkpoints.mkdir(parents=True, exist_ok=True)
                self.spool.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open {self.db_path}: {exc}") from exc
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StateError(f"state database: {exc}") from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return list(self._db.execute(sql, args))
        except sqlite3.Error as exc:
            raise StateError(f"state database: {exc}") from exc

    # -- versions and checkpoints -------------------------------------------------------------

    def checkpoint_path(self, version: int) -> Path:
        return self.checkpoints / f"global_v{version}.safetensors"

    def strategy_path(self, version: int) -> Path:
        return self.checkpoints / f"strategy_v{version}.safetensors"

    def write_checkpoint(
        self,
        version: int,
        weights: Mapping[str, np.ndarray],
        metadata: dict[str, str],
        strategy_state: Mapping[str, np.ndarray] | None = None,
    ) -> str:
        """Write global_v{version} (and its strategy state) atomically; returns the sha256.
        The version is not visible until :meth:`add_version` / :meth:`commit_aggregate`.
        A tensor holding NaN or inf is refused (StateError): such a checkpoint would be
        published, and every node would refuse it; the federation would stall."""
        bad = [
            k
            for k, v in weights.items()
            if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v).all()
        ]
        if bad:
            raise StateError(
                f"global v{version} not written: {len(bad)} tensors hold NaN or inf ({bad[0]})"
            )
        if strategy_state:
            save_tensors(self.strategy_path(version), strategy_state)
        path = self.checkpoint_path(version)
        save_tensors(path, weights, metadata={**metadata, "version": str(version)})
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def add_version(self, version: int, sha256: str, round_id: int | None = None) -> None:
        rel = str(self.checkpoint_path(version).relative_to(self.dir))
        with self.transaction() as db:
            db.execute(
                "INSERT INTO versions (version, sha256, path, created_at, round)"
                " VALUES (?,?,?,?,?)",
                (version, sha256, rel, time.time(), round_id),
            )

    def latest_version(self) -> VersionRow | None:
        rows = self._query("SELECT * FROM versions ORDER BY version DESC LIMIT 1")
        return version_row(rows[0]) if rows else None

    def versions(self) -> list[VersionRow]:
        return [version_row(r) for r in self._query("SELECT * FROM versions ORDER BY version")]

    def mark_retired(self, version: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE versions SET retired = 1 WHERE version = ?", (version,))

    def load_checkpoint(self, version: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return load_tensors(self.checkpoint_path(version))

    def checkpoint_metadata(self, version: int) -> dict[str, str]:
        """The safetensors metadata of global_v{version} (header only, no tensors)."""
        path = self.checkpoint_path(version)
        try:
            with safe_open(str(path), framework="numpy") as f:
                return dict(f.metadata() or {})
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {path.name}: {exc}") from exc

    def load_strategy_state(self, version: int) -> dict[str, np.ndarray]:
        path = self.strategy_path(version)
        return load_tensors(path)[0] if path.exists() else {}

    # -- rounds --------------------------------------------------------------------------------

    def open_round(
        self,
        round_id: int,
        config: dict[str, Any],
        opened_at: float,
        deadline: float,
        version_in: int,
    ) -> RoundRow:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO rounds (id, status, config, opened_at, deadline, version_in)"
                " VALUES (?, 'open', ?, ?, ?, ?)",
                (round_id, json.dumps(config, sort_keys=True), opened_at, deadline, version_in),
            )
        return self.round(round_id)

    def round(self, round_id: int) -> RoundRow:
        rows = self._query("SELECT * FROM rounds WHERE id = ?", (round_id,))
        if not rows:
            raise StateError(f"round {round_id} not in the state")
        return round_row(rows[0])

    def rounds(self) -> list[RoundRow]:
        return [round_row(r) for r in self._query("SELECT * FROM rounds ORDER BY id")]

    def last_round(self) -> RoundRow | None:
        rows = self._query("SELECT * FROM rounds ORDER BY id DESC LIMIT 1")
        return round_row(rows[0]) if rows else None

    def set_status(self, round_id: int, status: str) -> None:
        if status not in ROUND_STATUSES:
            raise StateError(f"bad round status {status!r}")
        with self.transaction() as db:
            db.execute("UPDATE rounds SET status = ? WHERE id = ?", (status, round_id))

    def extend_deadline(self, round_id: int, deadline: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET deadline = ?, extended = 1 WHERE id = ?", (deadline, round_id)
            )

    def close_round(
        self,
        round_id: int,
        outcome: str,
        closed_at: float,
        outliers: Mapping[str, str] | None = None,
    ) -> None:
        """Close without a new version (no quorum); ``outliers`` refused in the same commit."""
        with self.transaction() as db:
            for node, reason in (outliers or {}).items():
                db.execute(
                    "UPDATE updates SET accepted = 0, reason = ? WHERE round = ? AND node = ?",
                    (reason, round_id, node),
                )
            db.execute(
                "UPDATE rounds SET status = 'closed', outcome = ?, closed_at = ? WHERE id = ?",
                (outcome, closed_at, round_id),
            )

    def commit_aggregate(
        self,
        round_id: int,
        version: int,
        sha256: str,
        counted: Sequence[str],
        outliers: Mapping[str, str],
        closed_at: float,
    ) -> None:
        """One transaction: new version, refused outliers, counted marks, round closed."""
        rel = str(self.checkpoint_path(version).relative_to(self.dir))
        with self.transaction() as db:
            db.execute(
                "INSERT INTO versions (version, sha256, path, created_at, round)"
                " VALUES (?,?,?,?,?)",
                (version, sha256, rel, closed_at, round_id),
            )
            for node, reason in outliers.items():
                db.execute(
                    "UPDATE updates SET accepted = 0, reason = ? WHERE round = ? AND node = ?",
                    (reason, round_id, node),
                )
            db.executemany(
                "UPDATE updates SET counted_in_aggregate = 1 WHERE round = ? AND node = ?",
                [(round_id, n) for n in counted],
            )
            db.execute(
                "UPDATE rounds SET status = 'closed', outcome = 'aggregated', closed_at = ?,"
                " version_out = ? WHERE id = ?",
                (closed_at, version, round_id),
            )

    # -- updates -------------------------------------------------------------------------------

    def spool_path(self, round_id: int, node: str) -> Path:
        return self.spool / f"round_{round_id}" / f"{node}.safetensors"

    def record_update(self, row: UpdateRow) -> None:
        """Insert (or replace a previously *rejected*) update; an accepted one is final."""
        with self.transaction() as db:
            prev = db.execute(
                "SELECT accepted FROM updates WHERE round = ? AND node = ?", (row.round, row.node)
            ).fetchone()
            if prev is not None and prev["accepted"]:
                raise StateError(f"round {row.round}: an update of this node is already counted")
            db.execute(
                "INSERT OR REPLACE INTO updates (round, node, nonce, num_samples, accepted,"
                " reason, norm, spool_path, counted_in_aggregate, received_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    row.round,
                    row.node,
                    row.nonce,
                    row.num_samples,
                    int(row.accepted),
                    row.reason,
                    row.norm,
                    row.spool_path,
                    int(row.counted_in_aggregate),
                    row.received_at,
                ),
            )

    def get_update(self, round_id: int, node: str) -> UpdateRow | None:
        rows = self._query("SELECT * FROM updates WHERE round = ? AND node = ?", (round_id, node))
        return update_row(rows[0]) if rows else None

    def updates(self, round_id: int, accepted: bool | None = None) -> list[UpdateRow]:
        sql = "SELECT * FROM updates WHERE round = ?"
        args: list[Any] = [round_id]
        if accepted is not None:
            sql += " AND accepted = ?"
            args.append(int(accepted))
        return [update_row(r) for r in self._query(sql + " ORDER BY node", args)]

    # -- metrics -------------------------------------------------------------------------------

    def record_metrics(self, row: MetricsRow) -> None:
        """Store one node's evaluation of a global version (a resend replaces it)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO metrics (round, node, model_version, metrics, n_val,"
                " received_at) VALUES (?,?,?,?,?,?)",
                (
                    row.round,
                    row.node,
                    row.model_version,
                    json.dumps(row.metrics, sort_keys=True),
                    row.n_val,
                    row.received_at,
                ),
            )

    def metrics(self, round_id: int | None = None) -> list[MetricsRow]:
        if round_id is None:
            rows = self._query("SELECT * FROM metrics ORDER BY round, node")
        else:
            rows = self._query("SELECT * FROM metrics WHERE round = ? ORDER BY node", (round_id,))
        return [
            MetricsRow(
                round=r["round"],
                node=r["node"],
                model_version=r["model_version"],
                metrics=json.loads(r["metrics"]),
                n_val=r["n_val"],
                received_at=r["received_at"],
            )
            for r in rows
        ]
