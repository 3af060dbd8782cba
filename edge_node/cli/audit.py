"""`fedscan node audit`: prove that every inbox file has exactly one recorded outcome.

    fedscan node audit --config node.toml [--json] [--strict] [--wait SECONDS]

Compares the files in the inbox with the ``files`` table of the node's SQLite state and prints
``{"files_seen", "predicted", "skipped", "quarantined", "missing"}``: counts of inbox files (a
multi-frame file counts once) and ``missing``, the inbox files (paths relative to the inbox)
with no outcome recorded for the file *as it is now*. A file rewritten after its outcome was
stored (other size or mtime) is missing until the node has handled the new version, exactly as
the node's catch-up scan sees it. Every file counts (symlinks followed), whatever its
extension: files the allow-list ignores and dangling links have a ``skipped`` row; only hidden
files or folders and writer droppings (``.tmp``, ``.part``, ...) are not inputs.

The node's database is opened read-only, so auditing a running node is safe. ``--wait``
re-checks until nothing is missing or the time is up (after a restart, while the node catches
up); ``--strict`` exits 9 when files are still missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_node.config import NodeConfig, load_config
from edge_node.errors import SOME_INPUTS_FAILED, ConfigError, StoreError
from edge_node.ingest.watcher import IGNORED_PREFIXES, IGNORED_SUFFIXES

Signature = tuple[int, float]  # (size, st_mtime), as the watcher keys files


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


def inbox_files(inbox: Path) -> dict[Path, Signature]:
    """Every file under ``inbox`` (recursive) -> signature, as the watcher keys it.

    Hidden files and folders and writers' temporary files are left out (the watcher never
    records them); every other entry counts, whatever its extension: files the allow-list
    ignores, dangling symlinks (signature of the link itself) and FIFOs get a ``skipped`` row
    from the node. Paths are ``<resolved inbox>/<relative path>``, the form the node stores;
    files that vanish during the walk are left out.
    """
    root = inbox.resolve()
    found: dict[Path, Signature] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(IGNORED_PREFIXES)]
        for name in files:
            if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
                continue
            path = Path(dirpath) / name
            try:
                st = os.stat(path)
            except OSError:
                try:
                    st = os.lstat(path)  # a dangling link: the node records the link itself
                except OSError:
                    continue
                if not stat.S_ISLNK(st.st_mode):
                    continue
            found[path] = (st.st_size, st.st_mtime)
    return dict(sorted(found.items()))


def recorded_outcomes(db: Path) -> dict[str, tuple[str, Signature]]:
    """path -> (outcome, (size, mtime)) from the node's ``files`` table (read-only)."""
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            rows = con.execute("SELECT path, outcome, size, mtime FROM files").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read node state {db}: {exc}") from exc
    return {
        str(path): (str(outcome), (int(size or 0), float(mtime or 0.0)))
        for path, outcome, size, mtime in rows
    }


def audit(config: NodeConfig) -> AuditReport:
    """One comparison of the inbox with the recorded outcomes."""
    inbox = config.paths.inbox
    if not inbox.is_dir():
        raise ConfigError(f"inbox {inbox} is not a folder (check [paths] inbox in the config)")
    files = inbox_files(inbox)
    outcomes = recorded_outcomes(config.paths.database)
    counts = {"predicted": 0, "skipped": 0, "quarantined": 0}
    missing: list[str] = []
    root = inbox.resolve()
    for path, signature in files.items():
        found = outcomes.get(str(path)) or outcomes.get(str(path.resolve()))
        if found is not None and found[0] in counts and found[1] == signature:
            counts[found[0]] += 1
        else:
            missing.append(str(path.relative_to(root)))
    return AuditReport(files_seen=len(files), missing=missing, **counts)


def audit_until_complete(config: NodeConfig, wait_s: float, poll_s: float = 0.5) -> AuditReport:
    """``audit`` again every ``poll_s`` until nothing is missing or ``wait_s`` has passed."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        report = audit(config)
        if report.complete or time.monotonic() >= deadline:
            return report
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def which(config: NodeConfig, tag: str) -> list[tuple[str, str, str | None]]:
    """(path relative to the inbox, outcome, reason) of the recorded files whose log tag
    (``edge_node.ingest.quarantine.path_tag``) is ``tag``: the logs name files by tag only."""
    from edge_node.ingest.quarantine import path_tag

    db = config.paths.database
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("SELECT path, outcome, reason FROM files").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read node state {db}: {exc}") from exc
    root = config.paths.inbox.resolve()
    found = []
    for path, outcome, reason in rows:
        if path_tag(path) == tag:
            p = Path(path)
            found.append(
                (str(p.relative_to(root)) if p.is_relative_to(root) else str(p), outcome, reason)
            )
    return found


def _run(args: argparse.Namespace) -> int:
    if args.wait is not None and args.wait < 0:
        raise ConfigError("--wait must be >= 0 seconds")
    config = load_config(Path(args.config))
    if args.which:
        hits = which(config, args.which)
        for rel, outcome, reason in hits:
            print(f"{rel}: {outcome}" + (f" ({reason})" if reason else ""))
        if not hits:
            print(f"no recorded file has the tag {args.which}", file=sys.stderr)
        return 0 if hits else SOME_INPUTS_FAILED
    report = audit_until_complete(config, args.wait or 0.0)
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
    return 0 if report.complete or not args.strict else SOME_INPUTS_FAILED


def add_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="compare the inbox with the node's recorded outcomes")
    p.add_argument("--config", required=True, help="node.toml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--strict", action="store_true", help="exit 9 when files are missing")
    p.add_argument(
        "--which",
        metavar="TAG",
        help="the file a log line names by TAG: its inbox path and outcome (exit 9 if none)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="re-check until nothing is missing or SECONDS have passed",
    )
    p.set_defaults(func=_run)
