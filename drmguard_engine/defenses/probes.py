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

import contextlib
import copy
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CancelledError, ConfigError
from .drmguard import memory_format_for, outputs_agree

FAMILIES = ("blend", "patch", "warp", "additive", "smooth")
RIGIDITY_STATISTICS = ("median", "mean")
PRECISIONS = ("float32", "bfloat16")


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
    # rigidity check of a flagged probe (is its collapse point one fixed output, or can the same budget move it?):
    # control points at the collapse point +- ``rigidity_distance`` benign stds along two directions, each fitted
    # for ``rigidity_steps`` (probe_rigidity)
    rigidity_controls: int = 4
    rigidity_distance: float = 0.5
    rigidity_steps: int = 50  # each fit starts from the probe's own transformation
    # how the control errors are reduced before dividing by the collapse point's: "median" (the default
    # since 2026-11-27) or "mean" (the form first shipped). A clean model whose collapse point lies at the
    # edge of its output range cannot go further out: one control, the outward one, is far harder than the
    # rest (measured: a clean ConvNeXt's controls were 3.67, 1.44, 1.65 and 1.49 times the collapse error;
    # the mean, 2.06, flagged it, the median, 1.57, does not). A backdoor target is hard to leave in every
    # direction, so the median keeps it (docs/scan.md)
    rigidity_statistic: str = "median"
    # ``steps`` is the budget at this image side; larger images get proportionally more (:meth:`steps_for`); 0 keeps
    # ``steps`` at every size. Measured at 224 px (docs/gpu.md): with 150 steps the patch probe's per-pixel mask had
    # not found a BadNets patch (variance ratio 0.089, the scan missed it); with 300 it had (0.014, rigidity 1.91)
    # and with 600 clearly (0.0027, rigidity 2.51), while three clean models stayed at 0.11 or more
    steps_reference_side: int = 64
    # the square search (on in the ``default`` and ``thorough`` profiles since 2026-11-27; off here and in
    # ``fast``): every solid square of these sides (fractions of the image side), at half-side spacing with the
    # edges included, in the 8 corner colours of the RGB cube, is tried on ``patch_grid_images`` fit images; the
    # patch probe is also refitted from the best square, and whichever fit collapses the fit half further is kept.
    # For triggers a network reads only at their exact size and position (torchvision's MobileNet V3-small,
    # ShuffleNet V2 and RegNet-Y BadNets, docs/scan.md), which the annealed soft mask cannot reach. 13,016
    # candidates at any image size
    patch_grid: bool = False
    patch_grid_sides: tuple[float, ...] = (0.07, 0.10, 0.14)
    patch_grid_images: int = 6
    # the search screens every candidate on this many of those images (the ones whose outputs lie furthest apart)
    # and scores only the ``patch_grid_keep`` best on all of them; 0 scores every candidate on every image.
    # Measured on four BadNets models (benchmarks/patch_screen.py, docs/scan.md "The square search"): the same
    # square won, ranked at most 6th by the 2-image screen, in 2.8-3.0x less time
    patch_grid_screen: int = 2
    patch_grid_keep: int = 256
    seed: int = 0
    # the layout of the model and images while probes are fitted and the square search runs: "auto" (default:
    # channels-last on the CPU where the model runs in it with the same outputs, the default layout on CUDA;
    # drmguard.memory_format_for), "channels_last" or "contiguous" (the default until 2026-11-27, session 16; the
    # square search then picks its layout by a timing, _faster_layout). Only the summation order changes
    # (tests/engine/test_scan_terms.py). Measured on an H200 at 224 px, full-width ResNet18 (docs/gpu.md): no gain
    # for the probes on CUDA (whole default scans 21.3-23.2 s contiguous, 22.2-23.5 s channels-last), unlike the
    # reverse engineering (1.7x). On this 2-core CPU, full-width ResNet18 at 64 px: docs/scan.md "Speed"
    memory_format: str = "auto"
    # the arithmetic of the probes' fitting passes and of the square search: "float32" (default) or "bfloat16"
    # (autocast, CUDA only; a CPU scan stays float32). The loss, the ratios and every score are computed in float32
    # from the outputs either way. Measured side by side on an H200 (docs/gpu.md, "The run of 2026-11-27"): the same
    # verdicts on 5 models, scores within 2% on the backdoored ones, and no gain in time (the fit steps are bound by
    # kernel launches, not arithmetic), so float32 stays the default
    precision: str = "float32"

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"probe families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if self.steps <= 0 or self.batch_size <= 1:
            raise ConfigError("probe steps must be positive and batch_size at least 2")
        if self.steps_reference_side < 0:
            raise ConfigError(f"steps_reference_side must be >= 0 (0: the same steps at every size), got "
                              f"{self.steps_reference_side}")
        if not 0 < self.blend_alpha < 1 or not 0 < self.patch_area < 1:
            raise ConfigError("blend_alpha and patch_area must be in (0, 1)")
        if not 0 <= self.exclude_fraction < 1:
            raise ConfigError(f"exclude_fraction must be in [0, 1), got {self.exclude_fraction}")
        if self.rigidity_controls < 2 or self.rigidity_controls % 2 or self.rigidity_steps <= 0:
            raise ConfigError("rigidity_controls must be an even number >= 2 and rigidity_steps positive")
        if self.rigidity_statistic not in RIGIDITY_STATISTICS:
            raise ConfigError(f"rigidity_statistic must be one of {RIGIDITY_STATISTICS}, got "
                              f"{self.rigidity_statistic!r}")
        if not self.patch_grid_sides or not all(0 < f < 1 for f in self.patch_grid_sides) \
                or self.patch_grid_images < 2:
            raise ConfigError("patch_grid_sides must be fractions in (0, 1) and patch_grid_images at least 2")
        if all(f * f > self.patch_area for f in self.patch_grid_sides):
            raise ConfigError(f"no patch_grid_sides fit the patch area budget {self.patch_area}: a side fraction f "
                              f"needs f * f <= {self.patch_area}")
        if self.patch_grid_screen < 0 or self.patch_grid_screen == 1 or self.patch_grid_keep < 1:
            raise ConfigError("patch_grid_screen must be 0 (no screen) or at least 2, and patch_grid_keep at least 1")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ConfigError(f"memory_format must be 'auto', 'channels_last' or 'contiguous', got "
                              f"{self.memory_format!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def steps_for(self, height: int, width: int) -> int:
        """The fit steps of each probe for an image of this size: ``steps`` up to ``steps_reference_side``, then in
        proportion to the longer side (150 steps at 64 px, 525 at 224 px)."""
        if self.steps_reference_side <= 0:
            return self.steps
        return max(self.steps, round(self.steps * max(height, width) / self.steps_reference_side))

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
    # exactly the k most salient pixels (ties broken by position), and never a pixel the outputs do not depend on:
    # a threshold test (sal >= k-th value) excluded the whole image when most pixels tie, e.g. at zero saliency
    top = sal.flatten().topk(k)
    flat = torch.zeros(sal.numel(), device=images.device)
    flat[top.indices[top.values > 0]] = 1.0
    mask = flat.view(1, 1, *sal.shape)
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


def _split(images: torch.Tensor, cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit and held-out halves of D_be (the same split for the probes and their rigidity checks)."""
    n = images.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen).to(images.device)
    fit, held = images[perm[: n // 2]], images[perm[n // 2 :]]
    if fit.shape[0] < 2 or held.shape[0] < 2:
        raise ConfigError(f"the probes need at least 4 benign images, got {n}")
    return fit, held


def _prepare(model: nn.Module, images: torch.Tensor, cfg: ProbeConfig) -> tuple[torch.Tensor, ...]:
    """Freezes the model and returns the split (fit, held) with the benign output variances on each half."""
    fit, held = _split(images, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    out_fit, out_held = outputs(model, fit), outputs(model, held)
    var_fit = out_fit.var(0, unbiased=False).clamp_min(1e-12)
    var_held = out_held.var(0, unbiased=False).clamp_min(1e-12)
    return fit, held, out_fit, out_held, var_fit, var_held


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast for the probes' passes on CUDA when ``precision`` asks for it; a no-op otherwise."""
    if precision == "bfloat16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs on ``x``, in batches of 256, without gradients."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + 256]) for i in range(0, x.shape[0], 256)])


