"""Patient-disjoint partitions of a labelled pool across hospitals.

Every patient goes to exactly one hospital with all of their slices. Target shares are in
slices, per class; patients are dealt (in a seeded random order, largest first so the greedy
fill lands close to the targets) to the hospital furthest below its target for that class.

- ``iid``         every hospital gets the same share of each class.
- ``label_skew``  class mix differs: covid shares fall as ``(n - h)^2`` over hospitals
                  h = 0..n-1 (3 hospitals: 64 / 29 / 7 %), non-covid shares mirror them, so the
                  hospitals have about the same size but opposite class balances.
- ``size_skew``   sizes differ, class mix the same: shares ``2^(n-1-h)`` (3: 57 / 29 / 14 %).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedscan.dataset import LABELS, IndexRow
from fedscan.experiment.errors import ExperimentError

PARTITIONS: tuple[str, ...] = ("iid", "label_skew", "size_skew")


@dataclass(frozen=True)
class Hospital:
    """One hospital's share of the pool."""

    name: str
    rows: tuple[IndexRow, ...]

    @property
    def patients(self) -> int:
        return len({r.patient_key for r in self.rows})

    def class_counts(self) -> dict[str, int]:
        counts = Counter(r.label for r in self.rows)
        return {label: counts.get(label, 0) for label in LABELS}

    def summary(self) -> dict[str, int | str]:
        return {"name": self.name, "slices": len(self.rows), "patients": self.patients,
                **self.class_counts()}  # fmt: skip


def class_shares(partition: str, n: int) -> dict[str, list[float]]:
    """Target share of each hospital, per class (each list sums to 1)."""
    if n < 1:
        raise ExperimentError("need at least one hospital")
    if partition == "iid":
        w = [1.0] * n
        return {label: _norm(w) for label in LABELS}
    if partition == "label_skew":
        w = [float((n - h) ** 2) for h in range(n)]
        return {"covid": _norm(w), "non_covid": _norm(w[::-1])}
    if partition == "size_skew":
        w = [float(2 ** (n - 1 - h)) for h in range(n)]
        return {label: _norm(w) for label in LABELS}
    raise ExperimentError(f"unknown partition {partition!r}; choices: {', '.join(PARTITIONS)}")


def _norm(w: list[float]) -> list[float]:
    total = sum(w)
    return [x / total for x in w]


def _patient_label(rows: Sequence[IndexRow]) -> str:
    """A patient's class: the majority of their slices (ties -> covid)."""
    counts = Counter(r.label for r in rows)
    return "covid" if counts["covid"] >= counts["non_covid"] else "non_covid"


def partition(
    rows: Sequence[IndexRow], n: int, kind: str, seed: int, prefix: str = "hospital"
) -> list[Hospital]:
    """Deal the patients of ``rows`` to ``n`` hospitals (see the module docstring)."""
    shares = class_shares(kind, n)
    by_patient: dict[str, list[IndexRow]] = defaultdict(list)
    for r in rows:
        by_patient[r.patient_key].append(r)
    if len(by_patient) < n:
        raise ExperimentError(f"{len(by_patient)} patients cannot fill {n} hospitals")
    rng = np.random.default_rng([seed, 4242])
    assigned: list[list[IndexRow]] = [[] for _ in range(n)]
    for label in LABELS:
        patients = sorted(p for p, prs in by_patient.items() if _patient_label(prs) == label)
        order = [patients[i] for i in rng.permutation(len(patients))]
        # largest first (stable for equal sizes, so the shuffle still decides among them)
        order.sort(key=lambda p: -len(by_patient[p]))
        total = sum(len(by_patient[p]) for p in order)
        target = [s * total for s in shares[label]]
        have = [0] * n
        for p in order:
            # furthest below target; ties: the hospital with the least data so far
            h = max(range(n), key=lambda i: (target[i] - have[i], -len(assigned[i]), -i))
            assigned[h] += by_patient[p]
            have[h] += len(by_patient[p])
    hospitals = [
        Hospital(f"{prefix}-{h + 1}", tuple(sorted(a, key=lambda r: r.path)))
        for h, a in enumerate(assigned)
    ]
    empty = [h.name for h in hospitals if not h.rows]
    if empty:
        raise ExperimentError(f"partition {kind} left {', '.join(empty)} without data")
    return hospitals
