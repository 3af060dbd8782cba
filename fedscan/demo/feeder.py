"""Drip slices into the hospitals' inboxes over time, as a scanner / PACS would.

Labelled slices go to ``<inbox>/labelled/<label>/`` (the label folder convention: the node
predicts them and records the label), unlabelled ones to ``<inbox>/`` (predicted only). Each
copy is written into a staging folder beside the inbox and renamed into place, so the watcher
only ever sees complete files (a "moved" event). The schedule is seeded: slices of every node
are spread evenly over ``duration_s`` in a shuffled order, labelled and unlabelled interleaved.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedscan.dataset import IndexRow
from fedscan.demo.plan import NodePlan

log = logging.getLogger(__name__)

LABELLED_DIR = "labelled"  # edge_node.labels.LABELLED_DIR


@dataclass(frozen=True)
class Drop:
    at_s: float  # seconds after the start
    node: str
    src: Path
    dst: Path  # absolute, inside the node's inbox
    labelled: bool


def schedule(
    plans: Sequence[NodePlan],
    inboxes: dict[str, Path],
    base: Path,
    duration_s: float,
    seed: int = 0,
) -> list[Drop]:
    """Every drop of every node, in time order."""
    rng = np.random.default_rng([seed, 99])
    drops: list[Drop] = []
    for plan in plans:
        inbox = inboxes[plan.node]
        items: list[tuple[IndexRow, bool]] = [(r, True) for r in plan.labelled]
        items += [(r, False) for r in plan.unlabelled]
        order = rng.permutation(len(items))
        used: set[Path] = set()
        step = duration_s / max(1, len(items))
        for k, i in enumerate(order):
            row, labelled = items[int(i)]
            folder = inbox / LABELLED_DIR / row.label if labelled else inbox
            dst = folder / Path(row.path).name
            n = 1
            while dst in used:  # same file name from two splits
                dst = folder / f"{Path(row.path).stem}-{n}.dcm"
                n += 1
            used.add(dst)
            drops.append(Drop(k * step, plan.node, base / row.path, dst, labelled))
    drops.sort(key=lambda d: (d.at_s, d.node))
    return drops


def deliver(drop: Drop, staging: Path) -> None:
    """Copy ``drop.src`` into place atomically (staging file + rename)."""
    staging.mkdir(parents=True, exist_ok=True)
    drop.dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging / f".{drop.node}-{drop.dst.name}.part"
    shutil.copyfile(drop.src, tmp)
    os.replace(tmp, drop.dst)


class Feeder:
    """Runs a schedule in a thread; counts what each node has received."""

    def __init__(self, drops: Sequence[Drop], staging: Path) -> None:
        self.drops = list(drops)
        self.staging = staging
        self.delivered: dict[str, dict[str, int]] = {}
        self.totals: dict[str, dict[str, int]] = {}
        for d in self.drops:
            kind = "labelled" if d.labelled else "unlabelled"
            self.totals.setdefault(d.node, {"labelled": 0, "unlabelled": 0})[kind] += 1
            self.delivered.setdefault(d.node, {"labelled": 0, "unlabelled": 0})
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            for drop in self.drops:
                delay = t0 + drop.at_s - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                if self._stop.is_set():
                    return
                deliver(drop, self.staging)
                kind = "labelled" if drop.labelled else "unlabelled"
                self.delivered[drop.node][kind] += 1
        except OSError as exc:
            log.error("feeder stopped: %s", exc)
            self.error = exc
        finally:
            self._done.set()
