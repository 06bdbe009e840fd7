"""DRMGuard's reverse engineering of a trigger function (Du, Liu, Jia, Lan, arXiv 2411.04811, section 3.4).

A generator G_theta is optimised, with the model f = H o F frozen, on equation 5::

    L = lambda1 * (1/d) sum_j Var_i[f_j(x'_i)] + (1/N) sum_i ||x'_i - x_i||_1 + lambda2 * r_f
    r_f = (1/d) sum_j Var_i[angle(F(x'_i), w_j)] / Var_i[angle(F(x_i), w_j)]

with the momentum reverse trigger of equation 7 (appendix A.1)::

    x'_i = G(x_i) * (1 - T(x_i)) + x_i * T(x_i),  T(x_i)[a,b] = sum_c |df/dx_i[a,b,c]| rescaled into [0,1)

and identifies the model as backdoored iff mean_i ||x'_i - x_i||_1 < epsilon * max_{x in D_be} ||x||_1.

Readings of points the paper leaves open (docs/scan.md lists each with what we measured):

* "momentum" is never defined beyond A.1's per-image map: the map is computed once per benign image at the
  benign input and kept constant (stop-gradient), no moving average.
* df/dx of a vector output: the gradient of sum_j f_j (what TensorFlow's tape gives) in the ``paper`` reading;
  sum_j |df_j/dx| (``per_output``) in ours.
* The divisor "larger than the maximum": ``kappa * max`` with kappa slightly above 1.
* ||.||_1 in the loss: the per-element mean (a literal sum over 64*64*3 elements would swamp both lambda terms);
  the decision compares sums with sums, which is unit-consistent either way.
* lambda1 multiplies an output variance, so it depends on the output units: ``output_scale`` converts the
  model's outputs (degrees here) into the units lambda1 was set for (the paper's gaze models output radians,
  its head-pose models degrees). ``variance_term="relative"`` divides by the benign output variance instead,
  which makes lambda1 unit-free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CancelledError, ConfigError, InspectionError
from ..metrics import feature_angles
from .generator import build_generator

Progress = Callable[[str, int, int, dict[str, float], float | None], None]


@dataclass(frozen=True)
class DRMGuardConfig:
    """Every knob of the reverse engineering; the ``paper`` profile sets the paper's values."""

    generator: Literal["paper", "residual"] = "paper"
    generator_width: int = 16
    pretrain_steps: int = 5000
    pretrain_lr: float = 1e-3
    steps: int = 2000
    batch_size: int = 50
    lr: float = 1.5e-3
    lambda1: float = 20.0
    lambda2: float = 800.0
    l1_weight: float = 1.0  # weight of the L1 term of equation 5 (1 in the paper)
    output_scale: float = math.pi / 180.0
    variance_term: Literal["absolute", "relative"] = "absolute"
    use_fsrt: bool = True
    use_mtr: bool = True
    attention: Literal["paper", "per_output"] = "paper"
    attention_dilate: int = 1
    attention_power: float = 1.0
    attention_kappa: float = 1.01
    epsilon: float = 0.03
    seed: int = 0
    # tensor layout of G, f and the images: "auto" is channels-last on CUDA (cuDNN's fast NHWC kernels; the same
    # arithmetic, summed in another order) and on the CPU where the model runs in it with the same outputs
    # (memory_format_for; since 2026-11-27, session 16: before, the CPU stayed in the default layout)
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"

    def __post_init__(self) -> None:
        if self.generator not in ("paper", "residual"):
            raise ConfigError(f"generator must be 'paper' or 'residual', got {self.generator!r}")
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        for name in ("lr", "pretrain_lr", "output_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lambda1", "lambda2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.attention not in ("paper", "per_output"):
            raise ConfigError(f"attention must be 'paper' or 'per_output', got {self.attention!r}")
        if self.attention_dilate < 1 or self.attention_dilate % 2 == 0:
            raise ConfigError(f"attention_dilate must be an odd size >= 1, got {self.attention_dilate}")
        if not self.attention_kappa > 1:
            raise ConfigError(f"attention_kappa must be > 1 (the map must stay below 1), got {self.attention_kappa}")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ConfigError(
                f"memory_format must be 'auto', 'channels_last' or 'contiguous', got {self.memory_format!r}"
            )
        if self.variance_term not in ("absolute", "relative"):
            raise ConfigError(f"variance_term must be 'absolute' or 'relative', got {self.variance_term!r}")

    def replace(self, **changes: Any) -> DRMGuardConfig:
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise ConfigError(f"unknown DRMGuard option(s) {bad}; known: {sorted(known)}")
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


@dataclass
class ReverseResult:
    """What one reverse-engineering run produced, on the whole of D_be."""

    generator: nn.Module
    poisoned: torch.Tensor  # x' for every benign image (MTR-blended when use_mtr)
    perturbation_ratio: float  # mean ||x'-x||_1 / max ||x||_1
    estimated_target: list[float]
    output_variance_ratio: float  # mean_j Var f_j(x') / Var f_j(x)
    rav: float
    rnv: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _forward_split(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.features(x)  # type: ignore[operator]
    return feats, model.head(feats)  # type: ignore[operator]


def attention_maps(model: nn.Module, images: torch.Tensor, cfg: DRMGuardConfig, batch: int = 64) -> torch.Tensor:
    """The MTR attention map T(x) in [0,1) for each benign image, shape (N,1,H,W), treated as a constant."""
    out = []
    for i in range(0, images.shape[0], batch):
        with torch.enable_grad():  # callers may hold no_grad (mitigation evaluates under it)
            t = _attention_batch(model, images[i : i + batch], cfg)
        out.append(t.detach())
    return torch.cat(out)


def _attention_batch(model: nn.Module, images: torch.Tensor, cfg: DRMGuardConfig) -> torch.Tensor:
    x = images.clone().requires_grad_(True)
    y = model(x)
    if cfg.attention == "paper":
        (g,) = torch.autograd.grad(y.sum(), x)
        t = g.abs().sum(1, keepdim=True)
    else:
        t = torch.zeros_like(x[:, :1])
        for j in range(y.shape[1]):
            (g,) = torch.autograd.grad(y[:, j].sum(), x, retain_graph=j < y.shape[1] - 1)
            t = t + g.abs().sum(1, keepdim=True)
    if cfg.attention_dilate > 1:
        k = cfg.attention_dilate
        t = F.max_pool2d(t, k, stride=1, padding=k // 2)
    mx = t.flatten(1).max(1).values.view(-1, 1, 1, 1)
    t = t / (cfg.attention_kappa * mx + 1e-12)
    if cfg.attention_power != 1.0:
        t = t.clamp_min(0) ** cfg.attention_power
    return t


def equation5(
    out: torch.Tensor,
    feats: torch.Tensor,
    poisoned: torch.Tensor,
    images: torch.Tensor,
    benign_feats: torch.Tensor,
    head_weight: torch.Tensor,
    cfg: DRMGuardConfig,
    benign_out_var: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The terms of equation 5 for one minibatch (population variances, as TensorFlow's ``reduce_variance``).

    ``variance`` = (1/d) sum_j Var_i[f_j(x')] in ``output_scale`` units (or divided by the benign output variance
    with ``variance_term="relative"``); ``l1`` = mean |x'-x| per element; ``rf`` = (1/d) sum_j
    Var_i[angle(F(x'_i), w_j)] / (Var_i[angle(F(x_i), w_j)] + 1e-8); ``loss`` = lambda1*variance +
    l1_weight*l1 + lambda2*rf (l1_weight = 1 in the paper).
    """
    var = out.var(0, unbiased=False)
    if cfg.variance_term == "relative":
        if benign_out_var is None:
            raise ValueError("variance_term='relative' needs the benign output variance")
        var_term = (var / benign_out_var).mean()
    else:
        var_term = var.mean() * cfg.output_scale**2
    l1 = (poisoned - images).abs().mean()
    loss = cfg.lambda1 * var_term + cfg.l1_weight * l1
    rf = torch.zeros((), device=out.device)
    if cfg.use_fsrt:
        ang_p = feature_angles(feats, head_weight)
        ang_b = feature_angles(benign_feats, head_weight)
        rf = (ang_p.var(0, unbiased=False) / (ang_b.var(0, unbiased=False) + 1e-8)).mean()
        loss = loss + cfg.lambda2 * rf
    return {"loss": loss, "variance": var_term, "l1": l1, "rf": rf}


def _blend(g: torch.Tensor, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    return g if t is None else g * (1 - t) + x * t


def memory_format_for(device: torch.device, choice: str, model: nn.Module | None = None,
                      sample: torch.Tensor | None = None, *, auto_cuda: bool = True) -> torch.memory_format:
    """The layout a stage of a scan on ``device`` runs in. ``auto``: channels-last on CUDA (where ``auto_cuda``:
    cuDNN's NHWC kernels) and on the CPU where ``model`` runs in it and gives ``sample`` the same outputs
    (:func:`channels_last_agrees`; oneDNN's NHWC kernels: measured on a full-width ResNet18 at 64 px, 2 threads,
    2026-11-27, reverse engineering 75 -> 57 s and the blend probe 71 -> 58 s; forward and backward passes 0-30%
    faster on six other networks, slower on none). The choice depends on the model and the data only, never on a
    timing, so a scan's arithmetic is the same every time it runs."""
    if choice == "channels_last":
        return torch.channels_last
    if choice != "auto":
        return torch.contiguous_format
    if device.type == "cuda":
        return torch.channels_last if auto_cuda else torch.contiguous_format
    if device.type == "cpu" and model is not None and sample is not None and channels_last_agrees(model, sample):
        return torch.channels_last
    return torch.contiguous_format


def channels_last_agrees(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` (in the default layout) runs a few of the images ``x`` in channels-last without an error and
    gives the same outputs, to float tolerance. An imported network may reshape in a way channels-last breaks (a
    ``view`` of a convolution's output); such a model stays in the default layout. The model is left contiguous."""
    if x.dim() != 4:
        return False
    x = x[:8]
    try:
        with torch.no_grad():
            a = model(x.contiguous()).float()
            model.to(memory_format=torch.channels_last)
            b = model(x.contiguous(memory_format=torch.channels_last)).float()
    except Exception:  # noqa: BLE001 - any failure in channels-last: the model stays in the default layout
        return False
    finally:
        model.to(memory_format=torch.contiguous_format)
    return outputs_agree(a, b)


def outputs_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two runs of a model (in two layouts) gave the same outputs, to float tolerance."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max().clamp_min(1.0))))


def perturbation_ratio(poisoned: torch.Tensor, images: torch.Tensor) -> float:
    """mean_i ||x'_i - x_i||_1 / max_i ||x_i||_1 (the quantity the epsilon rule compares)."""
    num = (poisoned - images).abs().flatten(1).sum(1).mean()
    den = images.abs().flatten(1).sum(1).max()
    return float(num / den.clamp_min(1e-12))


def reverse_engineer(
    model: nn.Module,
    images: torch.Tensor,
    cfg: DRMGuardConfig,
    *,
    progress: Progress | None = None,
    cancel: Any = None,
    phase: str = "reverse",
) -> ReverseResult:
    """Optimises G on equation 5 (+ MTR) with ``model`` frozen; ``images`` is D_be in [0,1] on the scan device."""
    device = images.device
    layout = memory_format_for(device, cfg.memory_format, model, images)
    if layout is torch.contiguous_format:
        return _reverse_engineer(model, images, cfg, layout, progress=progress, cancel=cancel, phase=phase)
    model.to(memory_format=layout)
    try:
        return _reverse_engineer(model, images.contiguous(memory_format=layout), cfg, layout, progress=progress,
                                 cancel=cancel, phase=phase)
    finally:  # the caller gets its model back in the default layout (ONNX export and mitigation expect it)
        model.to(memory_format=torch.contiguous_format)


def _reverse_engineer(
    model: nn.Module,
    images: torch.Tensor,
    cfg: DRMGuardConfig,
    layout: torch.memory_format,
    *,
    progress: Progress | None,
    cancel: Any,
    phase: str,
) -> ReverseResult:
    device = images.device
    n = images.shape[0]
    if n < 2:
        raise InspectionError("the benign set needs at least 2 images for the variance terms")
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    w = model.head.weight.detach()  # type: ignore[union-attr]
    t0 = time.perf_counter()
    with torch.no_grad():
        feats_b, out_b = [], []
        for i in range(0, n, 256):
            fb, ob = _forward_split(model, images[i : i + 256])
            feats_b.append(fb)
            out_b.append(ob)
        feats_b_all, out_b_all = torch.cat(feats_b), torch.cat(out_b)
        out_var_b = out_b_all.var(0, unbiased=False).clamp_min(1e-12)
    tmaps = attention_maps(model, images, cfg) if cfg.use_mtr else None
    seconds = {"attention": time.perf_counter() - t0}

    g_net = build_generator(cfg.generator, images.shape[1], width=cfg.generator_width).to(device)
    g_net.to(memory_format=layout)
    bs = min(cfg.batch_size, n)

    def batch_idx() -> torch.Tensor:
        return torch.randperm(n, generator=gen)[:bs].to(device)

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError("scan cancelled")

    # Pre-training G to reproduce benign images (paper A.10: 5,000 steps; loss not given: L1 reconstruction).
    t1 = time.perf_counter()
    if cfg.pretrain_steps:
        opt = torch.optim.Adam(g_net.parameters(), lr=cfg.pretrain_lr)
        g_net.train()
        for step in range(cfg.pretrain_steps):
            check_cancel()
            x = images[batch_idx()].contiguous(memory_format=layout)
            loss = (g_net(x) - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None and (step % 25 == 0 or step == cfg.pretrain_steps - 1):
                progress("pretrain", step + 1, cfg.pretrain_steps, {"reconstruction_l1": float(loss.detach())}, None)
    seconds["pretrain"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    opt = torch.optim.Adam(g_net.parameters(), lr=cfg.lr)
    g_net.train()
    history: list[dict[str, float]] = []
    for step in range(cfg.steps):
        check_cancel()
        idx = batch_idx()
        x = images[idx].contiguous(memory_format=layout)
        t = None if tmaps is None else tmaps[idx].contiguous(memory_format=layout)
        xp = _blend(g_net(x), x, t)
        feats, out = _forward_split(model, xp)
        terms = equation5(out, feats, xp, x, feats_b_all[idx], w, cfg, out_var_b)
        loss, var_term, l1, rf = terms["loss"], terms["variance"], terms["l1"], terms["rf"]
        if not torch.isfinite(loss):
            raise InspectionError(f"the reverse-engineering loss became {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            with torch.no_grad():
                ratio_b = float((xp - x).abs().flatten(1).sum(1).mean() / x.abs().flatten(1).sum(1).max())
            rec = {
                "step": float(step + 1),
                "loss": float(loss.detach()),
                "variance": float(var_term.detach()),
                "l1": float(l1.detach()),
                "rf": float(rf.detach()),
                "perturbation_ratio": ratio_b,
            }
            rec.update({f"target_{j}": float(v) for j, v in enumerate(out.detach().mean(0).tolist())})
            history.append(rec)
            if progress is not None:
                progress(phase, step + 1, cfg.steps, {k: rec[k] for k in ("loss", "variance", "l1", "rf")}, ratio_b)
    seconds["reverse"] = time.perf_counter() - t2

    # Decision quantities on the whole of D_be (G in eval mode: BN running statistics).
    g_net.eval()
    with torch.no_grad():
        xs, fs, os_ = [], [], []
        for i in range(0, n, 256):
            x = images[i : i + 256]
            t = None if tmaps is None else tmaps[i : i + 256]
            xp = _blend(g_net(x), x, t)
            f_, o_ = _forward_split(model, xp)
            xs.append(xp)
            fs.append(f_)
            os_.append(o_)
        poisoned, feats_p, out_p = torch.cat(xs), torch.cat(fs), torch.cat(os_)
        ratio = perturbation_ratio(poisoned, images)
        ang_p, ang_b = feature_angles(feats_p, w), feature_angles(feats_b_all, w)
        rav_v = float((ang_p.var(0, unbiased=False) / (ang_b.var(0, unbiased=False) + 1e-12)).mean())
        nb = feats_b_all.norm(dim=1).var(unbiased=False)
        rnv_v = float(feats_p.norm(dim=1).var(unbiased=False) / (nb + 1e-12))
        ovr = float((out_p.var(0, unbiased=False) / out_var_b).mean())
    return ReverseResult(
        generator=g_net,
        poisoned=poisoned.contiguous(),
        perturbation_ratio=ratio,
        estimated_target=[float(v) for v in out_p.mean(0).tolist()],
        output_variance_ratio=ovr,
        rav=rav_v,
        rnv=rnv_v,
        history=history,
        seconds=seconds,
    )
