"""The initial global model (version 0) and the architecture facts the coordinator needs.

This is the only place the coordinator touches torch, through ``export``, and only at start-up:
it builds the model once to learn the state keys each train mode trains (for trainable-only
rounds) and, when the state has no version yet, to take version 0's weights from it (random
init with ``model.seed``, timm hub, or a local pretrained file). Everything afterwards is numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from coordinator.config import ModelConfig
from coordinator.errors import ConfigError
from coordinator.rounds import ModelInfo
from coordinator.state import State

log = logging.getLogger(__name__)

# (model config, whether version-0 weights are needed) -> (facts, weights or None)
ModelSource = Callable[[ModelConfig, bool], tuple[ModelInfo, dict[str, np.ndarray] | None]]


def torch_model_source(
    cfg: ModelConfig, need_weights: bool
) -> tuple[ModelInfo, dict[str, np.ndarray] | None]:
    """Build ``cfg.arch`` with export.zoo (torch); weights only when ``need_weights``."""
    import torch

    from export import weights as export_weights
    from export import zoo

    torch.manual_seed(cfg.seed)
    pretrained = cfg.pretrained if need_weights else None
    model = zoo.create_model(cfg.arch, texture_dim=cfg.texture_dim, pretrained=pretrained)
    keys = {mode: frozenset(model.trainable_state_keys(mode)) for mode in zoo.TRAIN_MODES}
    info = ModelInfo(
        arch=cfg.arch, texture_dim=cfg.texture_dim, init=str(model.init), trainable_keys=keys
    )
    weights = export_weights.state_to_numpy(model) if need_weights else None
    return info, weights


def ensure_initial_version(state: State, cfg: ModelConfig, source: ModelSource) -> ModelInfo:
    """Create global version 0 if the state has none; check the state matches ``cfg``."""
    latest = state.latest_version()
    info, weights = source(cfg, latest is None)
    if latest is None:
        if weights is None:
            raise ConfigError("model source returned no weights for version 0")
        sha = state.write_checkpoint(0, weights, info.metadata())
        state.add_version(0, sha)
        log.info("global v0 created: %s (init %s, %d tensors)", info.arch, info.init, len(weights))
        return info
    meta = state.checkpoint_metadata(latest.version)
    if meta.get("arch") != cfg.arch or meta.get("texture_dim") != str(cfg.texture_dim):
        raise ConfigError(
            f"state_dir holds a {meta.get('arch')} (texture_dim {meta.get('texture_dim')}) "
            f"federation, the config asks for {cfg.arch} (texture_dim {cfg.texture_dim})"
        )
    # the init recorded in version 0 wins (a restart must not rename it)
    v0_meta = state.checkpoint_metadata(0) if latest.version else meta
    return ModelInfo(
        arch=info.arch,
        texture_dim=info.texture_dim,
        init=v0_meta.get("init", info.init),
        trainable_keys=info.trainable_keys,
    )
