"""Regression networks with the DRMGuard split ``f = H o F`` (see :mod:`.base`).

``build_model(arch, task, input_size=64, width=1.0, seed=0)`` builds one from the registry:
``resnet18``, ``resnet34``, ``mobilenetv1`` and ``tiny`` (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..tasks import Task
from .base import Normalize, RegressionNet
from .mobilenet import MobileNetV1Backbone
from .resnet import resnet18_backbone, resnet34_backbone
from .tiny import TinyBackbone

_ARCHS: dict[str, Callable[[float], nn.Module]] = {
    "resnet18": resnet18_backbone,
    "resnet34": resnet34_backbone,
    "mobilenetv1": MobileNetV1Backbone,
    "tiny": TinyBackbone,
}

# The smallest square input each backbone accepts (its total stride; below it the spatial map vanishes).
_MIN_SIZE = {"resnet18": 32, "resnet34": 32, "mobilenetv1": 32, "tiny": 8}


def list_archs() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_ARCHS)


def build_model(
    arch: str, task: Task | str, input_size: int = 64, width: float = 1.0, seed: int = 0
) -> RegressionNet:
    """Builds a freshly initialised regression network.

    Args:
        arch: one of :func:`list_archs`.
        task: ``gaze`` (2 outputs) or ``headpose`` (3 outputs).
        input_size: square input side (recorded; any size >= the arch's minimum runs).
        width: channel multiplier (0.25 gives a 16-32-64-128 ResNet).
        seed: initialisation seed; the global RNG state is left untouched.

    Raises:
        ConfigError: unknown arch, non-positive width, or an input smaller than the network's stride.
    """
    key = str(arch).strip().lower().replace("-", "").replace("_", "")
    if key not in _ARCHS:
        raise ConfigError(f"unknown arch {arch!r}: use one of {', '.join(list_archs())}")
    task = Task.parse(task)
    if not (0 < float(width) <= 4):
        raise ConfigError(f"width must be in (0, 4], got {width}")
    if int(input_size) < _MIN_SIZE[key]:
        raise ConfigError(f"{key} needs inputs of at least {_MIN_SIZE[key]} px, got {input_size}")
    # fork_rng: seeded initialisation without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        backbone = _ARCHS[key](float(width))
        model = RegressionNet(
            backbone,
            backbone.out_dim,
            task,
            arch=key,
            input_size=int(input_size),
            width=float(width),  # type: ignore[arg-type]
        )
    return model


__all__ = ["Normalize", "RegressionNet", "build_model", "list_archs"]