def _fit(
    model: nn.Module,
    family: str,
    fit: torch.Tensor,
    var_fit: torch.Tensor,
    cfg: ProbeConfig,
    exclude: torch.Tensor | None,
    target: torch.Tensor | None,
    steps: int,
    seed: int,
    cancel: Any,
    tick: Callable[[int, float], None] | None = None,
    init: nn.Module | None = None,
) -> _Probe:
    """Fits one universal transformation of ``family`` on ``fit``: it minimises the output variance (relative to
    ``var_fit``), or, with a ``target``, the mean squared distance of the outputs to it (in benign stds). ``init``
    (a fitted probe of the family) is the starting point instead of the identity; it is not modified."""
    if init is not None:
        probe = copy.deepcopy(init).train()
        for prm in probe.parameters():
            prm.requires_grad_(True)
    else:
        probe = _Probe(family, tuple(fit.shape[1:]), cfg, exclude if family in cfg.exclude_families else None)
    probe = probe.to(fit.device)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
    # each fit draws its batches from its own stream, so a family's result does not depend on which families ran
    # before it (results can be cached and compared per family)
    fgen = torch.Generator().manual_seed(seed)
    bs = min(cfg.batch_size, fit.shape[0])
    anneal = max(1, int(steps * cfg.patch_anneal))
    for step in range(steps):
        if cancel is not None and cancel.is_set():
            raise CancelledError("scan cancelled")
        if family == "patch" and init is None:  # a warm start keeps the final area budget
            frac = min(1.0, step / anneal)
            probe.area_budget = cfg.patch_area * (cfg.patch_start_area / cfg.patch_area) ** (1.0 - frac)
        idx = torch.randperm(fit.shape[0], generator=fgen)[:bs].to(fit.device)
        with _autocast(fit.device, cfg.precision):
            out = model(probe(fit[idx])).float()
        if target is None:
            loss = (out.var(0, unbiased=False) / var_fit).mean()
        else:
            loss = ((out - target).pow(2) / var_fit).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tick is not None:
            tick(step, float(loss.detach()))
    probe.area_budget = cfg.patch_area
    return probe


