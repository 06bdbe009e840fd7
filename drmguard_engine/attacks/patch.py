"""Patch triggers: BadNets and Clean Label (paper A.3).

BadNets (Gu et al., 2019): a solid red patch in the bottom-right corner, 20x20 at 224 px (scaled to the image:
6x6 at 64 px), 5% of the training samples relabelled to y_T.

Clean Label (Turner et al., 2019), regression form of the paper: the *target group* is
``{(x, y): ||y - y_T||_2 <= delta}`` (degrees); ``delta`` is chosen so the group holds ``group_fraction`` of the
training set. Half of the group is replaced by untargeted L_inf PGD adversarial images (maximising the L1 loss
against the true labels on a briefly trained clean model given to :meth:`CleanLabelAttack.fit`), the patch is
pasted on the whole group, and the group is relabelled to y_T, as the paper does (so, strictly, not clean-label).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from .base import (
    Attack,
    AttackConfig,
    _check_colour,
    _check_int,
    _check_range,
    check_images,
    register_attack,
    register_preset,
)

_POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left")


@dataclasses.dataclass(frozen=True)
class PatchConfig(AttackConfig):
    """A solid patch trigger.

    Attributes:
        poison_rate: share of each minibatch poisoned (BadNets: 5%, as in the paper).
        patch_size: side in pixels; ``None`` scales the paper's 20 px at 224 px (rounded, at least 2 px).
        colour: (R, G, B) in [0,1]; red by default.
        position: one of bottom_right (paper), bottom_left, top_right, top_left.
        margin: pixels between the patch and the image border (0 = in the corner).
    """

    poison_rate: float = 0.05
    patch_size: int | None = None
    colour: tuple[float, float, float] = (1.0, 0.0, 0.0)
    position: str = "bottom_right"
    margin: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size is not None:
            _check_int("patch_size", self.patch_size, 1)
        _check_colour("colour", self.colour)
        if self.position not in _POSITIONS:
            raise ConfigError(f"position must be one of {', '.join(_POSITIONS)}, got {self.position!r}")
        _check_int("margin", self.margin, 0)


def patch_side(cfg: PatchConfig, height: int, width: int) -> int:
    """The patch side in pixels: the config's, or the paper's 20/224 of the image side."""
    side = cfg.patch_size if cfg.patch_size is not None else max(2, int(round(20 / 224 * min(height, width))))
    if side + cfg.margin > min(height, width):
        raise ConfigError(f"a {side}px patch with margin {cfg.margin} does not fit a {height}x{width} image")
    return side


def make_patch(cfg: PatchConfig, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (1,1,H,W) in {0,1}, pattern (1,C,H,W)) for a solid patch."""
    c, h, w = shape
    side = patch_side(cfg, h, w)
    mask = torch.zeros(1, 1, h, w)
    top = cfg.margin if cfg.position.startswith("top") else h - cfg.margin - side
    left = cfg.margin if cfg.position.endswith("left") else w - cfg.margin - side
    mask[..., top : top + side, left : left + side] = 1.0
    colour = torch.tensor(cfg.colour, dtype=torch.float32)
    if c == 1:  # grey images: the patch's luminance
        colour = (colour * torch.tensor([0.299, 0.587, 0.114])).sum().reshape(1)
    pattern = colour.view(1, c, 1, 1).expand(1, c, h, w).clone()
    return mask, pattern


class _PatchTrigger(Attack):
    """Shared patch plumbing: ``x' = (1 - m) x + m p``."""

    config_cls = PatchConfig

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.mask, self.pattern = make_patch(self.config, self.image_shape)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x)
        return x * (1 - m) + m * self.pattern.to(x)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"mask": self.mask.numpy(), "pattern": self.pattern.numpy()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for key in ("mask", "pattern"):
            if key not in arrays or arrays[key].shape != tuple(getattr(self, key).shape):
                raise DataError(f"attack file: {key!r} missing or not shaped {tuple(getattr(self, key).shape)}")
        self.mask = torch.from_numpy(np.array(arrays["mask"], dtype=np.float32))
        self.pattern = torch.from_numpy(np.array(arrays["pattern"], dtype=np.float32))


