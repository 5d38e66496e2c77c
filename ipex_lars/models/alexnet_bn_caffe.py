"""AlexNet-BN as the LARS authors released it in Intel Caffe 1.0.7.

Source: intel/caffe, tag 1.0.7 (commit 59c0e69b, "implement lars from UC Berkeley"),
models/intel_optimized_models/multinode/alexnet_bn_32nodes/train_val2.prototxt (the 64-node copy
has the same layers). It is Caffe's AlexNet with its two LRN layers replaced by BatchNorm and
two more BatchNorm layers added, and differs from ``AlexNetBN`` (ipex_lars.models.alexnet_bn):

- BN sits on the *input* of conv2..conv5 (after conv1's pool, conv2's pool, relu3 and relu4),
  not after every convolution; conv5 and the fully connected layers have no BN;
- the BN layers have no learned scale or shift (Caffe ``BatchNorm`` without a ``Scale`` layer),
  eps 1e-4, moving-average fraction 0.9 (PyTorch momentum 0.1);
- every convolution keeps its bias; conv2, conv4 and conv5 are grouped (2 groups), conv1 has no
  padding, and pooling rounds up as Caffe's does;
- dropout 0.5 after fc6 and fc7 (after their ReLU), as in the original AlexNet;
- Gaussian initialisation: std 0.01 (convolutions, fc8), 0.005 (fc6, fc7); biases 0.01, except
  0.1 for fc6 and fc7.

Input 227x227 as released (224 gives the same 6x6 map before fc6). The adaptive pool before fc6
only matters for other input sizes: at 224/227 it is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-4
BN_MOMENTUM = 0.1  # Caffe moving_average_fraction 0.9


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, 2, ceil_mode=True)


class AlexNetBNCaffe(nn.Module):
    """The released AlexNet-BN (60,965,224 parameters at 1,000 classes)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, 11, stride=4),
            nn.ReLU(inplace=True),
            _pool(),
            _bn(96),
            nn.Conv2d(96, 256, 5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            _pool(),
            _bn(256),
            nn.Conv2d(256, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            _bn(384),
            nn.Conv2d(384, 384, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            _bn(384),
            nn.Conv2d(384, 256, 3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            _pool(),
        )
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        self._init_as_released()

    def _init_as_released(self) -> None:
        fc6, fc7 = self.classifier[0], self.classifier[3]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                std, bias = (0.005, 0.1) if m is fc6 or m is fc7 else (0.01, 0.01)
                nn.init.normal_(m.weight, std=std)
                nn.init.constant_(m.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
