"""Training and evaluation of deep regression models (DRMs), clean or with a backdoor attack.

The paper (Du et al., arXiv 2411.04811, appendix A.2 and A.4) trains every DRM with the L1 loss and Adam; its
per-dataset schedules are :data:`PAPER_SCHEDULES`. The small synthetic 64x64 default (``synthetic64``) was
measured on this project's renderer (docs/engine.md). An attack, when given, rewrites each minibatch through
``attack.poison_batch`` (the contract is in docs/design.md, ``attacks/`` row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from . import metrics
from .errors import ConfigError, DataError, InspectionError
from .tasks import Task, per_sample_error


@dataclass(frozen=True, slots=True)
class TrainSchedule:
    """Adam + step decay: ``lr`` for ``steps`` minibatches, multiplied by ``gamma`` at each milestone."""

    steps: int
    lr: float
    batch_size: int = 64
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not (0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0 < self.gamma <= 1):
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing positive steps, got {self.milestones}")


# Appendix A.2. The paper does not state the training batch size; 64 is our choice.
PAPER_SCHEDULES: dict[str, TrainSchedule] = {
    "mpiifacegaze": TrainSchedule(steps=10_000, lr=1e-4),
    "columbiagaze": TrainSchedule(steps=10_000, lr=1e-3, milestones=(5_000, 9_000)),
    "biwi": TrainSchedule(steps=5_000, lr=1e-4),
    "pandora": TrainSchedule(steps=10_000, lr=1e-4, milestones=(5_000,)),
}

# Our CPU-sized default for the 64x64 synthetic faces (docs/engine.md has the measured errors and times):
# lr 1e-3 with one decay near the end, ColumbiaGaze-style, converges far faster from scratch than 1e-4.
SCHEDULES: dict[str, TrainSchedule] = {
    "synthetic64": TrainSchedule(steps=1_500, lr=2e-3, batch_size=64, milestones=(1_000, 1_350)),
    **PAPER_SCHEDULES,
}
DEFAULT_SCHEDULE = "synthetic64"


@dataclass(frozen=True, slots=True)
class TrainProgress:
    """One training step done: ``step`` of ``total`` (1-based), the minibatch loss and the current lr."""

    step: int
    total: int
    loss: float
    lr: float


def resolve_schedule(
    schedule: TrainSchedule | str | None = None,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    milestones: Sequence[int] | None = None,
    gamma: float | None = None,
) -> TrainSchedule:
    """The schedule named (default ``synthetic64``) with any explicitly given values replacing its own.

    When ``steps`` is overridden but ``milestones`` is not, the preset's milestones are rescaled to the new
    step count (so ``steps=100`` keeps the same decay shape).
    """
    if schedule is None:
        schedule = DEFAULT_SCHEDULE
    if isinstance(schedule, str):
        key = schedule.strip().lower().replace("-", "").replace("_", "")
        if key not in SCHEDULES:
            raise ConfigError(f"unknown training schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
        base = SCHEDULES[key]
    else:
        base = schedule
    kw: dict[str, Any] = {}
    if steps is not None:
        kw["steps"] = int(steps)
        if milestones is None:
            kw["milestones"] = tuple(
                sorted(
                    {max(1, round(m * int(steps) / base.steps)) for m in base.milestones if m < base.steps}
                )
            )
    if lr is not None:
        kw["lr"] = float(lr)
    if batch_size is not None:
        kw["batch_size"] = int(batch_size)
    if milestones is not None:
        kw["milestones"] = tuple(int(m) for m in milestones)
    if gamma is not None:
        kw["gamma"] = float(gamma)
    return replace(base, **kw)


def as_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) or float ([0,1]) images (N,C,H,W) -> float32 tensor in [0,1] (no copy for float32)."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        raise DataError(f"images must be uint8 or float, got {t.dtype}")
    return t.float()


def _check_data(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, task: Task
) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"images must have shape (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    y = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels).float()
    if y.ndim != 2 or y.shape != (images.shape[0], task.dim):
        raise DataError(
            f"labels must have shape ({images.shape[0]}, {task.dim}) for task {task.value}, "
            f"got {tuple(y.shape)}"
        )
    if not torch.isfinite(y).all():
        raise DataError("labels contain NaN or Inf")
    return y


def _batch(images: np.ndarray | torch.Tensor, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    # Index first (only the batch is converted), so uint8 datasets stay uint8 in memory.
    b = images[idx] if isinstance(images, np.ndarray) else images[torch.from_numpy(idx)]
    return as_float_images(b).to(device, non_blocking=True)


def train(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    task: Task | str,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    attack: Any | None = None,
    schedule: TrainSchedule | str | None = None,
    milestones: Sequence[int] | None = None,
    gamma: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Callable[[TrainProgress], None] | None = None,
) -> nn.Module:
    """Trains ``model`` in place with the L1 loss and Adam, optionally implanting a backdoor.

    Args:
        model: a regression net (inputs [0,1], outputs degrees).
        images: (N,C,H,W) uint8 (0-255) or float in [0,1]; numpy or torch.
        labels: (N,d) degrees in the task's order.
        task: ``gaze`` or ``headpose``.
        steps, lr, batch_size, milestones, gamma: override the schedule's values.
        attack: an object following the attack training contract (docs/design.md): each minibatch goes
            through ``attack.poison_batch(x, y, step) -> (x, y, aux_loss)``; ``attack.optimizer_params()``
            are trained jointly with their own Adam (``optimizer_lr``, ``optimizer_betas``); attacks with
            ``requires_model`` get ``attack.bind(model)`` first.
        schedule: a :class:`TrainSchedule` or a name in :data:`SCHEDULES` (default ``synthetic64``).
        device: where to train (the model and attack are moved there).
        seed: seeds the minibatch order (a private generator; the global RNG is not reseeded).
        progress: called after every step with a :class:`TrainProgress`.

    Returns:
        The same model, trained, in eval mode, on ``device``.

    Raises:
        DataError: bad shapes or non-finite labels. InspectionError: the loss became NaN/Inf.
    """
    task = Task.parse(task)
    sched = resolve_schedule(
        schedule, steps=steps, lr=lr, batch_size=batch_size, milestones=milestones, gamma=gamma
    )
    y_all = _check_data(images, labels, task)
    if (
        isinstance(images, np.ndarray)
        and images.dtype != np.uint8
        and not np.issubdtype(images.dtype, np.floating)
    ):
        raise DataError(f"images must be uint8 or float, got {images.dtype}")
    n = int(images.shape[0])
    if n < 1:
        raise DataError("no training images")
    dev = torch.device(device)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=sched.lr)
    lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(sched.milestones), gamma=sched.gamma)
    attack_opt: torch.optim.Optimizer | None = None
    if attack is not None:
        if hasattr(attack, "to"):
            attack.to(dev)
        if hasattr(attack, "train"):
            attack.train(True)
        if getattr(attack, "requires_model", False):
            attack.bind(model)  # e.g. the adaptive attack's loss reads the model's features
        params = list(attack.optimizer_params()) if hasattr(attack, "optimizer_params") else []
        if params:
            betas = tuple(getattr(attack, "optimizer_betas", (0.5, 0.9)))
            attack_opt = torch.optim.Adam(
                params, lr=float(getattr(attack, "optimizer_lr", 1e-2)), betas=betas
            )
    rng = np.random.default_rng(seed)
    bs = min(sched.batch_size, n)
    perm, pos = rng.permutation(n), 0
    try:
        for step in range(sched.steps):
            if pos + bs > n:  # a new epoch: reshuffle, drop the short tail so BN never sees tiny batches
                perm, pos = rng.permutation(n), 0
            idx = perm[pos : pos + bs]
            pos += bs
            x = _batch(images, idx, dev)
            y = y_all[torch.from_numpy(idx)].to(dev)
            aux: torch.Tensor | None = None
            if attack is not None:
                out = attack.poison_batch(x, y, step)
                x, y = out[0], out[1]
                aux = out[2] if len(out) > 2 else None
            loss = nnf.l1_loss(model(x), y)
            total = loss if aux is None else loss + aux
            if not torch.isfinite(total):
                raise InspectionError(
                    f"training diverged at step {step + 1} (loss {float(total.detach())}); lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            if attack_opt is not None:
                attack_opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if attack_opt is not None:
                attack_opt.step()
            cur_lr = opt.param_groups[0]["lr"]
            lr_sched.step()
            if progress is not None:
                progress(TrainProgress(step + 1, sched.steps, float(loss.detach()), float(cur_lr)))
    finally:
        model.eval()
        if attack is not None and hasattr(attack, "train"):
            attack.train(False)
    return model


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    with_features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model outputs (N,d) on CPU, and the features F(x) (N,m) if asked (needs ``model.features``)."""
    dev = torch.device(device)
    model.to(dev).eval()
    outs, feats = [], []
    for i in range(0, int(images.shape[0]), batch_size):
        x = _batch(images, np.arange(i, min(i + batch_size, int(images.shape[0]))), dev)
        if transform is not None:
            x = transform(x)
        if with_features:
            f = model.features(x)  # type: ignore[operator]
            feats.append(f.float().cpu())
            outs.append(model.head(f).float().cpu())  # type: ignore[operator]
        else:
            outs.append(model(x).float().cpu())
    return torch.cat(outs), (torch.cat(feats) if with_features else None)