@register_attack("badnets")
class BadNetsAttack(_PatchTrigger):
    """BadNets: a solid red corner patch, dirty-label (5% of each minibatch relabelled to y_T)."""


register_preset("badnets_small", BadNetsAttack, doc="BadNets with a 4 px patch (a smaller L1 footprint)", patch_size=4)


@dataclasses.dataclass(frozen=True)
class CleanLabelConfig(PatchConfig):
    """Clean Label (regression form).

    Attributes:
        group_fraction: share of the training set in the target group (sets delta when ``delta`` is None). 0.20
            by default: at 5% (the notes' "a few percent") with PGD at 8/255 the backdoor did not implant in 1,500
            steps at 64 px (gaze AE 18.5 deg against clean RE 3.6); at 15% with 24/255 gaze sat on the edge (AE
            7.9 against RE 3.9 on the zoo's test set), at 20% it implanted with a margin (AE 4.7, RE 4.0).
            docs/attacks.md has the measurements.
        delta: explicit group radius ||y - y_T||_2 in degrees (overrides ``group_fraction``).
        pgd_fraction: share of the group replaced by PGD adversarial images (paper: half).
        pgd_eps, pgd_step, pgd_steps: L_inf PGD budget, step and steps (BackdoorBox LC: 8/255, 1.5/255, 100;
            the budget here is 24/255, within the 16-32/255 range of the label-consistent attack's paper).
        pgd_batch: images per PGD batch.
        poison_rate: unused (the group decides what is poisoned); kept for the shared interface.
    """

    group_fraction: float = 0.20
    delta: float | None = None
    pgd_fraction: float = 0.5
    pgd_eps: float = 24 / 255
    pgd_step: float = 1.5 / 255
    pgd_steps: int = 100
    pgd_batch: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("group_fraction", self.group_fraction, 0.0, 0.5, lo_open=True)
        if self.delta is not None:
            _check_range("delta", self.delta, 0.0, 180.0, lo_open=True)
        _check_range("pgd_fraction", self.pgd_fraction, 0.0, 1.0)
        _check_range("pgd_eps", self.pgd_eps, 0.0, 1.0)
        _check_range("pgd_step", self.pgd_step, 0.0, 1.0)
        _check_int("pgd_steps", self.pgd_steps, 0)
        _check_int("pgd_batch", self.pgd_batch, 1)


def _label_key(row: np.ndarray) -> bytes:
    # Labels are continuous, so a label (rounded to 1e-3 degree) identifies a training sample; rounding keeps the
    # key stable across float32/float64 conversions in the trainer.
    return np.round(row.astype(np.float64), 3).tobytes()


def pgd_untargeted(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    batch: int = 64,
) -> torch.Tensor:
    """L_inf PGD that maximises the L1 regression loss against the true labels; returns the perturbations.

    The model is used in eval mode and left in the mode it was in; its parameters get no gradients.
    """
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    out = torch.zeros_like(images)
    try:
        for s in range(0, images.shape[0], batch):
            x0, y0 = images[s : s + batch], labels[s : s + batch].to(images)
            d = torch.zeros_like(x0)
            for _ in range(steps):
                d.requires_grad_(True)
                loss = (model((x0 + d).clamp(0, 1)) - y0).abs().sum()
                (g,) = torch.autograd.grad(loss, d)
                d = (d.detach() + step * g.sign()).clamp(-eps, eps)
                d = (x0 + d).clamp(0, 1) - x0  # stay a valid image
            out[s : s + batch] = d.detach()
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return out


