"""The paper's adaptive attack (section 4.5): a base backdoor plus a loss that hides the feature-space signal.

DRMGuard's feature-space observation is that a backdoored DRM maps poisoned inputs to features whose angle to
each row w_j of the head varies much less than for benign inputs (RAV << 1). The adaptive attacker adds

    L_adp = | 1 - (1/d) sum_j Var_i[B(F(A(x_i)), w_j)] / Var_i[B(F(x_i), w_j)] |,   B(u, v) = arccos(cos(u, v)),

weighted by lambda_adp = 0.02, to the training loss (eq. 6; the paper writes ``1 - RAV``; the absolute value is
the reading that "enforces RAV to be close to one", notes 2). Numerator: the poisoned samples of the minibatch;
denominator: its clean samples (cross samples excluded).

Interface: the trainer calls ``bind(model)`` before training (``requires_model`` is True); ``poison_batch``
then runs ``model.features`` once on the poisoned minibatch and returns ``lambda_adp * L_adp`` as ``aux_loss``
(``None`` when the batch holds fewer than 2 poisoned or 2 clean samples). The model needs ``.features`` and
``.head`` (a ``nn.Linear``), as :class:`drmguard_engine.models.RegressionNet` has.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from . import blend, patch, warp  # noqa: F401  (registers the base attacks before the preset check below)
from .base import Attack, AttackConfig, _check_range, _lookup, get_attack, register_attack


def angle_to_rows(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """B(F(x), w_j) for every sample and row: (N,m), (d,m) -> (N,d) radians, with the notes' numerical guards."""
    cos = features @ weight.t() / (features.norm(dim=1, keepdim=True) * weight.norm(dim=1).view(1, -1) + 1e-8)
    return torch.arccos(cos.clamp(-1 + 1e-6, 1 - 1e-6))


def rav_torch(poisoned_features: torch.Tensor, benign_features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Differentiable RAV: mean over outputs j of Var[B(F(x'), w_j)] / Var[B(F(x), w_j)] (population variance)."""
    vp = angle_to_rows(poisoned_features, weight).var(dim=0, unbiased=False)
    vb = angle_to_rows(benign_features, weight).var(dim=0, unbiased=False)
    return (vp / (vb + 1e-8)).mean()


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig(AttackConfig):
    """Adaptive attack settings.

    Attributes:
        base: the registered attack that supplies the trigger (paper: WaNet; ``badnets`` also works).
        lambda_adp: weight of L_adp (paper 0.02).
        base_options: config overrides for the base attack, as (name, value) pairs.
        poison_rate: unused (the base attack's rate applies); kept for the shared interface.
    """

    base: str = "wanet"
    lambda_adp: float = 0.02
    base_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _lookup(self.base)  # unknown base -> ConfigError now
        if self.base.strip().lower() == "adaptive":
            raise ConfigError("the adaptive attack cannot wrap itself")
        _check_range("lambda_adp", self.lambda_adp, 0.0, 1e3)
        for pair in self.base_options:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ConfigError(f"base_options must be (name, value) pairs, got {pair!r}")


@register_attack("adaptive")
class AdaptiveAttack(Attack):
    """Adaptive attack (section 4.5): a base trigger plus lambda_adp * |1 - RAV| against DRMGuard."""

    config_cls = AdaptiveConfig
    requires_model = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        cfg: AdaptiveConfig = self.config
        self.base = get_attack(
            cfg.base,
            task=self.task,
            image_shape=self.image_shape,
            target=self._target,
            seed=self.seed,
            **dict(cfg.base_options),
        )
        if self.base.requires_fit or self.base.requires_model:
            raise ConfigError(f"adaptive: base {cfg.base!r} needs fit/bind of its own; use a fixed trigger")
        self._model: nn.Module | None = None
        #: the last L_adp value (without lambda) and RAV, for logs and tests.
        self.last_rav: float | None = None

    def bind(self, model: nn.Module) -> None:
        """Registers the model under training (needs ``features`` and a linear ``head``)."""
        if not hasattr(model, "features") or not isinstance(getattr(model, "head", None), nn.Linear):
            raise ConfigError("adaptive attack needs a model with .features(x) and a linear .head (RegressionNet)")
        self._model = model

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._trigger(x)

    def _poison(
        self, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        if self._model is None:
            raise ConfigError("adaptive attack: call bind(model) before training (the loss needs the model)")
        xp, yp, aux, bd, cross = self.base._poison(x, y, step)
        clean = ~(bd | cross)
        self.last_rav = None
        if int(bd.sum()) >= 2 and int(clean.sum()) >= 2:
            feats = self._model.features(xp)
            dev = feats.device
            rav = rav_torch(feats[bd.to(dev)], feats[clean.to(dev)], self._model.head.weight)
            self.last_rav = float(rav.detach())
            adp = self.config.lambda_adp * (1 - rav).abs()
            aux = adp if aux is None else aux + adp
        return xp, yp, aux, bd, cross

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"base.{k}": v for k, v in self.base.state_arrays().items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.base.load_state_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("base.")})
