"""``resnet10_gn``: a small ResNet with GroupNorm, built for FedAvg on small hospital sites.

Why not BatchNorm: with 100-200 labelled slices per site and non-iid label mixes, BatchNorm's
running statistics are per-site quantities that FedAvg averages as if they were weights (and a
batch of 16 slices gives noisy ones); GroupNorm normalises each sample on its own, so the model
has no running statistics at all and a federated average of it is a plain average of weights.
Why not cnn2d: its flatten of a 14 x 14 x 64 map ties the classifier to image position
(12,544 features for ~500 training slices) and its first convolution runs at full resolution,
which makes it slower to train than this deeper network.

Sizes at a 224 x 224 input (about 0.21 G MAC per slice, 1.2 M parameters):

    stem    5x5 conv, stride 2, 1 -> 24, GN, ReLU; 2x2 max-pool     56 x 56 x 24
    layer1  basic block, 24 -> 32                                    56 x 56 x 32
    layer2  basic block, 32 -> 64, stride 2                          28 x 28 x 64
    layer3  basic block, 64 -> 128, stride 2                         14 x 14 x 128
    layer4  basic block, 128 -> 256, stride 2                        7 x 7 x 256
    global average pool                                              256 features

A basic block is two 3x3 convolutions with GroupNorm and a residual connection (1x1 projection
when the width or stride changes); the last GroupNorm of each block starts at zero scale, so each
block starts as its shortcut (the "zero-init residual" trick: trains stably from random init).
"""

from __future__ import annotations

from torch import Tensor, nn

WIDTHS = (24, 32, 64, 128, 256)  # stem, layer1..layer4
GROUPS = 8


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
        )
        nn.init.zeros_(self.norm2.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        out: Tensor = self.act(y + self.shortcut(x))
        return out


class ResNetGN(nn.Module):
    """Normalised ``[N, 1, H, W]`` -> pooled features ``[N, widths[-1]]``."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        if len(widths) != 5 or any(w % GROUPS for w in widths):
            raise ValueError(f"widths must be 5 multiples of {GROUPS}")
        w0, w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(1, w0, 5, 2, 2, bias=False),
            _norm(w0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.layer1 = BasicBlock(w0, w1, 1)
        self.layer2 = BasicBlock(w1, w2, 2)
        self.layer3 = BasicBlock(w2, w3, 2)
        self.layer4 = BasicBlock(w3, w4, 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.num_features = w4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.pool(x)
        return out