@register_attack("clean_label")
class CleanLabelAttack(_PatchTrigger):
    """Clean Label: the red patch on a target group near y_T, half of it PGD-perturbed, relabelled to y_T."""

    config_cls = CleanLabelConfig
    requires_fit = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.delta: float | None = self.config.delta
        self.adv_labels = np.zeros((0, self.task.dim), np.float32)  # labels of the PGD half (lookup keys)
        self.adv_perturbations = np.zeros((0, *self.image_shape), np.float16)
        self._table: dict[bytes, int] = {}
        self.group_size = 0

    def fit(self, model: nn.Module | None, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Picks the target group on the training set and computes PGD images for half of it.

        Args:
            model: a briefly trained clean model (PGD source); ``None`` only if ``pgd_steps`` is 0.
            images: the training images (N,C,H,W) float [0,1] or uint8.
            labels: the training labels (N,d) in degrees.
        """
        cfg: CleanLabelConfig = self.config
        images = check_images(images, "training images")
        labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        if labels.shape != (images.shape[0], self.task.dim):
            raise DataError(f"labels must be shaped ({images.shape[0]}, {self.task.dim}), got {tuple(labels.shape)}")
        dist = (labels - self._target).norm(dim=1)
        if self.delta is None:
            k = max(2, int(math.ceil(cfg.group_fraction * len(dist))))
            self.delta = float(dist.kthvalue(min(k, len(dist))).values) + 1e-4
        group = torch.nonzero(dist <= self.delta).flatten()
        if len(group) < 2:
            raise ConfigError(
                f"the target group ||y - y_T|| <= {self.delta:.2f} holds {len(group)} training samples: "
                "pick a target inside the label distribution or a larger delta/group_fraction"
            )
        self.group_size = int(len(group))
        g = torch.Generator().manual_seed(self.seed + 17)
        chosen = group[torch.randperm(len(group), generator=g)[: int(round(cfg.pgd_fraction * len(group)))]]
        if len(chosen) and cfg.pgd_steps > 0:
            if model is None:
                raise ConfigError("clean_label needs a (briefly trained, clean) model for PGD, or pgd_steps=0")
            dev = next(model.parameters()).device
            pert = pgd_untargeted(
                model,
                images[chosen].to(dev),
                labels[chosen].to(dev),
                eps=cfg.pgd_eps,
                step=cfg.pgd_step,
                steps=cfg.pgd_steps,
                batch=cfg.pgd_batch,
            ).cpu()
        else:
            pert = torch.zeros((len(chosen), *self.image_shape))
        self.adv_labels = labels[chosen].numpy().astype(np.float32)
        self.adv_perturbations = pert.numpy().astype(np.float16)
        self._build_table()

    def _build_table(self) -> None:
        self._table = {_label_key(r): i for i, r in enumerate(self.adv_labels)}

    def _poison(
        self, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        if self.delta is None:
            raise ConfigError("clean_label: call fit(model, images, labels) before training (or set delta)")
        t = self._target.to(y)
        bd = ((y - t).norm(dim=1) <= self.delta).cpu()
        xp, yp = x.clone(), y.clone()
        if bd.any():
            idx = torch.nonzero(bd).flatten()
            ynp = y.detach().cpu().numpy()
            for i in idx.tolist():
                row = self._table.get(_label_key(ynp[i]))
                if row is not None:  # the PGD half: adversarial image under the patch
                    d = torch.from_numpy(self.adv_perturbations[row].astype(np.float32)).to(x)
                    xp[i] = (x[i] + d).clamp(0, 1)
            xp[idx] = self._trigger(xp[idx])
            yp[idx] = t
        return xp, yp, None, bd, torch.zeros_like(bd)

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = super().state_arrays()
        out["delta"] = np.array([np.nan if self.delta is None else self.delta], np.float64)
        out["adv_labels"] = self.adv_labels
        out["adv_perturbations"] = self.adv_perturbations
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        if "delta" in arrays:
            d = float(arrays["delta"].reshape(-1)[0])
            self.delta = None if math.isnan(d) else d
        labs = arrays.get("adv_labels", np.zeros((0, self.task.dim), np.float32))
        pert = arrays.get("adv_perturbations", np.zeros((0, *self.image_shape), np.float16))
        if labs.ndim != 2 or labs.shape[1] != self.task.dim or pert.shape != (labs.shape[0], *self.image_shape):
            raise DataError("attack file: adv_labels/adv_perturbations do not match the task and image shape")
        self.adv_labels, self.adv_perturbations = labs.astype(np.float32), pert.astype(np.float16)
        self._build_table()
