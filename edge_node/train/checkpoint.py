"""Per-epoch training checkpoints (safetensors + JSON, no pickle), written atomically.

A checkpoint is ``checkpoint-<epoch>.safetensors`` (model, best-so-far model, optimizer
moments, RNG states, the incoming weights of trainable tensors for FedProx) plus
``checkpoint.json`` (epoch, history, early-stopping state, optimizer hyper-parameters, the job
fingerprint and the tensor file's sha256). The JSON is replaced last and is the commit point: a
crash while writing leaves the previous checkpoint intact. A checkpoint resumes only the job
with the same fingerprint (same data, labels, split, model and settings).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fl_protocol.files import sha256_file

log = logging.getLogger(__name__)

SCHEMA = "fedscan.train_checkpoint/1"
INDEX = "checkpoint.json"


@dataclass
class CheckpointState:
    """Everything needed to continue a training after ``epoch`` completed epochs."""

    fingerprint: str
    epoch: int
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]  # incoming (global) values of the trainable tensors
    optimizer: dict[str, Any]  # torch optimizer state_dict
    torch_rng: torch.Tensor
    generator_rng: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)  # history, best epoch, patience, ...


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, writer: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in opt_state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt/{idx}/{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, slots in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def save(folder: Path, ckpt: CheckpointState) -> Path:
    """Write ``ckpt`` into ``folder``; the previous epoch's tensor file is removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, part in (("model", ckpt.model), ("best", ckpt.best), ("ref", ckpt.reference)):
        for k, v in part.items():
            tensors[f"{prefix}/{k}"] = v.detach().to("cpu").contiguous().clone()
    opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
    tensors.update(opt_tensors)
    tensors["rng/torch"] = ckpt.torch_rng.contiguous()
    tensors["rng/generator"] = ckpt.generator_rng.contiguous()
    name = f"checkpoint-{ckpt.epoch}.safetensors"
    tensor_path = folder / name
    _atomic_write(tensor_path, lambda tmp: save_file(tensors, tmp))
    index = {
        "schema": SCHEMA,
        "fingerprint": ckpt.fingerprint,
        "epoch": ckpt.epoch,
        "tensors": name,
        "sha256": sha256_file(tensor_path),
        "optimizer": opt_meta,
        "info": ckpt.info,
    }
    _atomic_write(
        folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1) + "\n")
    )
    for old in folder.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / INDEX


def load(folder: Path, fingerprint: str) -> CheckpointState | None:
    """The checkpoint in ``folder`` if it belongs to this job and is intact, else None."""
    index_path = folder / INDEX
    if not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        if index.get("schema") != SCHEMA:
            log.warning("training checkpoint has an unknown schema; starting afresh")
            return None
        if index.get("fingerprint") != fingerprint:
            log.info("training checkpoint belongs to another job (data or settings changed)")
            return None
        tensor_path = folder / str(index["tensors"])
        if sha256_file(tensor_path) != index["sha256"]:
            log.warning("training checkpoint tensors do not match their hash; starting afresh")
            return None
        tensors = load_file(str(tensor_path))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("training checkpoint unreadable (%s); starting afresh", type(exc).__name__)
        return None
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "best": {}, "ref": {}, "opt": {}}
    for key, value in tensors.items():
        prefix, _, rest = key.partition("/")
        if prefix in parts:
            parts[prefix][rest if prefix != "opt" else key] = value
    return CheckpointState(
        fingerprint=fingerprint,
        epoch=int(index["epoch"]),
        model=parts["model"],
        best=parts["best"],
        reference=parts["ref"],
        optimizer=_unflatten_optimizer(parts["opt"], index["optimizer"]),
        torch_rng=tensors["rng/torch"],
        generator_rng=tensors["rng/generator"],
        info=dict(index.get("info", {})),
    )


def clear(folder: Path) -> None:
    """Remove the checkpoint (after a training finished and its outputs were written)."""
    (folder / INDEX).unlink(missing_ok=True)
    for old in folder.glob("checkpoint-*.safetensors"):
        old.unlink(missing_ok=True)
