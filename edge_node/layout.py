"""The node's state folder, defined once: what lives where under ``[paths] state_dir``.

::

    <state_dir>/
    ├── node.sqlite (-wal, -shm)  predictions, labels, ledger          edge_node.store
    ├── node.lock                 one node per state folder            edge_node.state_lock
    ├── api.port                  port the HTTP API listens on         edge_node.daemon
    ├── dicom.port                port of the DICOM listener           edge_node.dicomnet
    ├── uploads/                  DICOM files posted to /api/predict   serve.api, retention
    ├── thumbnails/               cached PNGs of predicted slices      serve.api, retention
    ├── decoding/                 crash-loop guard markers             serve.crash_guard
    ├── outbox/                   DICOM results waiting to be sent     dicomnet, results
    ├── federation/               sync state, update spool, rounds     edge_node.federate
    └── train/                    training runs and caches             edge_node.train

``uploads/`` and ``thumbnails/`` hold patient data in every file (``file_modes`` keeps them
owner-only; ``retention`` sweeps them). Nothing else under the state folder is swept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")  # the database file and its companions


@dataclass(frozen=True)
class StateLayout:
    """Paths under one node's state folder (nothing is created here)."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "node.sqlite"

    @property
    def lock(self) -> Path:
        return self.root / "node.lock"

    @property
    def api_port(self) -> Path:
        return self.root / "api.port"

    @property
    def dicom_port(self) -> Path:
        return self.root / "dicom.port"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def thumbnails(self) -> Path:
        return self.root / "thumbnails"

    @property
    def decoding(self) -> Path:
        return self.root / "decoding"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def federation(self) -> Path:
        return self.root / "federation"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def train_runs(self) -> Path:
        return self.train / "runs"

    @property
    def database_files(self) -> tuple[Path, ...]:
        """The SQLite file and its WAL / shared-memory / journal companions."""
        return tuple(Path(f"{self.database}{suffix}") for suffix in SQLITE_SUFFIXES)

    @property
    def patient_data_dirs(self) -> tuple[Path, ...]:
        """Folders whose every file is patient data the node made itself."""
        return (self.uploads, self.thumbnails)
