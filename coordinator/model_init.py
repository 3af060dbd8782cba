"""The initial global model (version 0) and the architecture facts the coordinator needs.

This is the only place the coordinator touches torch, through ``export``, and only at the first
start: it builds the model once to take version 0's weights (random init with ``model.seed``,
timm hub, or a local pretrained file) and to learn the state keys each train mode trains (for
trainable-only rounds). Those facts are saved as ``state_dir/model.json``, so a restart (after
a crash, say) needs no torch and resumes in well under a second. Everything else is numpy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coordinator.config import ModelConfig
from coordinator.errors import ConfigError
from coordinator.rounds import ArchInfo
from coordinator.state import State
from fl_protocol.files import write_atomic

log = logging.getLogger(__name__)

# (model config, whether version-0 weights are needed) -> (facts, weights or None)
ModelSource = Callable[[ModelConfig, bool], tuple[ArchInfo, dict[str, np.ndarray] | None]]


def torch_model_source(
    cfg: ModelConfig, need_weights: bool
) -> tuple[ArchInfo, dict[str, np.ndarray] | None]:
    """Build ``cfg.arch`` with export.zoo (torch); weights only when ``need_weights``."""
    import torch

    from export import weights as export_weights
    from export import zoo

    torch.manual_seed(cfg.seed)
    pretrained = cfg.pretrained if need_weights else None
    model = zoo.create_model(cfg.arch, texture_dim=cfg.texture_dim, pretrained=pretrained)
    keys = {mode: frozenset(model.trainable_state_keys(mode)) for mode in zoo.TRAIN_MODES}
    info = ArchInfo(
        arch=cfg.arch, texture_dim=cfg.texture_dim, init=str(model.init), trainable_keys=keys
    )
    weights = export_weights.state_to_numpy(model) if need_weights else None
    return info, weights


def _info_path(state: State) -> Path:
    return state.dir / "model.json"


def save_model_info(state: State, info: ArchInfo) -> None:
    doc = {
        "arch": info.arch,
        "texture_dim": info.texture_dim,
        "init": info.init,
        "trainable_keys": {m: sorted(keys) for m, keys in info.trainable_keys.items()},
    }
    write_atomic(_info_path(state), json.dumps(doc, indent=1).encode(), sync_dir=True)


def load_model_info(state: State) -> ArchInfo | None:
    """The facts saved with version 0 (None if absent or unreadable: ask torch again)."""
    try:
        doc = json.loads(_info_path(state).read_text())
        return ArchInfo(
            arch=str(doc["arch"]),
            texture_dim=int(doc["texture_dim"]),
            init=str(doc["init"]),
            trainable_keys={m: frozenset(k) for m, k in doc["trainable_keys"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_initial_version(state: State, cfg: ModelConfig, source: ModelSource) -> ArchInfo:
    """Create global version 0 if the state has none; check the state matches ``cfg``.

    The architecture facts are saved next to the state (``model.json``), so a restart does
    not need torch at all."""
    latest = state.latest_version()
    if latest is None:
        info, weights = source(cfg, True)
        if weights is None:
            raise ConfigError("model source returned no weights for version 0")
        sha = state.write_checkpoint(0, weights, info.metadata())
        save_model_info(state, info)
        state.add_version(0, sha)
        log.info("global v0 created: %s (init %s, %d tensors)", info.arch, info.init, len(weights))
        return info
    meta = state.checkpoint_metadata(latest.version)
    if meta.get("arch") != cfg.arch or meta.get("texture_dim") != str(cfg.texture_dim):
        raise ConfigError(
            f"state_dir holds a {meta.get('arch')} (texture_dim {meta.get('texture_dim')}) "
            f"federation, the config asks for {cfg.arch} (texture_dim {cfg.texture_dim})"
        )
    saved = load_model_info(state)
    if saved is not None:
        return saved
    info, _ = source(cfg, False)
    # the init recorded in version 0 wins (a restart must not rename it)
    info = ArchInfo(
        arch=info.arch,
        texture_dim=info.texture_dim,
        init=state.checkpoint_metadata(0).get("init", info.init),
        trainable_keys=info.trainable_keys,
    )
    save_model_info(state, info)
    return info
