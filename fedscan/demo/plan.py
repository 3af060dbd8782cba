"""The demo's data: which slices each hospital receives (labelled and unlabelled) and the held-out
test set every model is scored on.

By default a synthetic CT set (``fedscan.synthetic``) sized for the run; with ``--dataset`` a
real one, imported once as DICOM (``fedscan.dataset``; cached like ``fedscan experiment``
does). The dataset's own patient-level split decides the roles: ``train`` + ``val`` patients
are the labelled pool, dealt to the hospitals by patient (``fedscan.experiment.partition``,
iid); ``test`` patients are the held-out test set, and are also dealt by patient to the
hospitals' inboxes without labels, so the nodes predict them live.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np

from fedscan.dataset import LABELS, IndexRow, read_index
from fedscan.demo.config import DemoConfig
from fedscan.demo.errors import DemoError
from fedscan.experiment.partition import partition

# synthetic: about this many slices per patient (few: with ~10 a model from 120 labels learns
# patients rather than opacities, and a hospital's validation patients often hold one class)
SLICES_PER_PATIENT = 4


@dataclass(frozen=True)
class NodePlan:
    node: str
    labelled: tuple[IndexRow, ...]  # go to inbox/labelled/<label>/
    unlabelled: tuple[IndexRow, ...]  # go to inbox/ (predicted, never trained on)


@dataclass(frozen=True)
class DataPlan:
    base: Path  # index paths are relative to this folder
    source: str  # human description
    nodes: tuple[NodePlan, ...]
    test: tuple[IndexRow, ...]  # held-out test set (every model is scored on it)

    def test_summary(self) -> dict[str, int]:
        return {
            "slices": len(self.test),
            "covid": sum(r.label == "covid" for r in self.test),
            "non_covid": sum(r.label == "non_covid" for r in self.test),
            "patients": len({r.patient_key for r in self.test}),
        }


def synthetic_index(config: DemoConfig, folder: Path) -> Path:
    """Generate (or reuse) a synthetic set sized for ``config``; returns its index.csv."""
    from fedscan.synthetic import generate

    per_node = config.labelled_per_node or 120
    pool, test = config.nodes * per_node, config.nodes * config.test_per_node
    total = pool + test
    n_patients = max(4 * config.nodes, 2 * math.ceil(total / SLICES_PER_PATIENT / 2))
    params = f"{config.seed}-{total}-{n_patients}-{config.synthetic_size}"
    marker = folder / "params.txt"
    index = folder / "index.csv"
    if index.is_file() and marker.is_file() and marker.read_text().strip() == params:
        return index
    t0 = time.perf_counter()
    print(f"generating {total} synthetic CT slices ({n_patients} patients) ...", flush=True)
    index = generate(
        folder,
        math.ceil(total / 2),
        seed=config.seed,
        n_patients=n_patients,
        size=config.synthetic_size,
        val_fraction=0.1,
        test_fraction=test / total,
    )
    marker.write_text(params + "\n")
    print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return index


def _cap(rows: Sequence[IndexRow], limit: int | None, seed: int) -> tuple[IndexRow, ...]:
    """Whole patients until ``limit`` slices, the classes taken in turn (patients shuffled
    within each class, seeded), so a capped share keeps both classes."""
    if limit is None:
        return tuple(rows)
    by_patient: dict[str, list[IndexRow]] = {}
    for r in rows:
        by_patient.setdefault(r.patient_key, []).append(r)
    rng = np.random.default_rng([seed, 17])
    queues = []
    for label in LABELS:
        keys = sorted(p for p, rs in by_patient.items() if rs[0].label == label)
        queues.append([keys[i] for i in rng.permutation(len(keys))])
    order = [p for pair in zip_longest(*queues) for p in pair if p is not None]
    out: list[IndexRow] = []
    for patient in order:
        group = by_patient[patient]
        if out and len(out) + len(group) > limit:
            continue
        out += group
    return tuple(out)


def make_plan(config: DemoConfig, index: Path, source: str) -> DataPlan:
    rows = read_index(index)
    pool = [r for r in rows if r.split in ("train", "val")]
    test = [r for r in rows if r.split == "test"]
    if len({r.patient_key for r in pool}) < config.nodes or not test:
        raise DemoError(
            f"{index}: not enough data for {config.nodes} hospitals "
            f"({len(pool)} labelled slices, {len(test)} test slices)"
        )
    labelled = partition(pool, config.nodes, "iid", config.seed)
    if len({r.patient_key for r in test}) >= config.nodes:
        unlabelled = [h.rows for h in partition(test, config.nodes, "iid", config.seed)]
    else:
        unlabelled = [tuple(test)] + [()] * (config.nodes - 1)
    cap = config.labelled_per_node if config.dataset is not None else None
    nodes = tuple(
        NodePlan(node, _cap(h.rows, cap, config.seed), tuple(u))
        for node, h, u in zip(config.node_ids, labelled, unlabelled, strict=True)
    )
    return DataPlan(base=index.parent, source=source, nodes=nodes, test=tuple(test))


def prepare_data(config: DemoConfig, data_dir: Path) -> DataPlan:
    """Synthetic or imported data, dealt to the hospitals."""
    if config.dataset is None:
        index = synthetic_index(config, data_dir / "synthetic")
        return make_plan(config, index, f"synthetic CT (fedscan.synthetic, seed {config.seed})")
    from fedscan.experiment.data import ensure_index

    index = ensure_index(config.dataset)
    return make_plan(config, index, f"dataset {config.dataset}")
