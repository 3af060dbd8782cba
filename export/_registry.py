"""Name -> builder registry of model architectures (timm-style ``@register_arch``).

Builders take the resolved ``pretrained`` request and return a :class:`Backbone`; the factory in
:mod:`export.zoo` wraps it into a :class:`~export.net.FedscanNet`. Registration happens at import
of :mod:`export.zoo`, so callers go through ``create_model`` / ``list_archs`` there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from export.errors import UnknownArchError

# None = random init, "hub" = timm hub download, Path = local weights file (air-gapped sites)
PretrainedSpec = Path | str | None


@dataclass(frozen=True)
class Backbone:
    """A feature extractor: normalised image ``[N, 1, H, W]`` -> pooled features ``[N, F]``."""

    module: nn.Module  # the feature extractor (timm model with num_classes=0, or our CNN2D)
    num_features: int  # F, the embedding width the classifier sees (before texture features)
    last_stage: tuple[str, ...]  # submodule names of ``module`` trainable in ``last_stage`` mode
    init: str  # "random", "hub", or the name of the weights file the backbone was loaded from

    def __post_init__(self) -> None:
        if self.num_features < 1:
            raise ValueError("num_features must be >= 1")
        names = dict(self.module.named_modules())
        missing = [n for n in self.last_stage if n not in names]
        if missing:
            raise ValueError(f"last_stage names not in the module: {missing}")


Builder = Callable[[PretrainedSpec], Backbone]

_ARCHS: dict[str, Builder] = {}


def register_arch(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``fn`` buildable as ``create_model(name)``."""

    def deco(fn: Builder) -> Builder:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} registered twice")
        _ARCHS[name] = fn
        return fn

    return deco


def list_archs() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_ARCHS)


def get_builder(name: str) -> Builder:
    try:
        return _ARCHS[name]
    except KeyError:
        raise UnknownArchError(
            f"unknown architecture {name!r}; choose one of: {', '.join(list_archs())}"
        ) from None
