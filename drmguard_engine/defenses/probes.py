"""Universal, budgeted trigger probes: a relative decision statistic beside DRMGuard's L1 rule.

DRMGuard (Du et al., arXiv 2411.04811) searches for an input-aware transformation that collapses the outputs
and judges the model by the size of that transformation against a fixed budget (epsilon * max ||x||_1). At 64 px
an input-aware generator collapses *clean* gaze models cheaply by re-aiming each eye, and whole-image triggers
(Blend, SIG, WaNet) cost more than the budget (``../shared/notes/pilot-64px.md``).

A probe asks the same question the other way round: at a *fixed* budget, how far can one input-agnostic
transformation collapse the outputs? A backdoor is a universal shortcut by construction, so a budgeted
universal transformation in the right family collapses a backdoored model's output variance to a small fraction
(the trigger, or part of it, is found), while a clean model has no universal shortcut. Pixels the model relies on
most (the task region, e.g. the eyes) are excluded for the additive families, so a probe cannot collapse a clean
model by erasing the task features (DRMGuard's own motivation for the MTR). Each probe is fitted on one half of
D_be and scored on the other half (no batch over-fitting): the score is the mean over outputs of
Var f_j(x') / Var f_j(x), lower meaning more suspicious. Families: ``blend`` ((1-a)x + a p, a <= alpha),
``patch`` ((1-m)x + m p, mean(m) <= area), ``warp`` (one smooth displacement field of at most ``warp_fraction`` of
the image side), ``smooth`` (x + d, d a low-frequency signal on a ``smooth_grid`` grid upsampled to the image,
|d| <= ``smooth_linf``: SIG-like and lighting-like triggers; clean models have no smooth universal shortcut, while a
full-resolution additive perturbation (``additive``, off by default) finds adversarial directions in clean models
too: on the 64 px zoo it brought clean gaze models to 0.09 at L-inf 0.16, the smooth one only to 0.25 while SIG models
fell to 0.02). The statistics follow the universal-perturbation line of work (USB, Xu et al. 2023; expected
transferability, Xiang et al. 2022) summarised in ``../shared/notes/detection-signals.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CancelledError, ConfigError

FAMILIES = ("blend", "patch", "warp", "additive", "smooth")


@dataclass(frozen=True)
class ProbeConfig:
    families: tuple[str, ...] = ("blend", "patch", "warp", "smooth")
    steps: int = 150
    batch_size: int = 50
    lr: float = 0.05
    blend_alpha: float = 0.25
    patch_area: float = 0.02
    patch_start_area: float = 0.5
    patch_anneal: float = 0.6  # fraction of the steps over which the area budget shrinks to patch_area
    warp_grid: int = 8
    warp_fraction: float = 2.0 / 64.0
    additive_linf: float = 0.1
    smooth_linf: float = 0.16
    smooth_grid: int = 32
    exclude_fraction: float = 0.10
    exclude_dilate: int = 3
    exclude_families: tuple[str, ...] = ("blend", "patch", "additive", "smooth")
    saliency_images: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"probe families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if self.steps <= 0 or self.batch_size <= 1:
            raise ConfigError("probe steps must be positive and batch_size at least 2")
        if not 0 < self.blend_alpha < 1 or not 0 < self.patch_area < 1:
            raise ConfigError("blend_alpha and patch_area must be in (0, 1)")
        if not 0 <= self.exclude_fraction < 1:
            raise ConfigError(f"exclude_fraction must be in [0, 1), got {self.exclude_fraction}")

    def replace(self, **changes: Any) -> ProbeConfig:
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


@dataclass
class ProbeResult:
    family: str
    variance_ratio: float  # held-out mean_j Var f_j(x') / Var f_j(x); lower = more suspicious
    fit_variance_ratio: float
    collapse_point: list[float]  # mean f(x') on the held-out half
    drift: float  # ||mean f(x') - mean f(x)|| in units of the benign output std
    perturbation_ratio: float  # mean ||x'-x||_1 / max ||x||_1 on the held-out half
    seconds: float
    example: torch.Tensor | None = None  # a few probed images (for plots)
    transform: nn.Module | None = None  # the fitted universal transformation (mitigation reuses it)


def saliency_exclusion(model: nn.Module, images: torch.Tensor, fraction: float, dilate: int) -> torch.Tensor:
    """(1,1,H,W) mask, 1 on the ``fraction`` most salient pixels (sum over outputs of |df_j/dx|), dilated."""
    with torch.enable_grad():
        return _saliency_exclusion(model, images, fraction, dilate)


def _saliency_exclusion(model: nn.Module, images: torch.Tensor, fraction: float, dilate: int) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    y = model(x)
    sal = torch.zeros(images.shape[-2:], device=images.device)
    for j in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, j].sum(), x, retain_graph=j < y.shape[1] - 1)
        sal = sal + g.abs().sum((0, 1))
    if fraction <= 0:
        return torch.zeros(1, 1, *images.shape[-2:], device=images.device)
    k = max(1, int(round(fraction * sal.numel())))
    thr = sal.flatten().topk(k).values[-1]
    mask = (sal >= thr).float()[None, None]
    if dilate > 1:
        mask = F.max_pool2d(mask, dilate, stride=1, padding=dilate // 2)
    return mask.detach()


class _Probe(nn.Module):
    def __init__(self, family: str, shape: tuple[int, int, int], cfg: ProbeConfig, exclude: torch.Tensor | None):
        super().__init__()
        c, h, w = shape
        self.family, self.cfg = family, cfg
        # the patch budget is annealed from a large area down to ``patch_area`` (as Neural Cleanse shrinks its
        # mask from the whole image): a mask born at 2% of the area has almost no gradient telling it where to go
        self.area_budget = cfg.patch_area
        self.register_buffer("exclude", exclude if exclude is not None else torch.zeros(1, 1, h, w))
        if family in ("blend", "patch"):
            self.pattern = nn.Parameter(torch.zeros(1, c, h, w))
        if family == "blend":
            self.alpha = nn.Parameter(torch.zeros(()))
        if family == "patch":
            self.mask = nn.Parameter(torch.zeros((1, 1, h, w)))
        if family == "additive":
            self.delta = nn.Parameter(torch.zeros(1, c, h, w))
        if family == "smooth":
            # at most half the image side: the signal stays low-frequency on small inputs too (a grid as fine as
            # the image would be a full-resolution additive probe, which finds adversarial directions in clean models)
            g = max(2, min(cfg.smooth_grid, h // 2, w // 2))
            self.delta = nn.Parameter(torch.zeros(1, c, g, g))
        if family == "warp":
            self.flow = nn.Parameter(torch.zeros(1, 2, cfg.warp_grid, cfg.warp_grid))
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            self.register_buffer("identity", torch.stack((xs, ys), -1)[None])

    def patch_mask(self) -> torch.Tensor:
        m = torch.sigmoid(self.mask)
        area = m.mean()
        return m * torch.clamp(self.area_budget / (area + 1e-12), max=1.0)  # hard budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "warp":
            h, w = x.shape[-2:]
            disp = torch.tanh(self.flow) * self.cfg.warp_fraction * 2.0  # normalised coords span 2
            disp = F.interpolate(disp, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            grid = (self.identity + disp).clamp(-1, 1).expand(x.shape[0], -1, -1, -1)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
        if self.family == "blend":
            a = self.cfg.blend_alpha * torch.sigmoid(self.alpha)
            y = (1 - a) * x + a * torch.sigmoid(self.pattern)
        elif self.family == "patch":
            m = self.patch_mask()
            y = (1 - m) * x + m * torch.sigmoid(self.pattern)
        elif self.family == "smooth":
            # a low-frequency additive signal (SIG-like, lighting-like): a coarse grid upsampled to the image;
            # clean models have no smooth universal shortcut, adversarial perturbations are high-frequency
            d = F.interpolate(torch.tanh(self.delta), size=x.shape[-2:], mode="bilinear", align_corners=True)
            y = (x + self.cfg.smooth_linf * d).clamp(0, 1)
        else:
            y = (x + self.cfg.additive_linf * torch.tanh(self.delta)).clamp(0, 1)
        e = self.exclude
        return e * x + (1 - e) * y


def run_probes(
    model: nn.Module,
    images: torch.Tensor,
    cfg: ProbeConfig,
    *,
    progress: Callable[[str, int, int, dict[str, float], float | None], None] | None = None,
    cancel: Any = None,
) -> list[ProbeResult]:
    """Fits each probe family on one half of ``images`` and scores it on the other half."""
    n = images.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen).to(images.device)
    fit, held = images[perm[: n // 2]], images[perm[n // 2 :]]
    if fit.shape[0] < 2 or held.shape[0] < 2:
        raise ConfigError(f"the probes need at least 4 benign images, got {n}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    with torch.no_grad():
        out_fit = torch.cat([model(fit[i : i + 256]) for i in range(0, fit.shape[0], 256)])
        out_held = torch.cat([model(held[i : i + 256]) for i in range(0, held.shape[0], 256)])
    var_fit = out_fit.var(0, unbiased=False).clamp_min(1e-12)
    var_held = out_held.var(0, unbiased=False).clamp_min(1e-12)
    exclude = None
    if any(f in cfg.exclude_families for f in cfg.families) and cfg.exclude_fraction > 0:
        exclude = saliency_exclusion(model, fit[: cfg.saliency_images], cfg.exclude_fraction, cfg.exclude_dilate)
    max_l1 = held.abs().flatten(1).sum(1).max().clamp_min(1e-12)
    results = []
    total = cfg.steps * len(cfg.families)
    done = 0
    for family in cfg.families:
        t0 = time.perf_counter()
        probe = _Probe(family, tuple(images.shape[1:]), cfg, exclude if family in cfg.exclude_families else None)
        probe = probe.to(images.device)
        opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
        # each family draws its batches from its own stream, so a family's result does not depend on which
        # families ran before it (results can be cached and compared per family)
        fgen = torch.Generator().manual_seed(cfg.seed * 1009 + FAMILIES.index(family) + 1)
        bs = min(cfg.batch_size, fit.shape[0])
        anneal = max(1, int(cfg.steps * cfg.patch_anneal))
        for step in range(cfg.steps):
            if cancel is not None and cancel.is_set():
                raise CancelledError("scan cancelled")
            if family == "patch":
                frac = min(1.0, step / anneal)
                probe.area_budget = cfg.patch_area * (cfg.patch_start_area / cfg.patch_area) ** (1.0 - frac)
            idx = torch.randperm(fit.shape[0], generator=fgen)[:bs].to(images.device)
            out = model(probe(fit[idx]))
            loss = (out.var(0, unbiased=False) / var_fit).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if progress is not None and (step % 25 == 0 or step == cfg.steps - 1):
                progress("probe", done, total, {f"probe_{family}": float(loss.detach())}, None)
        probe.area_budget = cfg.patch_area
        with torch.no_grad():
            xp_fit = torch.cat([probe(fit[i : i + 256]) for i in range(0, fit.shape[0], 256)])
            fit_ratio = float((torch.cat([model(xp_fit[i : i + 256]) for i in range(0, xp_fit.shape[0], 256)])
                               .var(0, unbiased=False) / var_fit).mean())
            xp = torch.cat([probe(held[i : i + 256]) for i in range(0, held.shape[0], 256)])
            out_p = torch.cat([model(xp[i : i + 256]) for i in range(0, xp.shape[0], 256)])
            ratio = float((out_p.var(0, unbiased=False) / var_held).mean())
            point = out_p.mean(0)
            drift = float(((point - out_held.mean(0)) / var_held.sqrt()).norm())
            pr = float((xp - held).abs().flatten(1).sum(1).mean() / max_l1)
        results.append(
            ProbeResult(
                family=family,
                variance_ratio=ratio,
                fit_variance_ratio=fit_ratio,
                collapse_point=[float(v) for v in point.tolist()],
                drift=drift,
                perturbation_ratio=pr,
                seconds=time.perf_counter() - t0,
                example=xp[:4].detach().cpu(),
                transform=probe.eval(),
            )
        )
    return results
