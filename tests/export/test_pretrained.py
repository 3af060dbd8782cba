"""Pretrained backbones: a local file adapts 3-channel stems to 1 channel; the hub fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from export.errors import WeightsError
from export.pretrained import _hub_cached_file
from export.zoo import create_model

STEMS = {"resnet18": "conv1.weight", "efficientnet_b0": "conv_stem.weight"}


def _imagenet_like_checkpoint(arch: str, path: Path) -> dict[str, torch.Tensor]:
    """A 3-channel, 1000-class timm state_dict as an ImageNet checkpoint would be."""
    torch.manual_seed(1)
    state = timm.create_model(arch, pretrained=False).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize(
    "arch, suffix",
    [("resnet18", ".safetensors"), ("resnet18", ".pth"), ("efficientnet_b0", ".safetensors")],
)
def test_local_file_adapts_stem_and_loads_everything_else(
    arch: str, suffix: str, tmp_path: Path
) -> None:
    """The 1-channel stem is the sum of the 3 RGB kernels; every other tensor is the file's."""
    path = tmp_path / f"{arch}_in1k{suffix}"
    state = _imagenet_like_checkpoint(arch, path)
    model = create_model(arch, pretrained=path)
    assert model.init == path.name
    loaded = model.backbone.state_dict()
    stem = STEMS[arch]
    assert loaded[stem].shape[1] == 1
    assert torch.allclose(loaded[stem], state[stem].sum(dim=1, keepdim=True))
    for key, value in loaded.items():
        if key != stem:
            assert torch.equal(value, state[key]), key
    assert not any(k.startswith(("fc.", "classifier.")) for k in loaded)  # 1000-class head dropped


def test_wrong_architecture_file_is_an_error(tmp_path: Path) -> None:
    """efficientnet weights given to resnet18 never turn into a partially random model."""
    path = tmp_path / "effnet.safetensors"
    _imagenet_like_checkpoint("efficientnet_b0", path)
    with pytest.raises(WeightsError, match="resnet18"):
        create_model("resnet18", pretrained=path)


def test_partial_file_is_an_error(tmp_path: Path) -> None:
    """A checkpoint missing backbone tensors is refused (timm alone would load it non-strictly)."""
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(
        {k: v for k, v in state.items() if not k.startswith("layer4.")},
        str(tmp_path / "p.safetensors"),
    )
    with pytest.raises(WeightsError, match="missing"):
        create_model("resnet18", pretrained=tmp_path / "p.safetensors")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        create_model("efficientnet_b0", pretrained=tmp_path / "nope.pth")


@pytest.mark.parametrize("arch", ["cnn2d", "resnet10_gn"])
def test_own_arch_local_file(tmp_path: Path, arch: str) -> None:
    """Our own networks take their backbone from a file (bare or fedscan weights); they have no
    hub weights."""
    from export.weights import save_weights

    src = create_model(arch)
    path = save_weights(src, tmp_path / "cnn.safetensors", version=1)
    model = create_model(arch, pretrained=path)
    for name, tensor in src.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    with pytest.raises(WeightsError, match="no hub weights"):
        create_model(arch, pretrained="hub")
    other = "resnet10_gn" if arch == "cnn2d" else "cnn2d"
    with pytest.raises(WeightsError, match="do not match"):
        create_model(other, pretrained=path)


def _skip_if_cached(arch: str) -> None:
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and _hub_cached_file(cfg.hf_hub_id) is not None:
        pytest.skip(f"{arch} hub weights are cached on this machine")


def test_hub_fails_fast_when_hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 and nothing cached: a clear WeightsError at once, no download attempt."""
    _skip_if_cached("resnet18")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        create_model("resnet18", pretrained="hub")


def test_hub_fails_clearly_when_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub host unreachable: WeightsError saying so, never a silent random init."""
    _skip_if_cached("efficientnet_b0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens on 443 here
    with pytest.raises(WeightsError, match="unreachable"):
        create_model("efficientnet_b0", pretrained="hub")
