"""The paper's small CNN: conv, max-pool, conv, max-pool, flatten (-> fully connected, softmax).

The fully connected layer and softmax are ``FedscanNet.head`` (logits out; softmax at
inference), so texture features can join the flattened embedding before it.

Sizes at a 224x224 input (the pooling choice keeps the flattened embedding, and so the fully
connected layer, small):

    conv1  3x3, 1 -> 32, pad 1, ReLU      224x224x32   (14.5 M MAC)
    pool1  max 4x4, stride 4              56x56x32
    conv2  3x3, 32 -> 64, pad 1, ReLU     56x56x64     (57.8 M MAC)
    pool2  max 4x4, stride 4              14x14x64
    flatten                               12544 features -> head: Linear(12544 + D, 2)

About 19 k convolution weights + 25 k classifier weights, ~72 M MAC per slice (resnet18 with one
input channel: ~1.8 G MAC), so it trains at hundreds of slices/s on two CPU cores. 2x2 pooling
would leave a 200 k-feature flatten (400 k classifier weights, dominated by the FC layer).
"""

from __future__ import annotations

from torch import Tensor, nn

INPUT_SIZE = 224
POOL = 4


class CNN2D(nn.Module):
    def __init__(self, input_size: int = INPUT_SIZE, c1: int = 32, c2: int = 64) -> None:
        super().__init__()
        if input_size % (POOL * POOL):
            raise ValueError(f"input_size must be a multiple of {POOL * POOL}")
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(POOL)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(POOL)
        self.flatten = nn.Flatten(1)
        side = input_size // (POOL * POOL)
        self.num_features = c2 * side * side
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        out: Tensor = self.flatten(x)
        return out
