"""MobileNetV1 (Howard et al. 2017): a 3x3/2 conv then 13 depthwise-separable blocks, global average pooling.

Channels are 32..1024 times ``width`` (the paper's width multiplier alpha). ReLU (not ReLU6) so that every
activation exports as a plain Relu; F is the pooled 1024*width feature.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import scaled

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1Backbone(nn.Module):
    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c0 = scaled(32, width)
        layers: list[nn.Module] = [_conv_bn(3, c0, 3, 2)]
        cin = c0
        for c, s in _BLOCKS:
            cout = scaled(c, width)
            layers += [_conv_bn(cin, cin, 3, s, groups=cin), _conv_bn(cin, cout, 1, 1)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_dim = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.body(x)))
