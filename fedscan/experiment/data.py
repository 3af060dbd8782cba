"""The experiment's data: the imported dataset (cached), label books per hospital, test samples.

The source folder is imported once with ``fedscan.dataset.import_dataset`` into a cache folder
(DICOM + ``index.csv``); a folder that already holds an ``index.csv`` (an earlier import, or
``fedscan dataset synthetic``) is used as it is. The official split decides the roles: ``train``
and ``val`` rows form the pool that is partitioned across hospitals, ``test`` rows are the
evaluation set of every arm.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from edge_node.ingest.preprocess import PreprocessParams
from edge_node.labels import LabelBook, LabelRecord
from edge_node.train.data import SampleSet, load_labelled
from fedscan.dataset import IndexRow, import_dataset, read_index
from fedscan.experiment.errors import ExperimentError

log = logging.getLogger(__name__)

WHO = "experiment"


def default_cache_dir(src: Path) -> Path:
    """``$XDG_CACHE_HOME/fedscan/datasets/<name>-<hash of the absolute path>``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:10]
    return base / "fedscan" / "datasets" / f"{src.resolve().name}-{digest}"


def ensure_index(src: Path, cache_dir: Path | None = None) -> Path:
    """The ``index.csv`` of ``src``: its own, a cached import, or a fresh import."""
    src = Path(src)
    if (src / "index.csv").is_file():
        return src / "index.csv"
    if not src.is_dir():
        raise ExperimentError(f"dataset folder {src} does not exist")
    cache = cache_dir or default_cache_dir(src)
    index = cache / "index.csv"
    if index.is_file():  # import_images writes index.csv last: present = complete
        log.info("using the cached import in %s", cache)
        return index
    t0 = time.perf_counter()
    print(f"importing {src} as DICOM into {cache} (once) ...", flush=True)
    import_dataset(src, cache)
    print(f"imported in {time.perf_counter() - t0:.0f} s", flush=True)
    return index


def load_rows(index: Path) -> tuple[list[IndexRow], list[IndexRow], Path]:
    """(pool rows = train + val, test rows, the folder their paths are relative to)."""
    rows = read_index(index)
    pool = [r for r in rows if r.split in ("train", "val")]
    test = [r for r in rows if r.split == "test"]
    if not pool or not test:
        raise ExperimentError(
            f"{index}: need train/val rows and test rows (found {len(pool)} and {len(test)})"
        )
    return pool, test, index.parent


def records(rows: Sequence[IndexRow], base: Path) -> list[LabelRecord]:
    """Label records as a node's label book would hold them."""
    return [
        LabelRecord(
            sop_instance_uid=r.sop_instance_uid,
            label=r.label,
            path=str((base / r.path).resolve()),
            patient_key=r.patient_key,
            who=WHO,
            source="csv",
            at=0.0,
        )
        for r in rows
    ]


def write_label_book(db_path: Path, rows: Sequence[IndexRow], base: Path) -> Path:
    """A fresh node database holding exactly the labels of ``rows`` (what train_once reads)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    with LabelBook(db_path) as book:
        for rec in records(rows, base):
            book.set(
                rec.sop_instance_uid,
                rec.label,
                who=WHO,
                source="csv",
                path=rec.path,
                patient_key=rec.patient_key,
            )
    return db_path


def eval_samples(
    rows: Sequence[IndexRow], base: Path, cache_dir: Path, *, texture: bool = False
) -> SampleSet:
    """The evaluation slices, preprocessed exactly as a node does (cached); with their texture
    features when ``texture``."""
    samples, report = load_labelled(
        records(rows, base), PreprocessParams(), cache_dir, texture=texture
    )
    if report.missing or report.unusable:
        raise ExperimentError(
            f"test set: {report.missing} missing and {report.unusable} unusable files"
        )
    return samples
