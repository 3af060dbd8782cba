"""The model zoo: ``create_model(arch, texture_dim=..., pretrained=...)`` over a registry.

Architectures (see ``list_archs()``):

* ``resnet18``: timm ResNet-18, one input channel; last stage = ``layer4`` (stride 32).
* ``efficientnet_b0``: timm EfficientNet-B0, one input channel; last stage = the blocks at the
  final stride 32 (``blocks.5``, ``blocks.6``) + ``conv_head`` / ``bn2``.
* ``cnn2d``: the paper's small CNN (:mod:`export.cnn2d`); last stage = ``conv2``.
* ``resnet10_gn``: our small ResNet with GroupNorm (:mod:`export.resnet_gn`), made for FedAvg on
  small sites; last stage = ``layer4``. Local weights files only (`fedscan pretrain` makes one).

All timm backbones are built with ``num_classes=0`` (pooled features out); the classifier is
``FedscanNet.head`` so texture features can be concatenated to the embedding before it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from export._registry import Backbone, PretrainedSpec, get_builder, list_archs, register_arch
from export.cnn2d import CNN2D
from export.errors import WeightsError
from export.net import CLASS_NAMES, TRAIN_MODES, FedscanNet
from export.pretrained import describe, timm_backbone
from export.resnet_gn import ResNetGN

__all__ = [
    "CLASS_NAMES",
    "TRAIN_MODES",
    "FedscanNet",
    "create_model",
    "list_archs",
]


def create_model(
    arch: str, *, texture_dim: int = 0, pretrained: PretrainedSpec = None
) -> FedscanNet:
    """Build ``arch`` (``UnknownArchError`` lists the choices) with the requested backbone init.

    ``pretrained``: ``None`` (random init), ``"hub"`` (timm hub, ``WeightsError`` when offline)
    or a path to a local weights file. The classifier head is always freshly initialised.
    """
    builder = get_builder(arch)
    if isinstance(pretrained, str) and pretrained != "hub":
        pretrained = Path(pretrained)
    return FedscanNet(arch, builder(pretrained), texture_dim=texture_dim)


@register_arch("resnet18")
def _resnet18(pretrained: PretrainedSpec) -> Backbone:
    module = timm_backbone("resnet18", pretrained)
    return Backbone(module, _num_features(module), ("layer4",), describe(pretrained))


@register_arch("efficientnet_b0")
def _efficientnet_b0(pretrained: PretrainedSpec) -> Backbone:
    module = timm_backbone("efficientnet_b0", pretrained)
    last = ("blocks.5", "blocks.6", "conv_head", "bn2")
    return Backbone(module, _num_features(module), last, describe(pretrained))


@register_arch("cnn2d")
def _cnn2d(pretrained: PretrainedSpec) -> Backbone:
    module = CNN2D()
    if pretrained == "hub":
        raise WeightsError("cnn2d: there are no hub weights for the paper's CNN; use a local file")
    if pretrained is not None:
        _load_own_file("cnn2d", module, Path(pretrained))
    return Backbone(module, module.num_features, ("conv2",), describe(pretrained))


@register_arch("resnet10_gn")
def _resnet10_gn(pretrained: PretrainedSpec) -> Backbone:
    module = ResNetGN()
    if pretrained == "hub":
        raise WeightsError(
            "resnet10_gn: there are no hub weights for it; use a local file (`fedscan pretrain`)"
        )
    if pretrained is not None:
        _load_own_file("resnet10_gn", module, Path(pretrained))
    return Backbone(module, module.num_features, ("layer4",), describe(pretrained))


def _num_features(module: torch.nn.Module) -> int:
    """timm models expose the pooled embedding width as ``num_features``."""
    value = getattr(module, "num_features", None)
    if not isinstance(value, int):
        raise TypeError(f"{type(module).__name__} has no integer num_features")
    return value


def _load_own_file(arch: str, module: torch.nn.Module, path: Path) -> None:
    """A backbone state_dict of one of our own networks, bare or as ``backbone.*`` inside
    fedscan weights (a `fedscan pretrain` output, or a trained model's weights file)."""
    if not path.is_file():
        raise WeightsError(f"{arch}: pretrained weights file not found: {path}")
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as exc:
        raise WeightsError(f"{arch}: cannot read weights from {path.name}: {exc}") from exc
    if any(k.startswith("backbone.") for k in state):
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    try:
        module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{arch}: weights in {path.name} do not match: {exc}") from exc
