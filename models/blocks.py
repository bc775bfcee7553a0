"""Building blocks shared by the digits networks and their ImageNet-sized cousins.

Activations are never in-place: a hook on a BatchNorm's output (the converter
records per-layer statistics that way) must see what the BatchNorm produced,
not what a following ReLU overwrote it with.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's basic residual block: conv-bn-relu-conv-bn, plus shortcut, then relu.

    The shortcut is the identity when shape is kept, else a strided 1x1 conv
    followed by BatchNorm (`downsample`), as in torchvision's ResNet-18, whose
    attribute names this block keeps.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv2d (no bias, same padding) -> BatchNorm2d -> ReLU6: MobileNet's unit.

    `groups=in_channels=out_channels` makes it the depthwise conv. A Sequential
    (keys 0, 1, 2) like torchvision's Conv2dNormActivation.
    """
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(),
    )