def evaluate(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    task: Task | str,
    attack: Any | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Regression errors in degrees and, with an attack, the feature-space metrics of eq. 3.

    Returns:
        ``re``: error on clean inputs vs true labels. With ``attack``: ``ae`` (error of f(A(x)) to
        ``attack.target``), ``dae`` (error of f(A(x)) to the true labels), ``rnv`` and ``rav`` (poisoned vs
        clean features over the whole set; needs ``model.features``/``model.head``).
    """
    task = Task.parse(task)
    y = _check_data(images, labels, task)
    split = attack is not None and hasattr(model, "features") and hasattr(model, "head")
    pred, feats = predict(model, images, batch_size=batch_size, device=device, with_features=split)
    out = {"re": float(per_sample_error(task, pred, y).mean())}
    if attack is not None:
        if hasattr(attack, "to"):
            attack.to(torch.device(device))
        if hasattr(attack, "train"):
            attack.train(False)
        pred_p, feats_p = predict(
            model, images, batch_size=batch_size, device=device, transform=attack.apply, with_features=split
        )
        target = torch.as_tensor(attack.target, dtype=torch.float32).reshape(1, -1).cpu()
        out["ae"] = float(per_sample_error(task, pred_p, target).mean())
        out["dae"] = float(per_sample_error(task, pred_p, y).mean())
        if split and feats is not None and feats_p is not None:
            w = model.head.weight.detach().float().cpu()  # type: ignore[union-attr]
            out["rnv"] = float(metrics.rnv(feats_p, feats))
            out["rav"] = float(metrics.rav(feats_p, feats, w))
    for k, v in out.items():
        if not math.isfinite(v):
            raise InspectionError(f"evaluation produced a non-finite {k} ({v}); check the model and data")
    return out


__all__ = [
    "DEFAULT_SCHEDULE",
    "PAPER_SCHEDULES",
    "SCHEDULES",
    "TrainProgress",
    "TrainSchedule",
    "as_float_images",
    "evaluate",
    "predict",
    "resolve_schedule",
    "train",
]
