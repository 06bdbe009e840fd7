"""Input-Aware Dynamic attack (IA; Nguyen & Tran, 2020), regression form (paper A.3, notes 5.2).

A pattern generator G and a mask generator M (the encoder-decoder without skip connections of the reference
code, narrower at 64 px: ``channels`` = 8 instead of 32) make a trigger that differs per input:
``x' = x + (G(x) - x) * mask(x)``, ``mask = tanh(20 M(x) - 10) / (2 + 1e-7) + 0.5``.

Training, folded into the trainer's loop through ``poison_batch`` and ``optimizer_params`` (the reference's two
stages, shortened to the DRM step budget):

* steps ``< mask_steps`` (stage 1): M learns a sparse, diverse mask, loss
  ``lambda_norm * mean(relu(mask - rho)) + lambda_div * L_div(mask)`` returned as ``aux_loss``. M is frozen
  afterwards. (``fit(model, images, labels)`` runs this stage up front instead, if the trainer calls it.)
* every step (stage 2): ``poison_rate`` of the batch gets its own trigger and y_T; ``cross_rate`` gets the
  trigger of *another* image of the batch and keeps its label; ``aux_loss`` adds
  ``lambda_div * L_div(G)`` with ``L_div = mean(rms(x1 - x2) / (rms(G(x1) - G(x2)) + 1e-7))``, over the
  triggered samples, x2 being them rolled by one (the generators run only on triggered samples). G learns through the task loss on poisoned samples plus the diversity loss.

The trainer steps ``optimizer_params()`` with Adam(lr 1e-2, betas (0.5, 0.9)), as the reference does.
``apply`` uses the generators in eval mode (BatchNorm running statistics), so it is deterministic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .base import Attack, AttackConfig, _check_int, _check_range, check_images, register_attack

_EPS = 1e-7


def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05, eps=1e-5)]
    if relu:
        mods.append(nn.ReLU(inplace=True))
    return mods


class IAGenerator(nn.Module):
    """The IA encoder-decoder (no skips); output in (0,1) via ``tanh(x) / (2 + eps) + 0.5``.

    Args:
        in_channels: image channels.
        out_channels: 3 for the pattern generator, 1 for the mask generator.
        channels: width of the first stage (reference 32); stages double it.
        steps: down/up-sampling stages (reference 3; H and W must be divisible by 2**steps).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: int = 16, steps: int = 3) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        c = in_channels
        for i in range(steps):
            w = channels * 2**i
            enc += _block(c, w) + _block(w, w) + [nn.MaxPool2d(2)]
            c = w
        enc += _block(c, c)  # middle
        dec: list[nn.Module] = []
        for i in reversed(range(steps)):
            w = channels * 2**i
            dec += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
            dec += _block(c, w)
            nxt = w // 2 if i > 0 else out_channels
            dec += _block(w, nxt, relu=i > 0)
            c = nxt
        self.net = nn.Sequential(*enc, *dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) / (2 + _EPS) + 0.5


