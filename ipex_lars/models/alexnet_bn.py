"""AlexNet-BN: AlexNet with batch normalization after every convolution in place of LRN.

This is the AlexNet variant that "ImageNet Training in Minutes" (and the LARS paper,
arXiv 1708.03888) train at batch 32K; BN is what lets it reach AlexNet's accuracy at
that batch size together with LARS.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class AlexNetBN(nn.Module):
    """AlexNet (96-256-384-384-256 conv channels, two 4096 fc layers) with BN instead of LRN."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 96, 11, stride=4, padding=2),
            nn.MaxPool2d(3, 2),
            *_conv_bn(96, 256, 5, padding=2),
            nn.MaxPool2d(3, 2),
            *_conv_bn(256, 384, 3, padding=1),
            *_conv_bn(384, 384, 3, padding=1),
            *_conv_bn(384, 256, 3, padding=1),
            nn.MaxPool2d(3, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
