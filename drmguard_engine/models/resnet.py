"""ResNet-18/34 (He et al. 2016) with torchvision's BasicBlock layout, written here (no torchvision).

Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool; four stages of BasicBlocks ([2,2,2,2] or [3,4,6,3]) with
64/128/256/512 channels times ``width``; global average pooling. The pooled, post-ReLU feature is F (512-d at
width 1), as in the DRMGuard authors' code (section 1 of docs/notes: F is a standard ResNet18).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import scaled


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetBackbone(nn.Module):
    """ResNet trunk up to and including global average pooling; output (N, 512*width)."""

    def __init__(self, layers: tuple[int, int, int, int], width: float = 1.0) -> None:
        super().__init__()
        chans = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.out_dim = chans[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(3, chans[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        cin = chans[0]
        for i, (n, cout) in enumerate(zip(layers, chans, strict=True)):
            blocks = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)  # exports as GlobalAveragePool
        self.flatten = nn.Flatten(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch (torchvision's zero_init_residual): each block starts
        # as the identity, which trains faster from scratch on small data.
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.flatten(self.pool(x))


def resnet18_backbone(width: float = 1.0) -> ResNetBackbone:
    return ResNetBackbone((2, 2, 2, 2), width)


def resnet34_backbone(width: float = 1.0) -> ResNetBackbone:
    return ResNetBackbone((3, 4, 6, 3), width)
