"""What one local training is asked to do (``TrainJob``) and what it gives back (``TrainResult``).

Torch-free and JSON-serialisable: the daemon and ``fedscan node train`` build a job, hand it to
the low-priority worker subprocess (``python -m edge_node.train.job_subprocess job.json``) and
read the result back, without importing torch themselves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_node.config import NodeConfig
from edge_node.errors import TrainingError
from edge_node.layout import StateLayout
from fl_protocol.config_types import plain_fields
from fl_protocol.metrics import Metrics
from fl_protocol.schedule import SCHEDULES
from fl_protocol.schemas import TRAIN_MODES as MODES

GLOBAL_WEIGHTS = "global.safetensors"  # <model_dir>/global.safetensors: the current global model
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
METRICS_FILE = "metrics.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"


@dataclass(frozen=True)
class TrainJob:
    """One training run on the node's labels (see ``edge_node.train.trainer.train_once``)."""

    db_path: Path  # node.sqlite (labels + the store's tables)
    state_dir: Path  # caches and checkpoints live in <state_dir>/train/
    out_dir: Path  # weights.safetensors, model.onnx, metrics.json, result.json
    arch: str = "cnn2d"  # only for a fresh model (no init_weights)
    mode: str = "full"  # full | last_stage | head
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine over the job's epochs (fl_protocol.schedule)
    head_lr_mult: float = 1.0  # the classifier head trains at lr x this (trainer._optimizer)
    weight_decay: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.2
    split_salt: str = "demo"  # federation-wide salt of the patient split
    patience: int = 2  # early stopping on local validation loss; 0 = off
    augment: bool = True
    class_weighting: bool = True
    texture_features: bool = False  # only for a fresh model; init weights decide otherwise
    torch_threads: int = 1
    nice: int = 10
    pretrained: str | None = None  # fresh model's backbone: None, "hub" or a weights file
    init_weights: Path | None = None  # start from these weights (the global model)
    mu: float = 0.0  # FedProx proximal coefficient (0 = plain local training)
    export_onnx: bool = False
    model_version: str | None = None  # version written into the outputs; default local-<hash8>
    resume: bool = True  # continue from a matching checkpoint in <state_dir>/train/
    window_center: float = -600.0
    window_width: float = 1500.0
    size: int = 224
    modalities: tuple[str, ...] = ("CT",)
    inbox: Path | None = None  # when set, <inbox>/labelled/ is ingested before training

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TrainingError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainingError("epochs, batch_size and lr must be positive")
        if self.mu < 0:
            raise TrainingError("mu (FedProx) must be >= 0")
        if not 0 < self.head_lr_mult <= 100:
            raise TrainingError("head_lr_mult must be in (0, 100]")
        if self.lr_schedule not in SCHEDULES:
            raise TrainingError(
                f"lr_schedule must be one of {', '.join(SCHEDULES)}, not {self.lr_schedule!r}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainingError("val_fraction must be in (0, 1)")
        if self.torch_threads < 1:
            raise TrainingError("torch_threads must be >= 1")

    @property
    def train_dir(self) -> Path:
        return StateLayout(self.state_dir).train

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise TrainingError(f"unknown training job keys {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for k, v in d.items():
            ftype = str(fields[k].type)
            if "Path" in ftype and v is not None:
                v = Path(v)
            elif "tuple" in ftype and isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise TrainingError(f"cannot read training job {path}: {exc}") from exc

    @classmethod
    def from_config(
        cls,
        config: NodeConfig,
        *,
        out_dir: Path | None = None,
        init_weights: Path | None = None,
        **overrides: Any,
    ) -> TrainJob:
        """A job from ``node.toml``; ``overrides`` (None = keep) win, e.g. epochs, mode, mu.

        The starting point is ``init_weights`` if given, else ``<model_dir>/global.safetensors``
        when present, else a fresh ``training.arch`` model.
        """
        t = config.training
        if init_weights is None:
            candidate = config.paths.model_dir / GLOBAL_WEIGHTS
            init_weights = candidate if candidate.is_file() else None
        if out_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            out_dir = config.paths.state.train_runs / stamp
        values: dict[str, Any] = {
            "db_path": config.paths.database,
            "state_dir": config.paths.state_dir,
            "out_dir": out_dir,
            "arch": t.arch,
            "mode": t.mode,
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "lr_schedule": t.lr_schedule,
            "head_lr_mult": t.head_lr_mult,
            "weight_decay": t.weight_decay,
            "seed": t.seed,
            "val_fraction": t.val_fraction,
            "split_salt": config.federation.federation,
            "patience": t.early_stopping_patience,
            "augment": t.augment,
            "class_weighting": t.class_weighting,
            "texture_features": t.texture_features,
            "torch_threads": t.torch_threads,
            "nice": t.nice,
            "pretrained": t.pretrained,
            "init_weights": init_weights,
            "window_center": config.preprocess.window_center,
            "window_width": config.preprocess.window_width,
            "size": config.preprocess.size,
            "modalities": tuple(config.preprocess.modalities),
            "inbox": config.paths.inbox,
        }
        unknown = set(overrides) - set(values) - {"mu", "export_onnx", "model_version", "resume"}
        if unknown:
            raise TrainingError(f"unknown training overrides {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _metrics(d: dict[str, Any] | None) -> Metrics | None:
    return None if d is None else Metrics.from_dict(d)


@dataclass(frozen=True)
class TrainResult:
    """What a finished training hands back (also ``<out_dir>/result.json``)."""

    weights_path: Path  # the new local weights (best epoch), safetensors
    onnx_path: Path | None  # exported model when asked for
    metrics_path: Path  # per-epoch history and summary
    num_samples: int  # training samples (slices/frames) used: the FedAvg weight
    n_val: int  # local validation samples
    train_metrics: Metrics  # at the best epoch (on the augmented training pass)
    val_metrics: Metrics | None  # at the best epoch; None without a validation side
    init_val_metrics: Metrics | None  # the incoming model on the local validation side
    best_epoch: int  # 1-based
    epochs_run: int  # epochs completed (early stopping may end before job.epochs)
    images_per_s: float  # training throughput (forward + backward)
    init: str  # where the weights came from: "random", "hub" or a weights file name
    model_version: str
    arch: str
    mode: str
    trainable_keys: tuple[str, ...]  # state_dict keys this mode changes (for the update codec)
    resumed_from_epoch: int  # 0 = fresh start, k = continued after k checkpointed epochs
    seconds: float
    # the incoming model's calibration statistics on the local validation side
    # (fl_protocol.calibration.CalibrationStats.to_dict; counts and sums only), for the report
    init_val_calibration: dict[str, Any] | None = None
    # the trained model's operating point fitted on the local validation side (what its ONNX
    # export carries; fl_protocol.calibration.OperatingPoint.to_dict), None without one
    operating_point: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(self)  # Metrics fields become their to_dict()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        train = _metrics(d["train_metrics"])
        if train is None:
            raise TrainingError("training result has no train metrics")
        return cls(
            weights_path=Path(d["weights_path"]),
            onnx_path=Path(d["onnx_path"]) if d.get("onnx_path") else None,
            metrics_path=Path(d["metrics_path"]),
            num_samples=int(d["num_samples"]),
            n_val=int(d["n_val"]),
            train_metrics=train,
            val_metrics=_metrics(d.get("val_metrics")),
            init_val_metrics=_metrics(d.get("init_val_metrics")),
            best_epoch=int(d["best_epoch"]),
            epochs_run=int(d["epochs_run"]),
            images_per_s=float(d["images_per_s"]),
            init=str(d["init"]),
            model_version=str(d["model_version"]),
            arch=str(d["arch"]),
            mode=str(d["mode"]),
            trainable_keys=tuple(d["trainable_keys"]),
            resumed_from_epoch=int(d["resumed_from_epoch"]),
            seconds=float(d["seconds"]),
            init_val_calibration=d.get("init_val_calibration"),
            operating_point=d.get("operating_point"),
        )

    @classmethod
    def load(cls, path: Path) -> TrainResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise TrainingError(f"cannot read training result {path}: {exc}") from exc
