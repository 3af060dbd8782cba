"""``FedscanNet``: grayscale normalisation -> backbone embedding (+ texture) -> linear classifier.

The model takes the preprocessed slice in [0, 1] (``[N, 1, 224, 224]``) and normalises it in its
first layer, so the torch module and the exported ONNX file take exactly the same input.

Grayscale statistics (not ImageNet's 3-channel mean/std): measured on 224x224 bilinear-resized
slices in [0, 1],

* UCSD COVID-CT official train split (425 slices, 8-bit display values / 255): mean 0.597,
  std 0.319;
* lung-windowed (L -600 / W 1500) DICOM CT from pydicom-data (693_UNCR, eCT_Supplemental):
  mean 0.42-0.47, std 0.34-0.37.

``GRAY_MEAN = 0.5`` / ``GRAY_STD = 0.35`` sits between the two input paths (display values and
HU-windowed), so either lands within about +-0.3 of zero mean and near unit variance.

Train modes (``set_train_mode``): ``full`` trains everything; ``last_stage`` trains the last
stage of the backbone (the layers at its final stride) plus the classifier; ``head`` trains only
the classifier. Frozen modules are kept in eval mode while the model trains, so their
BatchNorm running statistics do not move (and their dropout is off): ``trainable_state_keys(mode)``
is exactly the set of state_dict entries a training step can change.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

from export._registry import Backbone

GRAY_MEAN = 0.5  # see module docstring for how this was chosen
GRAY_STD = 0.35
# Per-feature centre and scale of the 22 GLCM + LBP texture features (edge_node.ingest.texture,
# FEATURE_NAMES order), measured on the UCSD COVID-CT official train split (425 slices, display
# path, 224 x 224). The features' own ranges are fixed ([-1, 1]) but their spread is 0.01-0.1, so
# fed raw beside a CNN embedding the linear classifier barely moves their weights (a logistic
# regression on the standardised features reaches 0.77 test accuracy where the raw ones inside
# the model added nothing). Constants, not running statistics: every site and the coordinator
# build the same model, and FedAvg has nothing site-specific to average.
TEXTURE_CENTER: tuple[float, ...] = (
    0.2739, 0.3361, 0.0365, 0.0470, 0.6809, 0.6381, 0.2438, 0.2338, 0.9613, 0.9376, 0.0689,
    0.0641, 0.0476, 0.0721, 0.0427, 0.0933, 0.1827, 0.1273, 0.0665, 0.0779, 0.1655, 0.1244,
)  # fmt: skip
TEXTURE_SCALE: tuple[float, ...] = (
    0.0502, 0.0499, 0.0097, 0.0113, 0.0765, 0.0779, 0.0970, 0.0973, 0.0189, 0.0267, 0.0603,
    0.0589, 0.0241, 0.0195, 0.0124, 0.0162, 0.0507, 0.0366, 0.0110, 0.0146, 0.0914, 0.0400,
)  # fmt: skip
TEXTURE_CLIP = 8.0  # standardised texture features are clipped to +-8 scales
NUM_CLASSES = 2  # index 0 = non_covid, 1 = covid
CLASS_NAMES: tuple[str, ...] = ("non_covid", "covid")

TrainMode = Literal["full", "last_stage", "head"]
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)


class Normalize(nn.Module):
    """``(x - mean) / std`` with fixed grayscale constants (non-persistent: not in state_dict)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: float = GRAY_MEAN, std: float = GRAY_STD) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError("std must be > 0")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class TextureNormalize(nn.Module):
    """``(t - TEXTURE_CENTER) / TEXTURE_SCALE`` per feature (non-persistent: not in state_dict).

    Clipped to +-TEXTURE_CLIP: slices unlike the UCSD ones (lung-windowed scanner CT, a
    near-constant image) can land tens of scales away, and one such feature must not decide the
    logit alone. A texture vector of another length (a test's toy features) is only clipped."""

    center: Tensor
    scale: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        known = dim == len(TEXTURE_CENTER)
        center = torch.tensor(TEXTURE_CENTER) if known else torch.zeros(dim)
        scale = torch.tensor(TEXTURE_SCALE) if known else torch.ones(dim)
        self.register_buffer("center", center.to(torch.float32), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        return ((t - self.center) / self.scale).clamp(-TEXTURE_CLIP, TEXTURE_CLIP)


class FedscanNet(nn.Module):
    """The classifier every part of fedscan trains, federates and exports."""

    def __init__(self, arch: str, backbone: Backbone, *, texture_dim: int = 0) -> None:
        super().__init__()
        if texture_dim < 0:
            raise ValueError("texture_dim must be >= 0")
        self.arch = arch
        self.texture_dim = texture_dim
        self.init = backbone.init  # "random", "hub", or a weights file name
        self.num_features = backbone.num_features
        self._last_stage = backbone.last_stage
        self.normalize = Normalize()
        self.texture_normalize = TextureNormalize(texture_dim)
        self.backbone = backbone.module
        self.head = nn.Linear(backbone.num_features + texture_dim, NUM_CLASSES)
        self.train_mode: TrainMode = "full"

    # -- inference ---------------------------------------------------------------------------

    def embed(self, image: Tensor) -> Tensor:
        """``[N, 1, H, W]`` in [0, 1] -> pooled backbone features ``[N, num_features]``."""
        out: Tensor = self.backbone(self.normalize(image))
        return out

    def classify(self, features: Tensor, texture: Tensor | None = None) -> Tensor:
        """Embedding (+ texture features when ``texture_dim > 0``) -> logits ``[N, 2]``."""
        if self.texture_dim:
            if texture is None:
                raise ValueError(f"{self.arch}: this model needs texture [N, {self.texture_dim}]")
            texture = self.texture_normalize(texture.to(features.dtype))
            features = torch.cat([features, texture], dim=1)
        elif texture is not None:
            raise ValueError(f"{self.arch}: this model takes no texture input")
        out: Tensor = self.head(features)
        return out

    def forward(self, image: Tensor, texture: Tensor | None = None) -> Tensor:
        return self.classify(self.embed(image), texture)

    # -- training modes ----------------------------------------------------------------------

    def _trainable_prefixes(self, mode: str) -> tuple[str, ...]:
        """Module names (relative to self) whose parameters and buffers train in ``mode``."""
        if mode == "full":
            return ("",)
        if mode == "last_stage":
            return (*(f"backbone.{n}" for n in self._last_stage), "head")
        if mode == "head":
            return ("head",)
        raise ValueError(f"unknown train mode {mode!r}; choose one of: {', '.join(TRAIN_MODES)}")

    def trainable_state_keys(self, mode: str | None = None) -> set[str]:
        """state_dict keys a training step changes in ``mode`` (default: the current mode)."""
        prefixes = self._trainable_prefixes(self.train_mode if mode is None else mode)
        keys = set(self.state_dict())
        if "" in prefixes:
            return keys
        return {k for k in keys if any(k.startswith(p + ".") for p in prefixes)}

    def set_train_mode(self, mode: str) -> None:
        """Freeze everything outside the trainable part of ``mode`` (see module docstring)."""
        prefixes = self._trainable_prefixes(mode)
        self.train_mode = mode  # type: ignore[assignment]  # validated just above
        for name, param in self.named_parameters():
            param.requires_grad_("" in prefixes or any(name.startswith(p + ".") for p in prefixes))
        self.train(self.training)

    def train(self, mode: bool = True) -> FedscanNet:
        super().train(mode)
        if mode and self.train_mode != "full":
            # frozen modules stay in eval: BN running stats and dropout of frozen parts are fixed
            for module in self.modules():
                module.training = False
            modules = dict(self.named_modules())
            for prefix in self._trainable_prefixes(self.train_mode):
                modules[prefix].train(True)
            self.training = True  # the model as a whole is training; only frozen parts are not
        return self
