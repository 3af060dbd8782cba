"""`fedscan node audit`: prove that every inbox file has exactly one recorded outcome.

Compares the files in the inbox with the ``files`` table of the node's SQLite state and prints
``{"files_seen", "predicted", "skipped", "quarantined", "missing"}`` where ``missing`` lists
inbox files (relative paths) with no recorded outcome. A multi-frame file counts once. The
node's database is opened read-only, so auditing a running node is safe.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_node.config import NodeConfig, load_config
from edge_node.errors import StoreError

# Files a writer is still producing or that are not inputs (editor/OS droppings).
_IGNORED_PREFIXES = (".",)
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".swp", "~")


@dataclass(frozen=True)
class AuditReport:
    files_seen: int
    predicted: int
    skipped: int
    quarantined: int
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


def inbox_files(inbox: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Every candidate input under ``inbox`` (recursive), with the watcher's filters."""
    found: list[Path] = []
    allowed = {e.lower() for e in extensions}
    for root, dirs, files in os.walk(inbox):
        dirs[:] = [d for d in dirs if not d.startswith(_IGNORED_PREFIXES)]
        for name in files:
            if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
                continue
            if Path(name).suffix.lower() not in allowed:
                continue
            found.append(Path(root) / name)
    return sorted(found)


def audit(config: NodeConfig) -> AuditReport:
    inbox = config.paths.inbox
    files = inbox_files(inbox, config.watcher.extensions) if inbox.exists() else []
    outcomes: dict[str, str] = {}
    db = config.paths.database
    if db.exists():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                rows = con.execute("SELECT path, outcome FROM files").fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read node state {db}: {exc}") from exc
        for path, outcome in rows:
            outcomes[str(Path(path).resolve())] = str(outcome)
    counts = {"predicted": 0, "skipped": 0, "quarantined": 0}
    missing: list[str] = []
    for path in files:
        outcome = outcomes.get(str(path.resolve()))
        if outcome in counts:
            counts[outcome] += 1
        else:
            missing.append(str(path.relative_to(inbox)))
    return AuditReport(files_seen=len(files), missing=missing, **counts)


def _run(args: argparse.Namespace) -> int:
    report = audit(load_config(Path(args.config)))
    if args.json:
        json.dump(asdict(report), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(
            f"files_seen={report.files_seen} predicted={report.predicted} "
            f"skipped={report.skipped} quarantined={report.quarantined} "
            f"missing={len(report.missing)}"
        )
        for rel in report.missing:
            print(f"  missing: {rel}")
    return 0 if report.complete or not args.strict else 1


def add_subcommands(node_sub: Any) -> None:
    p = node_sub.add_parser("audit", help="compare the inbox with the node's recorded outcomes")
    p.add_argument("--config", required=True, help="node.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--strict", action="store_true", help="exit 1 when files are missing")
    p.set_defaults(func=_run)
