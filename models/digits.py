"""Four small networks for the 8x8 digits, each with BatchNorm where it naturally goes.

Together they cover the fold cases the converter must handle: BatchNorm after
Linear and Conv (forward fold into the producer), BatchNorm before
Dropout+Linear and before a replicate-padded Conv1d (backward fold into the
consumer: replicate padding copies edge values, so it commutes with the
per-channel affine map and that fold stays exact, unlike zero padding), and
BatchNorms on both branches of a residual add.

Inputs are pixels in [0, 1] (the digits' 0..16 divided by 16 by
`digits_dataset`); outputs are logits of shape (N, 10).
"""

from __future__ import annotations

import torch
from torch import nn

from bnfold.models.blocks import BasicBlock, conv_bn_relu6

DIGIT_CLASSES = 10


class DigitsMLP(nn.Module):
    """(N, 64) -> (N, 10). The head's BatchNorm sits before Dropout+Linear: the backward fold."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.BatchNorm1d(64),
            nn.Dropout(0.2),
            nn.Linear(64, DIGIT_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DigitsResNet(nn.Module):
    """(N, 1, 8, 8) -> (N, 10). Identity and 1x1-conv-bn shortcuts, global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.layers = nn.Sequential(
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, DIGIT_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class DigitsMobileNet(nn.Module):
    """(N, 1, 8, 8) -> (N, 10). Depthwise-separable blocks: depthwise 3x3 then pointwise 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu6(1, 16, 3),
            _depthwise_separable(16, 32),
            _depthwise_separable(32, 64, stride=2),
            _depthwise_separable(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, DIGIT_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _depthwise_separable(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        conv_bn_relu6(in_channels, in_channels, 3, stride, groups=in_channels),
        conv_bn_relu6(in_channels, out_channels, 1),
    )


class DigitsConv1d(nn.Module):
    """(N, 8, 8) read as (N, steps, features) -> (N, 10): the image rows are the steps.

    Transposed to (N, features, steps) for Conv1d. The second BatchNorm comes
    after its ReLU and feeds a replicate-padded Conv1d, so it can only fold
    backward into that conv.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(8, 32, 3, padding=1),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Conv1d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm1d(64),
            nn.Conv1d(64, 64, 3, padding=1, padding_mode="replicate"),
            nn.BatchNorm1d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(64, DIGIT_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_first = x.transpose(1, 2)
        return self.classifier(torch.flatten(self.pool(self.features(channels_first)), 1))
