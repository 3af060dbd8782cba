"""Settings of one `fedscan experiment` run (the same model and budget for every arm)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedscan.experiment.errors import ExperimentError
from fedscan.experiment.partition import PARTITIONS
from fl_protocol.config_types import plain_fields
from fl_protocol.schedule import SCHEDULES


@dataclass(frozen=True)
class ExperimentConfig:
    dataset: Path  # source folder (UCSD layout, class folders) or a folder with index.csv
    json_out: Path  # results JSON
    nodes: int = 3  # hospitals
    partition: str = "iid"  # iid | label_skew | size_skew
    seeds: tuple[int, ...] = (0, 1, 2)
    arch: str = "cnn2d"  # export.zoo registry name
    rounds: int = 5  # FedAvg rounds
    local_epochs: int = 2  # epochs per hospital per round; local-only/centralized: R x E epochs
    lr: float = 1e-3  # AdamW
    # constant | cosine: local-only / centralized decay per epoch over their R x E epochs,
    # FedAvg per round (round r at step r - 1 of R, as the coordinator's [rounds] lr_schedule)
    lr_schedule: str = "constant"
    head_lr_mult: float = 1.0  # the classifier head trains at lr x this (texture weights)
    batch_size: int = 16
    val_fraction: float = 0.1  # the trainer's local validation share of patients (best epoch)
    augment: bool = True
    texture: bool = False  # GLCM + LBP texture features beside the CNN embedding (every arm)
    pretrained: Path | None = None  # backbone weights for v0 (e.g. `fedscan pretrain`'s output)
    threads: int = 1  # torch threads of each training
    jobs: int = 2  # trainings run at once (one arm of one seed each), in worker processes
    strategy: str = "fedavg"  # the coordinator's aggregation strategy (coordinator.strategy)
    strategy_args: tuple[tuple[str, float], ...] = ()  # its keyword arguments, e.g. beta 0.9
    tta: bool = False  # score (test + validation) as the mean over each slice and its mirror
    folds: int = 0  # 0: the official test split; K >= 2: patient-disjoint K-fold CV
    n_boot: int = 1000  # bootstrap resamples of patients for the intervals
    cache_dir: Path | None = None  # imported dataset (DICOM + index.csv); default under ~/.cache
    work_dir: Path | None = None  # label books, weights, trainer cache; default beside json_out

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ExperimentError(
                f"unknown partition {self.partition!r}; choices: {', '.join(PARTITIONS)}"
            )
        if self.nodes < 1:
            raise ExperimentError("--nodes must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ExperimentError("--seeds must be a non-empty list of distinct integers")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ExperimentError("rounds, local epochs, batch size and lr must be positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise ExperimentError("val_fraction must be in (0, 1)")
        if self.lr_schedule not in SCHEDULES:
            raise ExperimentError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}")
        if self.folds == 1 or self.folds < 0:
            raise ExperimentError("--folds must be 0 (official split) or >= 2")
        if self.n_boot < 10:
            raise ExperimentError("--n-boot must be >= 10")
        if self.threads < 1 or self.jobs < 1:
            raise ExperimentError("--threads and --jobs must be >= 1")

    @property
    def total_epochs(self) -> int:
        """The training budget of every arm, in passes over a hospital's (or the pool's) data."""
        return self.rounds * self.local_epochs

    @property
    def work(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        return self.json_out.parent / f"{self.json_out.stem}-work"

    def describe(self) -> dict[str, Any]:
        d = plain_fields(self)
        d["total_epochs"] = self.total_epochs
        return d
