"""What a person watching the demo sees: one table, redrawn in place (plain ANSI, no extras).

Per node: files fed / predicted, labels, the model version it serves, the last round it
contributed to. Coordinator: the round, its status, updates in, the global version and the
nodes' weighted evaluation of the global model. Everything is read from the outside, as a
person would: each node's SQLite file read-only (``files``, ``labels``; docs/CONTRACTS.md), its
local API's ``/health``, and the coordinator's state read-only (``coordinator.state``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from coordinator.errors import CoordinatorError
from coordinator.reports import round_summaries
from coordinator.state import State


@dataclass(frozen=True)
class NodeView:
    node: str
    fed: int  # files dropped into its inbox so far
    fed_total: int
    labels_fed: int
    predicted: int  # inbox files with a stored prediction
    other: int  # skipped or quarantined
    labels: int  # labels recorded
    model: str  # served model version ("-" while none)
    last_round: int | None  # last round with an accepted update
    alive: bool


@dataclass(frozen=True)
class CoordinatorView:
    round: int | None
    rounds: int
    status: str
    accepted: int
    version: int | None
    weighted_accuracy: float | None  # last round with eval reports
    alive: bool


def node_counts(db: Path) -> tuple[int, int, int]:
    """(predicted files, skipped + quarantined files, labels) from the node's SQLite file."""
    if not db.is_file():
        return 0, 0, 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return 0, 0, 0
    try:
        predicted = other = labels = 0
        with contextlib.suppress(sqlite3.Error):
            for outcome, n in conn.execute("SELECT outcome, COUNT(*) FROM files GROUP BY outcome"):
                if outcome == "predicted":
                    predicted = int(n)
                else:
                    other += int(n)
        with contextlib.suppress(sqlite3.Error):
            labels = int(conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0])
        return predicted, other, labels
    finally:
        conn.close()


def served_version(state_dir: Path, timeout: float = 0.5) -> str | None:
    """The model version the node's API reports (``/health``), None when unreachable."""
    try:
        port = int((state_dir / "api.port").read_text().strip())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError):
        return None
    version = doc.get("model_version")
    return None if version is None else str(version)


def coordinator_view(
    state_dir: Path, rounds: int, alive: bool
) -> tuple[CoordinatorView, dict[str, int]]:
    """The coordinator's progress, and the last accepted round of each node."""
    try:
        state = State(state_dir, readonly=True)
    except CoordinatorError:
        return CoordinatorView(None, rounds, "starting", 0, None, None, alive), {}
    try:
        summaries = round_summaries(state)
        latest = state.latest_version()
    except (sqlite3.Error, CoordinatorError):
        return CoordinatorView(None, rounds, "starting", 0, None, None, alive), {}
    finally:
        state.close()
    last_round: dict[str, int] = {}
    for s in summaries:
        for node in s["accepted"]:
            last_round[node] = max(last_round.get(node, 0), int(s["round"]))
    weighted = None
    for s in summaries:
        if s["weighted"]:
            weighted = s["weighted"].get("accuracy")
    cur = summaries[-1] if summaries else None
    view = CoordinatorView(
        round=None if cur is None else int(cur["round"]),
        rounds=rounds,
        status="waiting" if cur is None else str(cur["outcome"] or cur["status"]),
        accepted=0 if cur is None else len(cur["accepted"]),
        version=None if latest is None else latest.version,
        weighted_accuracy=weighted,
        alive=alive,
    )
    return view, last_round


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render(
    nodes: Sequence[NodeView], coord: CoordinatorView, elapsed_s: float, phase: str
) -> list[str]:
    """The table's lines (no colour, so logs and dumb terminals read it too)."""
    lines = [f"fedscan demo  {elapsed_s:6.0f} s  {phase}"]
    head = f"{'node':<12} {'fed':>9} {'labelled':>8} {'predicted':>9} {'labels':>6} "
    head += f"{'model':>6} {'round':>5}  state"
    lines.append(head)
    for n in nodes:
        state = "running" if n.alive else "STOPPED"
        if n.alive and n.model == "-":
            state = "waiting for the global model"
        elif n.alive and n.fed < n.fed_total:
            state = "receiving slices"
        lines.append(
            f"{n.node:<12} {f'{n.fed}/{n.fed_total}':>9} {n.labels_fed:>8} {n.predicted:>9} "
            f"{n.labels:>6} {n.model:>6} {('-' if n.last_round is None else n.last_round):>5}"
            f"  {state}{f' ({n.other} skipped/quarantined)' if n.other else ''}"
        )
    c = coord
    rnd = "-" if c.round is None else f"{c.round}/{c.rounds}"
    ver = "-" if c.version is None else f"v{c.version}"
    lines.append(
        f"coordinator  round {rnd}  {c.status}  updates {c.accepted}  global {ver}  "
        f"nodes' accuracy of the global model {_pct(c.weighted_accuracy)}"
        f"{'' if c.alive else '  (exited)'}"
    )
    return lines


class LiveTable:
    """Redraws the table in place on a terminal; elsewhere prints it when it changes (at most
    every ``every_s`` seconds), so a log file stays readable."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None,
                 every_s: float = 15.0) -> None:  # fmt: skip
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s
        self._drawn = 0
        self._last_text = ""
        self._last_print = 0.0

    def show(self, lines: Sequence[str]) -> None:
        if self.live:
            out = ""
            if self._drawn:
                out += f"\x1b[{self._drawn}F"  # back to the first line of the last drawing
            out += "".join(f"\x1b[2K{line}\n" for line in lines) + "\x1b[J"
            self.stream.write(out)
            self.stream.flush()
            self._drawn = len(lines)
            return
        body = "\n".join(lines[1:])
        now = time.monotonic()
        if body != self._last_text and now - self._last_print >= self.every_s:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
            self._last_text, self._last_print = body, now

    def final(self, lines: Sequence[str]) -> None:
        """Always print the last state (and stop redrawing over it)."""
        if self.live:
            self.show(lines)
        else:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        self._drawn = 0
