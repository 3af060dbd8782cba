"""Version 0: built once with export.zoo (torch), then restarts need no torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import ModelConfig
from coordinator.errors import ConfigError
from coordinator.model_init import ensure_initial_version, torch_model_source
from coordinator.state import State
from tests.coordinator.fakes import tiny_source


def test_torch_source_builds_cnn2d_with_trainable_keys_per_mode() -> None:
    """The real zoo: float32 numpy state, head keys within last_stage within full."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    info, weights = torch_model_source(ModelConfig(arch="cnn2d", seed=3), True)
    assert weights is not None and all(v.dtype == np.float32 for v in weights.values())
    keys = info.trainable_keys
    assert keys["full"] == frozenset(weights)
    assert keys["head"] < keys["last_stage"] < keys["full"]
    assert (info.arch, info.init) == ("cnn2d", "random")
    again = torch_model_source(ModelConfig(arch="cnn2d", seed=3), True)[1]
    assert again is not None
    for k in weights:  # the seed makes version 0 reproducible
        np.testing.assert_array_equal(weights[k], again[k])


def test_version_0_is_made_once_and_restarts_do_not_need_the_source(tmp_path: Path) -> None:
    """First start writes v0 + model.json; a restart reads them and never calls the source."""
    state = State(tmp_path)
    cfg = ModelConfig(arch="cnn2d")
    info = ensure_initial_version(state, cfg, tiny_source)
    assert state.checkpoint_metadata(0)["arch"] == "cnn2d"

    def no_torch(_cfg: ModelConfig, _need: bool) -> object:
        raise AssertionError("the model source must not be called on a restart")

    again = ensure_initial_version(state, cfg, no_torch)  # type: ignore[arg-type]
    assert again == info
    (tmp_path / "model.json").unlink()  # lost: asked again, without weights
    assert ensure_initial_version(state, cfg, tiny_source).trainable_keys == info.trainable_keys
    assert [v.version for v in state.versions()] == [0]


def test_a_state_of_another_architecture_is_refused(tmp_path: Path) -> None:
    state = State(tmp_path)
    ensure_initial_version(state, ModelConfig(arch="cnn2d"), tiny_source)
    with pytest.raises(ConfigError, match="holds a cnn2d"):
        ensure_initial_version(state, ModelConfig(arch="resnet18"), tiny_source)
