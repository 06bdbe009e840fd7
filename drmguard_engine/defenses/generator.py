"""Trigger generators G_theta for DRMGuard's reverse engineering.

Two forms:

* ``paper``: the Input-Aware attack's encoder-decoder without skip connections, as in the authors' SecureGaze
  code (``channel_init`` 32, three down/up steps, output ``tanh(x)/(2+1e-7)+0.5`` in (0,1), the whole image, not a
  residual). It needs pre-training to reproduce benign images (paper A.10: 5,000 steps); the reading of that
  pre-training as an L1 reconstruction autoencoder is ours (the paper gives no loss).
* ``residual``: ``sigmoid(logit(x) + D(x))`` with D's last layer initialised at zero, so G is exactly the identity
  before any step. The 64-px pilot found the paper's form, briefly pre-trained, could not reproduce inputs closely
  enough for the 0.03 threshold to mean anything; this form starts at zero perturbation by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int, *, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class PaperGenerator(nn.Module):
    """Encoder-decoder of the Input-Aware attack (no skips); H and W must be divisible by 2**steps."""

    def __init__(self, channels: int = 3, channel_init: int = 32, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        enc: list[nn.Module] = []
        cin, c = channels, channel_init
        for i in range(steps):
            enc += _block(cin, c) + _block(c, c) + [nn.MaxPool2d(2)]
            cin = c
            if i < steps - 1:
                c *= 2
        self.encoder = nn.Sequential(*enc)
        self.middle = nn.Sequential(*_block(c, c))
        dec: list[nn.Module] = []
        for i in range(steps):
            dec += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            cout = c // 2 if i < steps - 1 else c
            dec += _block(c, c) + _block(c, cout)
            c = cout
        dec += _block(c, channels, relu=False)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.steps
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:  # pad to a multiple of 2**steps, crop back afterwards
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        y = self.decoder(self.middle(self.encoder(x)))
        y = torch.tanh(y) / (2 + 1e-7) + 0.5
        return y[..., :h, :w]


class ResidualGenerator(nn.Module):
    """``sigmoid(logit(x) + D(x))``: the identity at initialisation (D's last conv is zero)."""

    def __init__(self, channels: int = 3, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        # one stride-2 level gives a receptive field that can paint patches and blends, and keeps the cost low
        layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth):
            layers += [nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(width + channels, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.logit_eps = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        z = self.up(self.body(x))
        z = z[..., :h, :w]
        if z.shape[-2:] != (h, w):
            z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        d = self.out(torch.cat([F.relu(z), x], dim=1))
        xc = x.clamp(self.logit_eps, 1 - self.logit_eps)
        return torch.sigmoid(torch.logit(xc) + d)


def build_generator(kind: str, channels: int, *, width: int = 16) -> nn.Module:
    if kind == "paper":
        return PaperGenerator(channels)
    if kind == "residual":
        return ResidualGenerator(channels, width=width)
    raise ValueError(f"unknown generator {kind!r}: use 'paper' or 'residual'")