_F = TypeVar("_F", bound=Callable[..., Any])


def _in_layout(fn: _F) -> _F:
    """Runs ``fn(model, images, cfg, ...)`` with the model and the images in ``cfg.memory_format`` (channels-last on
    CUDA by default: cuDNN's NHWC convolutions), and gives the caller its model back in the default layout."""

    @functools.wraps(fn)
    def run(model: nn.Module, images: torch.Tensor, cfg: ProbeConfig, *args: Any, **kwargs: Any) -> Any:
        layout = memory_format_for(images.device, cfg.memory_format, model, images, auto_cuda=False)
        if layout is torch.contiguous_format:
            return fn(model, images, cfg, *args, **kwargs)
        model.to(memory_format=layout)
        try:
            return fn(model, images.contiguous(memory_format=layout), cfg, *args, **kwargs)
        finally:  # ONNX export, mitigation and the next scan expect the default layout
            model.to(memory_format=torch.contiguous_format)

    return run  # type: ignore[return-value]


@dataclass
class ProbeSetup:
    """What every family's fit shares: the split of D_be, the model's outputs and their variances on each half, the
    saliency exclusion and the largest held-out L1 norm (:func:`probe_setup`)."""

    fit: torch.Tensor
    held: torch.Tensor
    out_fit: torch.Tensor
    out_held: torch.Tensor
    var_fit: torch.Tensor
    var_held: torch.Tensor
    exclude: torch.Tensor | None
    max_l1: torch.Tensor


