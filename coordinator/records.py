"""Rows of the coordinator's SQLite state as frozen dataclasses (see ``coordinator.state``)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RoundRow:
    id: int
    status: str
    config: dict[str, Any]
    opened_at: float
    deadline: float
    extended: bool
    closed_at: float | None
    version_in: int
    version_out: int | None
    outcome: str | None


@dataclass(frozen=True)
class UpdateRow:
    round: int
    node: str
    nonce: str | None
    num_samples: int | None
    accepted: bool
    reason: str | None
    norm: float | None
    spool_path: str | None  # relative to state_dir
    counted_in_aggregate: bool
    received_at: float


@dataclass(frozen=True)
class VersionRow:
    version: int
    sha256: str
    path: str  # relative to state_dir
    created_at: float
    round: int | None
    retired: bool


@dataclass(frozen=True)
class MetricsRow:
    round: int
    node: str
    model_version: int
    metrics: dict[str, Any]
    n_val: int
    received_at: float


def round_row(r: sqlite3.Row) -> RoundRow:
    return RoundRow(
        id=r["id"],
        status=r["status"],
        config=json.loads(r["config"]),
        opened_at=r["opened_at"],
        deadline=r["deadline"],
        extended=bool(r["extended"]),
        closed_at=r["closed_at"],
        version_in=r["version_in"],
        version_out=r["version_out"],
        outcome=r["outcome"],
    )


def update_row(r: sqlite3.Row) -> UpdateRow:
    return UpdateRow(
        round=r["round"],
        node=r["node"],
        nonce=r["nonce"],
        num_samples=r["num_samples"],
        accepted=bool(r["accepted"]),
        reason=r["reason"],
        norm=r["norm"],
        spool_path=r["spool_path"],
        counted_in_aggregate=bool(r["counted_in_aggregate"]),
        received_at=r["received_at"],
    )


def version_row(r: sqlite3.Row) -> VersionRow:
    return VersionRow(
        version=r["version"],
        sha256=r["sha256"],
        path=r["path"],
        created_at=r["created_at"],
        round=r["round"],
        retired=bool(r["retired"]),
    )
