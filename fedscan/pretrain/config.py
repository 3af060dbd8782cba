"""Settings of one `fedscan pretrain` run (no torch here: the CLI builds it before training)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedscan.dataset import SPLITS
from fedscan.pretrain.errors import PretrainError
from fl_protocol.config_types import plain_fields

log = logging.getLogger(__name__)

# Bump when the views, the objective or the loop change what a checkpoint means.
METHOD_VERSION = "simclr/1"
DEFAULT_SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class PretrainConfig:
    out: Path  # backbone as fedscan weights (.safetensors); the report is written beside it
    dataset: Path | None = None  # folder with index.csv (fedscan dataset import / synthetic)
    inbox: Path | None = None  # or: any folder of DICOM files, searched recursively
    splits: tuple[str, ...] = DEFAULT_SPLITS  # index rows used (--dataset); test stays unseen
    arch: str = "resnet10_gn"  # export.zoo registry name
    epochs: int = 30
    batch_size: int = 64  # images per step (each seen as two views: 2 x batch_size embeddings)
    lr: float = 1e-3  # AdamW peak learning rate (1 epoch linear warmup, then cosine to 0)
    weight_decay: float = 1e-4  # AdamW
    temperature: float = 0.2  # NT-Xent softmax temperature
    threads: int = 2  # torch threads
    seed: int = 0  # model init, shuffling and views
    work_dir: Path | None = None  # frame cache + checkpoint; default <out stem>-work beside out

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.inbox is None):
            raise PretrainError("give exactly one of --dataset and --inbox")
        unknown = [s for s in self.splits if s not in SPLITS]
        if not self.splits or unknown:
            raise PretrainError(
                f"--splits must name some of {', '.join(SPLITS)} (got {','.join(self.splits)})"
            )
        if self.epochs < 1 or self.batch_size < 2:
            raise PretrainError("--epochs must be >= 1 and --batch-size >= 2")
        if not self.lr > 0 or self.weight_decay < 0 or not self.temperature > 0:
            raise PretrainError("--lr and --temperature must be > 0, weight decay >= 0")
        if self.threads < 1:
            raise PretrainError("--threads must be >= 1")

    @property
    def work(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        return self.out.parent / f"{self.out.stem}-work"

    @property
    def report_path(self) -> Path:
        """``<out>.json``: the run's summary beside the weights file."""
        return self.out.with_name(self.out.name + ".json")

    def warn_pointless(self) -> None:
        """Legal settings that do nothing, or that undo the point of the default."""
        if self.inbox is not None and self.splits != DEFAULT_SPLITS:
            log.warning("--splits applies to --dataset only; every file of the inbox is used")
        if self.dataset is not None and "test" in self.splits:
            log.warning("--splits includes test: the test slices are seen during pretraining")

    def fingerprint(self, data_digest: str) -> str:
        """What a checkpoint must match to be continued: the training settings and the images
        (not paths, threads or the work folder, which do not change what is learned)."""
        basis = {
            "method": METHOD_VERSION,
            "arch": self.arch,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "temperature": self.temperature,
            "seed": self.seed,
            "data": data_digest,
        }
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        d = plain_fields(self)
        d["work_dir"] = str(self.work)
        return d