def _rms(a: torch.Tensor) -> torch.Tensor:
    # + 1e-12 under the root: two saturated generator outputs can be exactly equal, and d sqrt(0) is infinite
    # (measured: head-pose IA training went NaN at step 2,872 without it)
    return (a.pow(2).flatten(1).mean(1) + 1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The IA diversity loss: different inputs must get different patterns (or masks)."""
    return (_rms(x1 - x2) / (_rms(g1 - g2) + _EPS)).mean()


@dataclasses.dataclass(frozen=True)
class InputAwareConfig(AttackConfig):
    """IA settings (reference defaults where they carry over).

    Attributes:
        poison_rate: p_attack (0.1).
        cross_rate: p_cross (0.1).
        channels: generator width (reference 32; 8 here: at 64 px on a CPU the generator costs as much as the DRM).
        steps: generator stages (3; H, W divisible by 8).
        mask_density: rho (0.032).
        lambda_norm: mask-norm weight (100).
        lambda_div: diversity weight (1).
        mask_steps: stage-1 steps run inside training (or by ``fit``).
        mask_batch: batch size of ``fit``'s stage 1.
    """

    poison_rate: float = 0.1
    cross_rate: float = 0.1
    channels: int = 8
    steps: int = 3
    mask_density: float = 0.032
    lambda_norm: float = 100.0
    lambda_div: float = 1.0
    mask_steps: int = 200
    mask_batch: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("cross_rate", self.cross_rate, 0.0, 1.0)
        if self.poison_rate + self.cross_rate > 1:
            raise ConfigError("poison_rate + cross_rate must not exceed 1")
        _check_int("channels", self.channels, 2, 256)
        _check_int("steps", self.steps, 1, 5)
        _check_range("mask_density", self.mask_density, 0.0, 1.0, lo_open=True)
        _check_range("lambda_norm", self.lambda_norm, 0.0, 1e6)
        _check_range("lambda_div", self.lambda_div, 0.0, 1e6)
        _check_int("mask_steps", self.mask_steps, 0)
        _check_int("mask_batch", self.mask_batch, 2)


@register_attack("input_aware")
class InputAwareAttack(Attack):
    """Input-aware dynamic attack: a trained per-input pattern and mask, dirty-label with cross samples."""

    config_cls = InputAwareConfig

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        c, h, w = self.image_shape
        cfg: InputAwareConfig = self.config
        if h % 2**cfg.steps or w % 2**cfg.steps:
            raise ConfigError(f"input_aware with steps={cfg.steps} needs H and W divisible by {2**cfg.steps}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 303)
            self.pattern_gen = IAGenerator(c, c, cfg.channels, cfg.steps)
            self.mask_gen = IAGenerator(c, 1, cfg.channels, cfg.steps)
        self.mask_done = cfg.mask_steps == 0
        self._steps_seen = 0
        self.train(True)

    # ----------------------------------------------------------------- modules
    def train(self, mode: bool = True) -> InputAwareAttack:
        self.pattern_gen.train(mode)
        self.mask_gen.train(mode and not self.mask_done)
        return self

    def to(self, device: torch.device | str) -> InputAwareAttack:
        self.pattern_gen.to(device)
        self.mask_gen.to(device)
        return self

    def optimizer_params(self) -> list[torch.Tensor]:
        params = list(self.pattern_gen.parameters())
        if not self.mask_done:
            params += list(self.mask_gen.parameters())
        return params

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask_gen(x)
        return torch.tanh(20 * m - 10) / (2 + _EPS) + 0.5

    def _freeze_mask(self) -> None:
        self.mask_done = True
        self.mask_gen.eval()
        for p in self.mask_gen.parameters():
            p.requires_grad_(False)

    def _mask_loss(self, x: torch.Tensor) -> torch.Tensor:
        cfg: InputAwareConfig = self.config
        x2 = x.roll(1, dims=0)
        m1 = self._mask(x)
        m2 = m1.roll(1, dims=0)  # = mask(x2): a permuted batch gives permuted outputs, BN statistics included
        norm = F.relu(m1 - cfg.mask_density).mean()
        return cfg.lambda_norm * norm + cfg.lambda_div * diversity_loss(x, x2, m1, m2)

    # ----------------------------------------------------------------- test time
    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        modes = (self.pattern_gen.training, self.mask_gen.training)
        self.pattern_gen.eval()
        self.mask_gen.eval()
        try:
            dev = next(self.pattern_gen.parameters()).device
            xd = x.to(dev)
            out = xd + (self.pattern_gen(xd) - xd) * self._mask(xd)
        finally:
            self.pattern_gen.train(modes[0])
            self.mask_gen.train(modes[1])
        return out.to(x.device)

    # ----------------------------------------------------------------- training
    def fit(self, model: nn.Module | None, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Runs stage 1 (mask generator) up front on the training images; the model is not used."""
        cfg: InputAwareConfig = self.config
        if self.mask_done:
            return
        images = check_images(images, "training images")
        opt = torch.optim.Adam(self.mask_gen.parameters(), lr=1e-2, betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(self.seed + 404)
        dev = next(self.mask_gen.parameters()).device
        self.mask_gen.train()
        for _ in range(cfg.mask_steps):
            idx = torch.randint(0, images.shape[0], (cfg.mask_batch,), generator=g)
            loss = self._mask_loss(images[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self._freeze_mask()

    def _poison(
        self, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        cfg: InputAwareConfig = self.config
        aux: torch.Tensor | None = None
        if not self.mask_done:
            if self._steps_seen >= cfg.mask_steps:
                self._freeze_mask()
            else:
                self.mask_gen.train()
                aux = self._mask_loss(x[: cfg.mask_batch])
        self._steps_seen += 1
        self.pattern_gen.train()
        bd, cross = self._choose(x.shape[0], step, cfg.poison_rate, cfg.cross_rate)
        yp = y.clone()
        yp[bd.to(y.device)] = self._target.to(y)
        sel = torch.nonzero(bd | cross).flatten()
        if len(sel) == 0:
            return x, yp, aux, bd, cross
        # The generators only run on the samples that get a trigger (20% of the batch): at 64 px they cost
        # as much per image as the DRM. x2 (the reference's second loader) = the selection rolled by one.
        xs = x[sel.to(x.device)]
        with torch.no_grad():  # the mask gets no task-loss gradient (the reference freezes M in stage 2)
            ms = self._mask(xs)
        ps = self.pattern_gen(xs)
        # A permuted batch gives permuted outputs (BatchNorm batch statistics included): G(x2) = roll(G(x)).
        ps2, ms2 = ps.roll(1, dims=0), ms.roll(1, dims=0)
        is_cross = cross[sel].to(x.device).view(-1, 1, 1, 1)
        triggered = torch.where(is_cross, xs + (ps2 - xs) * ms2, xs + (ps - xs) * ms)
        xp = x.clone()
        xp[sel.to(x.device)] = triggered  # keeps G's graph into the trainer's loss
        div = cfg.lambda_div * diversity_loss(xs, xs.roll(1, dims=0), ps, ps2) if len(sel) > 1 else None
        if div is not None:
            aux = div if aux is None else aux + div
        return xp, yp, aux, bd, cross

    # ----------------------------------------------------------------- persistence
    def state_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for prefix, mod in (("pattern_gen.", self.pattern_gen), ("mask_gen.", self.mask_gen)):
            for k, v in mod.state_dict().items():
                out[prefix + k] = v.detach().cpu().numpy()
        out["mask_done"] = np.array([1 if self.mask_done else 0], np.int64)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for prefix, mod in (("pattern_gen.", self.pattern_gen), ("mask_gen.", self.mask_gen)):
            ref = mod.state_dict()
            state = {}
            for k, v in ref.items():
                a = arrays.get(prefix + k)
                if a is None or a.shape != tuple(v.shape):
                    raise DataError(f"attack file: {prefix + k!r} missing or not shaped {tuple(v.shape)}")
                state[k] = torch.from_numpy(np.array(a)).to(v.dtype)
            mod.load_state_dict(state)
        if int(arrays.get("mask_done", np.array([1]))[0]):
            self._freeze_mask()
        self.eval()