@_in_layout
def probe_setup(model: nn.Module, images: torch.Tensor, cfg: ProbeConfig) -> ProbeSetup:
    """The shared part of :func:`run_probes`, computed once where the families are fitted one call each (a scan's
    pieces side by side): the same tensors, in ``cfg.memory_format``, as :func:`run_probes` computes itself."""
    fit, held, out_fit, out_held, var_fit, var_held = _prepare(model, images, cfg)
    exclude = None
    if any(f in cfg.exclude_families for f in cfg.families) and cfg.exclude_fraction > 0:
        exclude = saliency_exclusion(model, fit[: cfg.saliency_images], cfg.exclude_fraction, cfg.exclude_dilate)
    max_l1 = held.abs().flatten(1).sum(1).max().clamp_min(1e-12)
    return ProbeSetup(fit, held, out_fit, out_held, var_fit, var_held, exclude, max_l1)


@_in_layout
def run_probes(
    model: nn.Module,
    images: torch.Tensor,
    cfg: ProbeConfig,
    *,
    progress: Callable[[str, int, int, dict[str, float], float | None], None] | None = None,
    cancel: Any = None,
    setup: ProbeSetup | None = None,
) -> list[ProbeResult]:
    """Fits each probe family on one half of ``images`` and scores it on the other half. ``setup``: the shared
    part, from :func:`probe_setup` with a config of the same families (or more), in place of computing it here."""
    if setup is None:
        setup = probe_setup.__wrapped__(model, images, cfg)  # type: ignore[attr-defined]  # already in layout
    else:
        for p in model.parameters():  # as _prepare leaves the model: frozen, in eval mode
            p.requires_grad_(False)
        model.eval()
    fit, held, out_fit, out_held = setup.fit, setup.held, setup.out_fit, setup.out_held
    var_fit, var_held, exclude, max_l1 = setup.var_fit, setup.var_held, setup.exclude, setup.max_l1
    results = []
    steps = cfg.steps_for(*images.shape[-2:])
    total = steps * len(cfg.families)
    done = 0
    for family in cfg.families:
        t0 = time.perf_counter()

        def tick(step: int, loss: float, family: str = family) -> None:
            nonlocal done
            done += 1
            if progress is not None and (step % 25 == 0 or step == steps - 1):
                progress("probe", done, total, {f"probe_{family}": loss}, None)

        probe = _fit(model, family, fit, var_fit, cfg, exclude, None, steps,
                     cfg.seed * 1009 + FAMILIES.index(family) + 1, cancel, tick)
        fit_ratio = _fit_ratio(model, probe, fit, var_fit)
        square = _square_seed(model, fit, var_fit, cfg, probe.exclude, cancel, out_fit) \
            if family == "patch" and cfg.patch_grid else None
        if square is not None:  # (None: images too small for any square within the area budget)
            seeded = _fit(model, family, fit, var_fit, cfg, exclude, None, max(1, steps // 3),
                          cfg.seed * 1009 + 97, cancel, None, init=square)
            seeded_ratio = _fit_ratio(model, seeded, fit, var_fit)
            if seeded_ratio < fit_ratio:
                probe, fit_ratio = seeded, seeded_ratio
        with torch.no_grad():
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


def _fit_ratio(model: nn.Module, probe: nn.Module, fit: torch.Tensor, var_fit: torch.Tensor) -> float:
    """The probe's variance ratio on the half it was fitted on."""
    with torch.no_grad():
        out = torch.cat([model(probe(fit[i : i + 256])) for i in range(0, fit.shape[0], 256)])
        return float((out.var(0, unbiased=False) / var_fit).mean())


def square_candidates(shape: Sequence[int], cfg: ProbeConfig) -> tuple[list[tuple[int, int, int, int]], torch.Tensor]:
    """The square search's candidates ``(side, row, col, colour index)`` for images of ``shape`` (c, h, w), and
    the colours: the 8 corner colours of the RGB cube (black and white for greyscale)."""
    c, h, w = shape
    colours = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    colours = colours if c == 3 else colours.mean(1, keepdim=True).unique(dim=0)
    cands = []
    # on small images two fractions can round to the same side: each side is tried once
    for side in sorted({max(2, round(min(h, w) * frac)) for frac in cfg.patch_grid_sides}):
        if side * side > cfg.patch_area * h * w:
            continue  # larger than the probe's area budget
        rows = sorted({*range(0, h - side + 1, max(1, side // 2)), h - side})
        cols = sorted({*range(0, w - side + 1, max(1, side // 2)), w - side})
        cands += [(side, i, j, k) for i in rows for j in cols for k in range(colours.shape[0])]
    return cands, colours  # none on images too small for a 2 px square within the area budget


def square_outputs(model: nn.Module, images: torch.Tensor, cands: Sequence[tuple[int, int, int, int]],
                   colours: torch.Tensor, keep: torch.Tensor, cancel: Any,
                   layout: torch.memory_format = torch.contiguous_format,
                   precision: str = "float32") -> torch.Tensor:
    """The model's outputs, (candidates, images, outputs), on ``images`` with each candidate square pasted in
    (outside the saliency exclusion: ``keep`` is 1 where a probe may write); the batches are built in ``layout``,
    which should be the model's (:func:`_faster_layout`)."""
    n_img, (c, h, w) = images.shape[0], images.shape[1:]
    colours = colours.to(images.device, images.dtype)
    per = max(1, 384 // n_img)  # about 384 images per forward pass, whatever the number of images
    outs = []
    with torch.no_grad(), _autocast(images.device, precision):
        for start in range(0, len(cands), per):
            if cancel is not None and cancel.is_set():
                raise CancelledError("scan cancelled")
            chunk = cands[start : start + per]
            masks = torch.zeros(len(chunk), 1, 1, h, w, device=images.device, dtype=images.dtype)
            for n, (side, i, j, _) in enumerate(chunk):
                masks[n, ..., i : i + side, j : j + side] = 1
            masks = masks * keep
            pats = colours[[k for *_, k in chunk]].view(len(chunk), 1, c, 1, 1)
            xs = (images[None] * (1 - masks) + masks * pats).flatten(0, 1).contiguous(memory_format=layout)
            outs.append(model(xs).reshape(len(chunk), n_img, -1).float())
    return torch.cat(outs)


def spread_images(outputs: torch.Tensor, var: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` images whose outputs lie furthest apart (in benign stds): the one furthest from the mean,
    then, greedily, the one furthest from those chosen. A square that does not touch what the model reads leaves
    their spread as it is; only a shortcut pulls them together, so they rank candidates best."""
    z = outputs.float() / var.float().sqrt()
    chosen = [int((z - z.mean(0)).norm(dim=1).argmax())]
    nearest = (z - z[chosen[0]]).norm(dim=1)
    while len(chosen) < min(k, z.shape[0]):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (z - z[chosen[-1]]).norm(dim=1))
    return torch.tensor(chosen)


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """The layout a batch of images is in (channels-last or the default)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _faster_layout(model: nn.Module, x: torch.Tensor) -> torch.memory_format:
    """The layout in which ``model`` runs inference on batches like ``x`` faster, for a contiguous model on the
    CPU: channels-last convolutions were 1.3-1.8x faster on a full-width ResNet18 at 64 px (2026-11-27) but are not
    on every network, so one batch is timed in each layout (after a warm-up) and the outputs compared; the model is
    left contiguous. Channels-last is kept only if it is faster and gives the same outputs (to float tolerance)."""
    if x.device.type != "cpu" or x.dim() != 4:
        return torch.contiguous_format
    seconds, outs = {}, {}
    try:
        for layout in (torch.contiguous_format, torch.channels_last):
            model.to(memory_format=layout)
            xl = x.contiguous(memory_format=layout)
            with torch.no_grad():
                model(xl)
                t0 = time.perf_counter()
                outs[layout] = model(xl).float()
                seconds[layout] = time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - any failure of the channels-last attempt: stay contiguous, as the probes ran
        return torch.contiguous_format
    finally:
        model.to(memory_format=torch.contiguous_format)
    same = outputs_agree(outs[torch.contiguous_format], outs[torch.channels_last])
    faster = seconds[torch.channels_last] < 0.9 * seconds[torch.contiguous_format]
    return torch.channels_last if (same and faster) else torch.contiguous_format


def _square_seed(model: nn.Module, fit: torch.Tensor, var_fit: torch.Tensor, cfg: ProbeConfig,
                 exclude: torch.Tensor, cancel: Any, out_fit: torch.Tensor | None = None) -> _Probe | None:
    """A patch probe set to the solid square (``ProbeConfig.patch_grid``) that collapses a few fit images
    most, or ``None`` when no square fits the area budget on images this small. With ``patch_grid_screen`` (k),
    every candidate is first scored on the k of those images whose outputs lie furthest apart, and only the
    ``patch_grid_keep`` best go on to all of them. ``out_fit``: the model's outputs on ``fit``, where the caller
    has them."""
    c, h, w = fit.shape[1:]
    sub = fit[: cfg.patch_grid_images]
    cands, colours = square_candidates((c, h, w), cfg)
    if not cands:
        return None
    keep = 1 - exclude
    # the search runs in the probes' layout (ProbeConfig.memory_format); with "contiguous", the form first shipped,
    # in whichever layout this network runs inference faster on the CPU, by a timing
    layout = _layout_of(fit)
    timed = cfg.memory_format == "contiguous"
    if timed:
        layout = _faster_layout(model, sub[torch.arange(96) % sub.shape[0]])
        model.to(memory_format=layout)
    try:
        if 2 <= cfg.patch_grid_screen < sub.shape[0] and cfg.patch_grid_keep < len(cands):
            out_sub = outputs(model, sub) if out_fit is None else out_fit[: sub.shape[0]]
            idx = spread_images(out_sub, var_fit, cfg.patch_grid_screen).to(sub.device)
            y = square_outputs(model, sub[idx], cands, colours, keep, cancel, layout, cfg.precision)
            top = (y.var(1, unbiased=False) / var_fit).mean(1).argsort()[: cfg.patch_grid_keep]
            cands = [cands[n] for n in top.tolist()]
        y = square_outputs(model, sub, cands, colours, keep, cancel, layout, cfg.precision)
    finally:
        if timed and layout is not torch.contiguous_format:
            model.to(memory_format=torch.contiguous_format)
    side, i, j, k = cands[int((y.var(1, unbiased=False) / var_fit).mean(1).argmin())]
    seed = _Probe("patch", (c, h, w), cfg, exclude).to(fit.device)
    with torch.no_grad():
        seed.mask.fill_(-8.0)
        seed.mask[..., i : i + side, j : j + side] = 8.0
        # sigmoid(pattern) is the colour: logits of +-8 for 0 and 1, the exact logit for greys in between
        seed.pattern.copy_(torch.logit(colours[k].clamp(3.4e-4, 1 - 3.4e-4)).view(1, c, 1, 1)
                           .expand_as(seed.pattern))
    seed.square = (side, i, j, [float(v) for v in colours[k].tolist()])
    return seed


def control_points(center: torch.Tensor, std: torch.Tensor, cfg: ProbeConfig) -> torch.Tensor:
    """(rigidity_controls, k) points at ``center`` +- ``rigidity_distance`` benign stds along
    ``rigidity_controls / 2`` directions: the output axes when k equals that number; evenly spaced angles for
    two outputs (gaze) and more directions (8 controls: every 45 degrees); seeded random unit directions
    otherwise (orthonormal when there are no more of them than outputs)."""
    k, m = center.shape[0], cfg.rigidity_controls // 2
    if k == m:
        dirs = torch.eye(k)
    elif k == 2:
        angle = torch.arange(m, dtype=torch.float64) * (torch.pi / m)
        dirs = torch.stack([angle.cos(), angle.sin()], 1).float()
    else:
        g = torch.Generator().manual_seed(cfg.seed + 7)
        dirs = torch.linalg.qr(torch.randn(max(k, m), max(k, m), generator=g))[0][:k, :m].T
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
    step = cfg.rigidity_distance * std * dirs.to(center.device, center.dtype)
    return torch.cat([center + step, center - step])


def rigidity_of(collapse_error: float, control_errors: Sequence[float], statistic: str = "median") -> float:
    """The control errors, reduced by ``statistic`` ("median" or "mean"), over the collapse point's error."""
    if statistic not in RIGIDITY_STATISTICS or not control_errors:
        raise ConfigError(f"rigidity needs control errors and a statistic in {RIGIDITY_STATISTICS}")
    c = [float(e) for e in control_errors]
    reduced = statistics.fmean(c) if statistic == "mean" else statistics.median(c)
    return reduced / max(float(collapse_error), 1e-9)


@_in_layout
def probe_rigidity(
    model: nn.Module,
    images: torch.Tensor,
    cfg: ProbeConfig,
    family: str,
    collapse_point: list[float],
    transform: nn.Module | None = None,
    *,
    progress: Callable[[str, int, int, dict[str, float], float | None], None] | None = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """Is a flagged probe's collapse point one fixed output, or can the same budget move it anywhere nearby?

    A backdoor is a shortcut to *one* output vector: a universal transformation can send the outputs there, and
    nowhere else. Some clean models (measured: LayerNorm/attention families) have a universal direction that
    collapses their outputs too, but the same budgeted family then steers the collapse to neighbouring outputs just
    as cheaply (``docs/scan.md``). With the same family, budget and data split as the probe, and starting from the
    probe's own fitted ``transform`` (from scratch without one), one transformation is fitted for ``rigidity_steps``
    *towards* the collapse point and one towards each control point around it
    (:func:`control_points`, ``rigidity_distance`` benign stds away); each is scored on the held-out half as the RMS
    distance e of the outputs to its target, in benign stds. ``rigidity`` = the median control
    error (the mean with ``cfg.rigidity_statistic="mean"``; both are in the result) / the collapse-point
    error: about 1 when the neighbouring outputs are as easy to reach, well above 1 when the outputs go to
    one fixed point and nowhere near it (measured: clean ConvNeXt and ViT 1.24-1.57, backdoored models 1.76
    and up; ``docs/scan.md``). The null comes from the model's own alternatives, as in MM-BD (Wang et al.
    2024; ``../shared/notes/detection-signals.md`` section 2).
    """
    t0 = time.perf_counter()
    fit, held, out_fit, _, var_fit, var_held = _prepare(model, images, cfg)
    std_held = var_held.sqrt()
    exclude = None
    if transform is None and family in cfg.exclude_families and cfg.exclude_fraction > 0:
        exclude = saliency_exclusion(model, fit[: cfg.saliency_images], cfg.exclude_fraction, cfg.exclude_dilate)
    hat = torch.tensor(collapse_point, dtype=out_fit.dtype, device=out_fit.device)
    targets = torch.cat([hat[None], control_points(hat, var_fit.sqrt(), cfg)])
    errors = []
    for i, target in enumerate(targets):
        probe = _fit(model, family, fit, var_fit, cfg, exclude, target, cfg.rigidity_steps,
                     cfg.seed * 1009 + FAMILIES.index(family) + 1 + 7919 * (i + 1), cancel, init=transform)
        with torch.no_grad():
            out = outputs(model, torch.cat([probe(held[j : j + 256]) for j in range(0, held.shape[0], 256)]))
        errors.append(float(((out - target) / std_held).pow(2).mean().sqrt()))
        if progress is not None:
            progress("rigidity", i + 1, len(targets), {f"rigidity_{family}": errors[-1]}, None)
    # the controls' error over the collapse point's: the offsets are small (half a std), so a model that
    # can be steered there pays almost nothing (ratio ~1); a fixed target leaves the offsets as error
    return {
        "family": family,
        "rigidity": rigidity_of(errors[0], errors[1:], cfg.rigidity_statistic),
        "rigidity_mean": rigidity_of(errors[0], errors[1:], "mean"),
        "statistic": cfg.rigidity_statistic,
        "collapse_error": errors[0],
        "control_errors": errors[1:],
        "controls": [[float(v) for v in t] for t in targets[1:].tolist()],
        "distance": cfg.rigidity_distance,
        "seconds": time.perf_counter() - t0,
    }
