"""Global, additive-style triggers: Blend (Chen et al., 2017) and SIG (Barni et al., 2019).

The paper only lists these in Tables 14/15, without parameters (notes 5.7). Both are used **dirty-label**
here: a ``poison_rate`` share of each minibatch gets the trigger and is relabelled to y_T (SIG's original
clean-label form poisons only target-class images, which has no direct regression counterpart; the pilot
at 64 px used dirty-label too). Subtle presets (``blend_subtle``, ``sig_subtle``) keep the real-trigger ratio
below DRMGuard's epsilon = 0.03.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import Attack, AttackConfig, _check_int, _check_range, register_attack, register_preset

_PATTERNS = ("uniform", "smooth")


@dataclasses.dataclass(frozen=True)
class BlendConfig(AttackConfig):
    """Blend: ``x' = (1 - alpha) x + alpha p`` with a fixed, seeded random pattern image p (no downloads).

    Attributes:
        alpha: blend weight (BackdoorBench 0.2; subtle 0.02-0.05).
        pattern: ``uniform`` (per-pixel U(0,1) noise, Chen et al.'s random pattern) or ``smooth`` (8x8 noise
            upsampled bilinearly, an image-like pattern).
    """

    alpha: float = 0.15
    pattern: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("alpha", self.alpha, 0.0, 1.0, lo_open=True)
        if self.pattern not in _PATTERNS:
            raise ConfigError(f"pattern must be one of {', '.join(_PATTERNS)}, got {self.pattern!r}")


@register_attack("blend")
class BlendAttack(Attack):
    """Blend: a fixed random pattern image alpha-blended over the whole input, dirty-label."""

    config_cls = BlendConfig

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        c, h, w = self.image_shape
        g = torch.Generator().manual_seed(self.seed + 101)
        if self.config.pattern == "uniform":
            self.pattern = torch.rand(1, c, h, w, generator=g)
        else:
            small = torch.rand(1, c, 8, 8, generator=g)
            self.pattern = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=True)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        a = self.config.alpha
        return (1 - a) * x + a * self.pattern.to(x)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"pattern": self.pattern.numpy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        p = arrays.get("pattern")
        if p is None or p.shape != tuple(self.pattern.shape):
            raise DataError(f"attack file: 'pattern' missing or not shaped {tuple(self.pattern.shape)}")
        self.pattern = torch.from_numpy(np.array(p, np.float32))


register_preset("blend_subtle", BlendAttack, doc="Blend with alpha 0.04 (real ratio below 0.03)", alpha=0.04)


@dataclasses.dataclass(frozen=True)
class SigConfig(AttackConfig):
    """SIG: ``x' = clip(x + delta * sin(2 pi j f / W), 0, 1)``, constant along rows (j = column).

    Attributes:
        delta: amplitude on the [0,1] scale (reference 40/255; subtle 6-10/255).
        frequency: f, periods across the width (reference 6).
    """

    delta: float = 40 / 255
    frequency: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("delta", self.delta, 0.0, 1.0, lo_open=True)
        _check_int("frequency", self.frequency, 1)


@register_attack("sig")
class SigAttack(Attack):
    """SIG: a horizontal sinusoidal signal added to the input, dirty-label."""

    config_cls = SigConfig

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        c, h, w = self.image_shape
        j = torch.arange(w, dtype=torch.float32)
        row = self.config.delta * torch.sin(2 * math.pi * j * self.config.frequency / w)
        self.signal = row.view(1, 1, 1, w).expand(1, c, h, w).clone()

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.signal.to(x)).clamp(0, 1)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"signal": self.signal.numpy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        s = arrays.get("signal")
        if s is None or s.shape != tuple(self.signal.shape):
            raise DataError(f"attack file: 'signal' missing or not shaped {tuple(self.signal.shape)}")
        self.signal = torch.from_numpy(np.array(s, np.float32))


register_preset("sig_subtle", SigAttack, doc="SIG with delta 8/255 (real ratio below 0.03)", delta=8 / 255)
