"""Unit tests of DRMGuard's pieces against hand computations (equation 5, equation 7, the epsilon rule)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from drmguard_engine.data.benign import BenignSet
from drmguard_engine.defenses.drmguard import (
    DRMGuardConfig,
    attention_maps,
    equation5,
    memory_format_for,
    perturbation_ratio,
    reverse_engineer,
)
from drmguard_engine.defenses.generator import PaperGenerator, ResidualGenerator
from drmguard_engine.defenses.probes import ProbeConfig, _Probe
from drmguard_engine.errors import ConfigError, UnsupportedModelError
from drmguard_engine.scan import get_profile, list_profiles, scan


def _angles_deg_free(feats: np.ndarray, w: np.ndarray) -> np.ndarray:
    out = np.zeros((feats.shape[0], w.shape[0]))
    for i, h in enumerate(feats):
        for j, wj in enumerate(w):
            c = float(h @ wj / (np.linalg.norm(h) * np.linalg.norm(wj) + 1e-8))
            out[i, j] = math.acos(max(-1 + 1e-6, min(1 - 1e-6, c)))
    return out


def test_equation5_terms_match_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 2, generator=g, dtype=torch.float64) * 10
    feats = torch.rand(6, 5, generator=g, dtype=torch.float64)
    feats_b = torch.rand(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    x = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64)
    xp = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64)
    cfg = DRMGuardConfig(lambda1=20.0, lambda2=800.0, output_scale=math.pi / 180)
    t = equation5(out, feats, xp, x, feats_b, w, cfg)

    o = out.numpy()
    var = np.mean([np.mean((o[:, j] - o[:, j].mean()) ** 2) for j in range(2)]) * (math.pi / 180) ** 2
    l1 = np.mean(np.abs(xp.numpy() - x.numpy()))
    ap, ab = _angles_deg_free(feats.numpy(), w.numpy()), _angles_deg_free(feats_b.numpy(), w.numpy())
    rf = np.mean([ap[:, j].var() / (ab[:, j].var() + 1e-8) for j in range(2)])
    assert float(t["variance"]) == pytest.approx(var, rel=1e-9)
    assert float(t["l1"]) == pytest.approx(l1, rel=1e-9)
    assert float(t["rf"]) == pytest.approx(rf, rel=1e-6)
    assert float(t["loss"]) == pytest.approx(20 * var + l1 + 800 * rf, rel=1e-6)


def test_equation5_relative_variance_and_no_fsrt() -> None:
    out = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    bvar = torch.tensor([2.0, 4.0])
    cfg = DRMGuardConfig(variance_term="relative", use_fsrt=False, lambda1=1.0)
    x = torch.zeros(3, 1, 2, 2)
    t = equation5(out, torch.ones(3, 2), x, x, torch.ones(3, 2), torch.ones(2, 2), cfg, bvar)
    var = np.var([0.0, 2.0, 4.0])  # same for both outputs
    assert float(t["variance"]) == pytest.approx((var / 2 + var / 4) / 2)
    assert float(t["rf"]) == 0.0
    assert float(t["loss"]) == pytest.approx(float(t["variance"]))


def test_perturbation_ratio_is_mean_l1_over_max_l1() -> None:
    x = torch.zeros(3, 1, 2, 2)
    x[0] = 1.0  # max ||x||_1 = 4
    xp = x.clone()
    xp[1, 0, 0, 0] = 0.5  # ||x'-x||_1 = 0.5 on one image -> mean 0.5/3
    assert perturbation_ratio(xp, x) == pytest.approx((0.5 / 3) / 4)


class _Linear(nn.Module):
    """f(x) = H(F(x)) with F = sum of pixel (0,0) and 2x pixel (1,1) per channel; gradients known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -3.0]]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack((x[:, :, 0, 0].sum(1), 2 * x[:, :, 1, 1].sum(1)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_attention_map_paper_and_per_output_readings() -> None:
    m = _Linear()
    x = torch.rand(2, 3, 3, 3)
    # paper reading: grad of sum_j f_j: pixel (0,0): 1 per channel -> 3; pixel (1,1): 2*(-3) per channel -> |-6|*3
    t = attention_maps(m, x, DRMGuardConfig(attention="paper", attention_kappa=2.0))
    assert t.shape == (2, 1, 3, 3)
    assert float(t[0, 0, 1, 1]) == pytest.approx(18 / (2 * 18))
    assert float(t[0, 0, 0, 0]) == pytest.approx(3 / (2 * 18))
    assert float(t[0, 0, 2, 2]) == 0.0
    assert float(t.max()) < 1.0
    # per output: sum_j |df_j/dx|: same here (one output per pixel), with dilation spreading the max
    td = attention_maps(m, x, DRMGuardConfig(attention="per_output", attention_dilate=3, attention_kappa=2.0))
    assert float(td[0, 0, 2, 2]) == pytest.approx(0.5)


def test_generators_shapes_and_identity_start() -> None:
    x = torch.rand(2, 3, 20, 28)
    y = ResidualGenerator(3)(x)
    assert y.shape == x.shape
    assert float((y - x.clamp(1e-3, 1 - 1e-3)).abs().max()) < 1e-5  # identity before any step
    y2 = PaperGenerator(3)(x)  # sizes not divisible by 8 are padded and cropped back
    assert y2.shape == x.shape and float(y2.min()) > 0 and float(y2.max()) < 1


def test_patch_probe_respects_area_budget() -> None:
    cfg = ProbeConfig(patch_area=0.02)
    p = _Probe("patch", (3, 16, 16), cfg, None)
    with torch.no_grad():
        p.mask.fill_(5.0)  # would cover everything without the budget
    assert float(p.patch_mask().mean()) == pytest.approx(0.02, rel=1e-5)


def test_smooth_probe_is_bounded_low_frequency_and_spares_the_excluded_region() -> None:
    cfg = ProbeConfig(smooth_linf=0.1, smooth_grid=4)
    exclude = torch.zeros(1, 1, 16, 16)
    exclude[..., 4:8, 4:8] = 1.0
    p = _Probe("smooth", (3, 16, 16), cfg, exclude)
    assert tuple(p.delta.shape) == (1, 3, 4, 4)  # the signal lives on the coarse grid
    with torch.no_grad():
        p.delta.normal_(0, 10.0)
    x = torch.full((2, 3, 16, 16), 0.5)
    d = p(x) - x
    assert float(d.abs().max()) <= 0.1 + 1e-6 and float(d.abs().max()) > 0.05
    assert float(d[..., 4:8, 4:8].abs().max()) == 0.0  # salient pixels untouched
    # bilinear upsampling of a 4x4 grid: neighbouring pixels differ by at most one grid step / 5 pixels
    assert float((d[..., :, 1:] - d[..., :, :-1]).abs()[..., 8:, :].max()) <= 2 * 0.1 / 5 + 1e-6


def test_mitigation_follows_the_scan_profile_unless_configured() -> None:
    from dataclasses import replace

    from drmguard_engine.scan import MitigationConfig, mitigation_config

    r = scan(_Linear(), BenignSet(torch.rand(8, 3, 8, 8), None), "gaze", "fast")
    assert mitigation_config(None, r).targets == "teacher"  # ours: the model's own clean outputs
    assert mitigation_config(None, replace(r, profile="paper")).targets == "labels"  # the paper's annotations
    explicit = MitigationConfig(targets="teacher", steps=7)
    assert mitigation_config(explicit, replace(r, profile="paper")) is explicit
    with pytest.raises(ConfigError):
        MitigationConfig(targets="soft")
    with pytest.raises(ConfigError):
        MitigationConfig(probe_triggers="all")


def _scanned_linear() -> tuple[BenignSet, Any, list[Any]]:
    """A tiny linear model's fast scan, with every probe made to join D_rp (a huge threshold)."""
    g = torch.Generator().manual_seed(0)
    benign = BenignSet(torch.rand(16, 3, 8, 8, generator=g), torch.randn(16, 2, generator=g))
    r = scan(_Linear(), benign, "gaze", get_profile("fast", "gaze", steps=5, probe_steps=5))
    flagged = [p for p in r.probe_results if p.transform is not None]
    assert flagged
    return benign, r, flagged


def test_refreshed_probe_triggers_change_the_unlearning_but_not_the_report() -> None:
    from drmguard_engine.scan import MitigationConfig, mitigate

    benign, r, flagged = _scanned_linear()
    before = [{k: v.clone() for k, v in p.transform.state_dict().items()} for p in flagged]
    # every probe below the threshold joins D_rp; a huge threshold makes all of them join (whatever they found)
    r.config["probe_threshold"] = 1e9
    outs = {}
    for every in (0, 1):
        cfg = MitigationConfig(steps=4, refresh_every=every, refresh_steps=3, lr=1e-2, extra_seeds=0)
        m, rep = mitigate(_Linear(), benign, "gaze", report=r, config=cfg)
        outs[every] = m.head.weight.detach().clone()
        assert rep.steps == 4
    assert not torch.equal(outs[0], outs[1])  # the refreshed D_rp trained the model differently
    for p, sd in zip(flagged, before, strict=True):  # the report's own triggers are as scanned
        for k, v in p.transform.state_dict().items():
            assert torch.equal(v, sd[k]), k
    with pytest.raises(ConfigError):
        MitigationConfig(refresh_every=-1)


def test_neighbourhood_unlearning_moves_probe_copies_not_the_report() -> None:
    from drmguard_engine.scan import MitigationConfig, _neighbour, mitigate

    benign, r, flagged = _scanned_linear()
    x = benign.images[:4]
    # a probe that changes the images (at 8x8 the excluded task region can cover a whole additive probe)
    probe = next(p.transform for p in flagged if not torch.equal(p.transform(x).detach(), x))
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    near = _neighbour(probe, 1.0, torch.Generator().manual_seed(1))(x)
    assert near.shape == x.shape and not torch.equal(near, probe(x).detach())
    assert torch.equal(_neighbour(probe, 0.0, torch.Generator().manual_seed(1))(x), probe(x).detach())
    r.config["probe_threshold"] = 1e9
    outs = {}
    for sigma in (0.0, 1.0):
        cfg = MitigationConfig(steps=4, neighbourhood_sigma=sigma, lr=1e-2, extra_seeds=0)
        m, _ = mitigate(_Linear(), benign, "gaze", report=r, config=cfg)
        outs[sigma] = m.head.weight.detach().clone()
    assert not torch.equal(outs[0.0], outs[1.0])  # the neighbourhood inputs trained the model differently
    for k, v in probe.state_dict().items():  # the report's own trigger is as scanned
        assert torch.equal(v, before[k]), k
    with pytest.raises(ConfigError):
        MitigationConfig(neighbourhood_sigma=-1.0)
    with pytest.raises(ConfigError):
        MitigationConfig(neighbourhood_share=1.5)


def test_channels_last_layout_gives_the_same_reverse_engineering() -> None:
    """The CUDA layout (channels-last) changes only the summation order: the same ratio, target and history."""
    from drmguard_engine.models import build_model

    assert memory_format_for(torch.device("cuda"), "auto") is torch.channels_last
    assert memory_format_for(torch.device("cuda"), "auto", auto_cuda=False) is torch.contiguous_format  # probes
    assert memory_format_for(torch.device("cpu"), "auto") is torch.contiguous_format  # no model to check
    assert memory_format_for(torch.device("cpu"), "channels_last") is torch.channels_last
    with pytest.raises(ConfigError):
        DRMGuardConfig(memory_format="nhwc")  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_model("tiny", "gaze", input_size=16).eval()
    images = torch.rand(12, 3, 16, 16)
    cfg = DRMGuardConfig(generator="residual", pretrain_steps=0, steps=6, batch_size=6, lr=1e-2)
    a = reverse_engineer(model, images, cfg.replace(memory_format="contiguous"))
    b = reverse_engineer(model, images, cfg.replace(memory_format="channels_last"))
    assert b.perturbation_ratio == pytest.approx(a.perturbation_ratio, rel=1e-3)
    assert b.estimated_target == pytest.approx(a.estimated_target, rel=1e-3, abs=1e-3)
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-3)
    assert b.poisoned.is_contiguous()
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_contiguous()  # the caller gets its model back in the default layout


class _ViewNet(nn.Module):
    """Flattens a convolution's output with ``view``, as some imported graphs do: that fails in channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.view(y.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_auto_layout_on_the_cpu_is_channels_last_only_where_the_model_runs_in_it() -> None:
    from drmguard_engine.defenses.drmguard import channels_last_agrees
    from drmguard_engine.models import build_model

    torch.manual_seed(0)
    images = torch.rand(12, 3, 16, 16)
    conv_net, view_net = build_model("tiny", "gaze", input_size=16).eval(), _ViewNet().eval()
    cpu = torch.device("cpu")
    assert channels_last_agrees(conv_net, images)
    assert memory_format_for(cpu, "auto", conv_net, images) is torch.channels_last
    with pytest.raises(RuntimeError):  # the failure the check guards against
        view_net.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    view_net.to(memory_format=torch.contiguous_format)
    assert not channels_last_agrees(view_net, images)
    assert memory_format_for(cpu, "auto", view_net, images) is torch.contiguous_format
    assert memory_format_for(cpu, "auto", conv_net, images[:, 0, 0]) is torch.contiguous_format  # not images
    for m in (conv_net, view_net):  # the check leaves the model in the default layout
        assert all(p.is_contiguous() for p in m.parameters())
    # a scan of the model channels-last breaks runs in the default layout, with the default profile's settings
    cfg = DRMGuardConfig(generator="residual", pretrain_steps=0, steps=3, batch_size=6, lr=1e-2)
    assert reverse_engineer(view_net, images, cfg).poisoned.shape == images.shape
    from drmguard_engine.defenses.probes import run_probes

    res = run_probes(view_net, torch.rand(24, 3, 16, 16), ProbeConfig(families=("blend", "patch"), steps=4,
                                                                       batch_size=8, saliency_images=8,
                                                                       patch_grid=True, patch_grid_images=3))
    assert [r.family for r in res] == ["blend", "patch"] and all(0 <= r.variance_ratio for r in res)


def test_channels_last_layout_gives_the_same_probes_and_rigidity() -> None:
    """The probes in the CUDA layout: the same ratios, collapse points and rigidity, and the model given back in the
    default layout."""
    from drmguard_engine.defenses.probes import probe_rigidity, run_probes
    from drmguard_engine.models import build_model

    with pytest.raises(ConfigError):
        ProbeConfig(memory_format="nhwc")
    # "auto": channels-last on the CPU where the model runs in it; the default layout on CUDA (measured: no gain)
    assert get_profile("default", "gaze").probes.memory_format == "auto"
    assert get_profile("default", "gaze", probe_memory_format="contiguous").probes.memory_format == "contiguous"
    torch.manual_seed(0)
    model = build_model("tiny", "gaze", input_size=16).eval()
    images = torch.rand(24, 3, 16, 16)
    cfg = ProbeConfig(families=("blend", "patch", "warp", "smooth"), steps=8, batch_size=8, saliency_images=8,
                      rigidity_steps=4)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen: list[bool] = []  # the layout the convolution's weights were in when it ran
    hook = conv.register_forward_pre_hook(lambda m, _: seen.append(not m.weight.is_contiguous()))
    runs = {}
    for fmt in ("contiguous", "channels_last", "auto"):
        seen.clear()
        runs[fmt] = run_probes(model, images, cfg.replace(memory_format=fmt))
        cl = fmt != "contiguous"  # "auto" on the CPU: this network runs in channels-last
        # (the check before the probes runs the network once in each layout)
        assert seen and seen.count(False) <= (1 if cl else len(seen)) and any(seen) == cl, (fmt, seen[:4])
    hook.remove()
    for other in ("channels_last", "auto"):
        for a, b in zip(runs["contiguous"], runs[other], strict=True):
            assert a.family == b.family
            assert b.variance_ratio == pytest.approx(a.variance_ratio, rel=1e-3, abs=1e-6)
            assert b.collapse_point == pytest.approx(a.collapse_point, rel=1e-3, abs=1e-4)
    r = runs["contiguous"][0]
    rig = {fmt: probe_rigidity(model, images, cfg.replace(memory_format=fmt), r.family, r.collapse_point,
                               r.transform)["rigidity"] for fmt in ("contiguous", "channels_last")}
    assert rig["channels_last"] == pytest.approx(rig["contiguous"], rel=1e-3)
    assert all(p.is_contiguous() for p in model.parameters())  # the caller's layout, restored


def test_config_validation_and_profiles() -> None:
    with pytest.raises(ConfigError):
        DRMGuardConfig(epsilon=0.0)
    with pytest.raises(ConfigError):
        DRMGuardConfig(attention_kappa=1.0)
    with pytest.raises(ConfigError):
        get_profile("nope", "gaze")
    with pytest.raises(ConfigError):
        get_profile("paper", "gaze", no_such_option=1)
    assert set(list_profiles()) >= {"paper", "default", "fast"}
    paper_g, paper_h = get_profile("paper", "gaze"), get_profile("paper", "headpose")
    # the paper's hyperparameters (section 4.1, appendix A.10)
    assert (paper_g.drmguard.lambda1, paper_g.drmguard.lambda2, paper_g.drmguard.batch_size) == (20, 800, 50)
    assert (paper_h.drmguard.lambda1, paper_h.drmguard.lambda2, paper_h.drmguard.batch_size) == (10, 100, 100)
    assert paper_g.drmguard.steps == 2000 and paper_g.drmguard.pretrain_steps == 5000
    assert paper_g.drmguard.epsilon == 0.03 and paper_g.drmguard.lr == 1.5e-3 and paper_h.drmguard.lr == 1e-4
    assert paper_g.probes is None and paper_g.decision == "epsilon"
    abl = get_profile("paper", "gaze", use_fsrt=False, use_mtr=False, lambda2=600)
    assert not abl.drmguard.use_fsrt and not abl.drmguard.use_mtr and abl.drmguard.lambda2 == 600


def test_scan_refuses_models_without_a_linear_head() -> None:
    class NoHead(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3))[:, :2]

    b = BenignSet(torch.rand(8, 3, 8, 8), None)
    with pytest.raises(UnsupportedModelError):
        scan(NoHead(), b, "gaze", "fast")


def test_paper_rule_score_is_threshold_over_ratio() -> None:
    """With the paper profile, score = epsilon / ratio and the verdict is backdoored iff ratio < epsilon."""
    m = _Linear()
    b = BenignSet(torch.rand(8, 3, 8, 8), None)
    cfg = get_profile("paper", "gaze", steps=3, pretrain_steps=2, batch_size=4)
    r = scan(m, b, "gaze", cfg)
    assert r.score == pytest.approx(0.03 / r.perturbation_ratio, rel=1e-6)
    assert (r.verdict == "backdoored") == (r.perturbation_ratio < 0.03)
    assert r.steps == 5 and r.profile == "paper"
    d = r.to_dict()
    for key in ("verdict", "perturbation_ratio", "threshold", "score", "score_threshold", "decision",
                "estimated_target", "steps", "seconds"):
        assert key in d


def test_scan_without_config_uses_the_default_profile() -> None:
    r = scan(_Linear(), BenignSet(torch.rand(8, 3, 8, 8), None), "gaze")
    assert r.profile == "default" and r.config["decision"] == "combined"
    assert len(r.probes) == 4 and {p["family"] for p in r.probes} == {"blend", "patch", "warp", "smooth"}
