"""The regression-model shape every part of the engine relies on: ``f = H o F``.

DRMGuard (Du et al., arXiv 2411.04811, sections 3.2-3.3) splits a deep regression model into a feature
extractor F (the penultimate, post-ReLU, globally pooled feature) and a regression head H (one linear layer,
no activation). :class:`RegressionNet` makes that split explicit: ``features(x)`` is F, ``head`` is H and
``forward(x) == head(features(x))``. Inputs are float32 NCHW in [0, 1]; mean/std normalisation lives inside
the model so that exported ONNX files take [0, 1] images too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tasks import Task

# ImageNet statistics: a conventional, fixed normalisation (the models are trained from scratch, so any
# fixed affine map works; these keep activations well scaled for natural-looking face crops).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; exports to ONNX as Sub and Div with constant tensors."""

    def __init__(
        self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class RegressionNet(nn.Module):
    """A deep regression model ``f(x) = head(features(x))`` with outputs in degrees.

    Args:
        backbone: maps normalised images (N,3,H,W) to pooled features (N,m), post-ReLU.
        feature_dim: m, the width of the penultimate feature.
        task: the regression task; fixes d, the output dimension.
        arch: the architecture name (kept for sidecars and reports).
        input_size: the square input side the model was built for (any size still runs).
        width: the channel multiplier used to build the backbone.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        task: Task | str,
        *,
        arch: str,
        input_size: int,
        width: float,
    ) -> None:
        super().__init__()
        self.task = Task.parse(task)
        self.arch = arch
        self.input_size = int(input_size)
        self.width = float(width)
        self.feature_dim = int(feature_dim)
        self.normalize = Normalize()
        self.backbone = backbone
        self.head = nn.Linear(self.feature_dim, self.task.dim)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the model was built for."""
        return (3, self.input_size, self.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F: (N,3,H,W) images in [0,1] -> (N,m) non-negative features."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f = H(F(x)): (N,3,H,W) in [0,1] -> (N,d) degrees."""
        return self.head(self.features(x))

    def describe(self) -> dict[str, object]:
        """JSON-able description (used in model sidecars)."""
        return {
            "arch": self.arch,
            "task": self.task.value,
            "input_size": self.input_size,
            "width": self.width,
            "feature_dim": self.feature_dim,
            "output_dim": self.task.dim,
        }


def scaled(channels: int, width: float, minimum: int = 4) -> int:
    """Channel count ``channels * width`` rounded to a multiple of 4 (at least ``minimum``)."""
    return max(minimum, int(round(channels * width / 4.0)) * 4)
