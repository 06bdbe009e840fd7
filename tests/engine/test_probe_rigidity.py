"""The rigidity check of a flagged probe, on two hand-built models with known answers (no training).

* ``_Switch``: a backdoor. A red 4x4 corner sends every output to one target vector; elsewhere the outputs follow
  the image centre (the task region). The patch probe finds the corner, and its collapse point is rigid: no
  universal patch sends the outputs to a point next to the target.
* ``_Steerable``: a clean model with a normalised head (the LayerNorm-before-the-head shape of ConvNeXt/ViT
  regressors). If the colours of the image's regions move far from grey, they dominate the normalised features
  and set the output direction. So a budgeted blend collapses the outputs (the old rule flagged this), but another colour sends
  them to a neighbouring output just as cheaply: the collapse point is not one fixed target.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drmguard_engine.defenses.probes import (
    ProbeConfig,
    control_points,
    probe_rigidity,
    rigidity_of,
    run_probes,
    saliency_exclusion,
)
from drmguard_engine.errors import ConfigError
from drmguard_engine.scan import RIGIDITY_THRESHOLD, decide, deciding_family, get_profile


def _content(x: torch.Tensor) -> torch.Tensor:
    """Gaze-like outputs (degrees) from the centre 12x12 pixels of channels 0 and 1 (the task region)."""
    h, w = x.shape[-2:]
    return (x[:, :2, h // 2 - 6 : h // 2 + 6, w // 2 - 6 : w // 2 + 6].mean((2, 3)) - 0.5) * 600


class _Switch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Identity(), nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()
        self.register_buffer("target", torch.tensor([-20.0, 25.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(12 * (x[:, 0, :4, :4].mean((1, 2)) - 0.75))[:, None]
        return self.head((1 - s) * _content(x) + s * self.target)


class _Steerable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features, self.head = nn.Identity(), nn.Linear(18, 2)
        self.register_buffer("w", torch.randn(16, 48, generator=g) / 48**0.5)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, 18, generator=g) * 10)
            self.head.weight[:, 16:] = torch.eye(2) * 20
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 16 context features from the colours of a 4x4 grid of regions, 2 from the task region, normalised
        context = (F.adaptive_avg_pool2d(x, 4).flatten(1) - 0.5) @ self.w.T * 40
        z = torch.cat([context, _content(x) / 30], 1)
        return self.head(z / z.norm(dim=1, keepdim=True).clamp_min(1e-6))


def _images() -> torch.Tensor:
    return torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_control_points_sit_around_the_collapse_point() -> None:
    cfg = ProbeConfig()
    hat, std = torch.tensor([1.0, -2.0]), torch.tensor([10.0, 20.0])
    pts = control_points(hat, std, cfg)
    assert pts.shape == (4, 2)
    assert torch.allclose(((pts - hat) / std).norm(dim=1), torch.full((4,), cfg.rigidity_distance))
    assert torch.allclose(pts.mean(0), hat)  # symmetric pairs
    pts3 = control_points(torch.zeros(3), torch.ones(3), cfg)  # head pose: seeded orthonormal directions
    assert pts3.shape == (4, 3)
    assert torch.allclose(pts3.norm(dim=1), torch.full((4,), cfg.rigidity_distance), atol=1e-6)
    assert abs(float(pts3[0] @ pts3[1])) < 1e-6
    pts8 = control_points(hat, std, cfg.replace(rigidity_controls=8))  # gaze, 8 controls: every 45 degrees
    unit = (pts8 - hat) / std / cfg.rigidity_distance
    angles = torch.rad2deg(torch.atan2(unit[:, 1], unit[:, 0])) % 360
    assert sorted(round(float(a)) for a in angles) == [0, 45, 90, 135, 180, 225, 270, 315]
    assert torch.allclose(pts8[[0, 2, 4, 6]], pts)  # the 4-control points are among them


def test_saliency_exclusion_never_excludes_pixels_the_outputs_ignore() -> None:
    # most pixels of _Switch have zero gradient; a threshold test on tied values excluded the whole image
    mask = saliency_exclusion(_Switch(), _images()[:50], 0.10, 1)
    assert mask.sum() == round(0.10 * 32 * 32)  # exactly the budgeted share, however many pixels tie
    assert mask[0, 0, 10:22, 10:22].sum() == mask.sum()  # all of it in the task region (the centre 12x12)
    flat = saliency_exclusion(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).requires_grad_(False),
                              _images()[:5], 0.10, 1)
    assert flat.sum() == round(0.10 * 32 * 32)


def test_a_backdoor_collapse_point_is_rigid_and_a_steerable_collapse_is_not() -> None:
    x = _images()
    cfg = ProbeConfig(steps=100)
    (patch,) = run_probes(_Switch(), x, cfg.replace(families=("patch",)))
    assert patch.variance_ratio < 0.05  # the patch probe finds the corner trigger
    before = {k: v.clone() for k, v in patch.transform.state_dict().items()}
    sw = probe_rigidity(_Switch(), x, cfg, "patch", patch.collapse_point, patch.transform)
    assert sw["rigidity"] >= 1.5 * RIGIDITY_THRESHOLD, sw
    assert len(sw["control_errors"]) == 4 and sw["collapse_error"] < min(sw["control_errors"])
    assert all(torch.equal(v, before[k]) for k, v in patch.transform.state_dict().items())  # a warm start copies

    (blend,) = run_probes(_Steerable(), x, cfg.replace(families=("blend",)))
    assert blend.variance_ratio < 0.1  # the clean model's outputs collapse under a budgeted blend...
    st = probe_rigidity(_Steerable(), x, cfg, "blend", blend.collapse_point, blend.transform)
    assert st["rigidity"] < RIGIDITY_THRESHOLD, st  # ...but its neighbours are as easy to reach
    for r in (sw, st):  # the decision reads the median; the mean rides along for comparison
        assert r["statistic"] == "median"
        assert r["rigidity"] == rigidity_of(r["collapse_error"], r["control_errors"], "median")
        assert r["rigidity_mean"] == rigidity_of(r["collapse_error"], r["control_errors"], "mean")
    mean = probe_rigidity(_Steerable(), x, cfg.replace(rigidity_statistic="mean"), "blend",
                          blend.collapse_point, blend.transform)
    assert mean["statistic"] == "mean" and mean["rigidity"] == mean["rigidity_mean"]


def test_rigidity_is_the_median_control_error_over_the_collapse_error() -> None:
    # a clean ConvNeXt whose collapse point sat at the edge of its outputs (docs/scan.md): the outward control
    # (+yaw) was 3.7x as hard as the collapse point, the other three 1.4-1.7x
    collapse, controls = 0.0829, [0.3046, 0.1198, 0.1366, 0.1237]
    mean = (0.3046 + 0.1198 + 0.1366 + 0.1237) / 4
    assert rigidity_of(collapse, controls, "mean") == pytest.approx(mean / 0.0829)
    assert rigidity_of(collapse, controls, "mean") > RIGIDITY_THRESHOLD  # the mean flagged it
    # the median of four: the mean of the middle two
    assert rigidity_of(collapse, controls) == pytest.approx((0.1237 + 0.1366) / 2 / 0.0829)
    assert rigidity_of(collapse, controls) < RIGIDITY_THRESHOLD
    # a target that is hard to leave in every direction (a backdoor) keeps its rigidity under the median
    assert rigidity_of(0.1, [0.25, 0.22, 0.24, 0.3]) == pytest.approx(2.45)
    # an exact collapse: huge, not a division error
    assert rigidity_of(0.0, [0.5, 0.5]) == pytest.approx(0.5 / 1e-9)
    assert rigidity_of(0.1, [0.3, 0.1, 0.2]) == pytest.approx(2.0)  # odd counts: the middle one
    for bad in ((0.1, [], "median"), (0.1, [0.2], "max")):
        with pytest.raises(ConfigError):
            rigidity_of(*bad)
    with pytest.raises(ConfigError, match="rigidity_statistic"):
        ProbeConfig(rigidity_statistic="max")


def test_decision_needs_a_rigid_collapse_point() -> None:
    cfg = get_profile("default", "gaze")
    probe = {"family": "blend", "variance_ratio": 0.02}
    steerable = {**probe, "rigidity": {"rigidity": 1.05}}
    rigid = {**probe, "rigidity": {"rigidity": 2.5}}
    s_old, _, _ = decide(get_profile("default", "gaze", rigidity_threshold=0), 1.0, 1.0, [steerable])
    assert s_old == 0.05 / 0.02  # the check off: the variance ratio alone decides
    s, thr, why = decide(cfg, 1.0, 1.0, [steerable])
    assert s == 1.05 / RIGIDITY_THRESHOLD < thr and "not one target" in why
    s, thr, why = decide(cfg, 1.0, 1.0, [rigid])
    assert s == min(0.05 / 0.02, 2.5 / RIGIDITY_THRESHOLD) >= thr and "rigidity 2.50" in why
    # another flagged family whose collapse is rigid still decides
    s, _, why = decide(cfg, 1.0, 1.0, [steerable, {"family": "patch", "variance_ratio": 0.04,
                                                  "rigidity": {"rigidity": 3.0}}])
    assert s == 0.05 / 0.04 and why.startswith("patch probe")
    assert deciding_family(why) == "patch"  # what the report's target, mitigation and policy read
    # the generator deciding (its term beats a probe that did not collapse anything)
    _, _, why = decide(cfg, 0.001, 0.01, [{"family": "warp", "variance_ratio": 0.9}])
    assert why.startswith("DRMGuard") and deciding_family(why) is None
    _, _, why = decide(get_profile("paper", "gaze"), 0.01, 1.0)
    assert deciding_family(why) is None
    assert deciding_family("smoothing probe x") is None and deciding_family("blend") is None


def test_larger_images_get_proportionally_more_probe_steps() -> None:
    cfg = ProbeConfig(steps=150)
    assert cfg.steps_for(64, 64) == 150 and cfg.steps_for(32, 32) == 150  # the calibrated budget, never fewer
    assert cfg.steps_for(224, 224) == 525 and cfg.steps_for(96, 128) == 300  # by the longer side
    assert cfg.replace(steps_reference_side=0).steps_for(224, 224) == 150
    with pytest.raises(ConfigError, match="steps_reference_side"):
        ProbeConfig(steps_reference_side=-1)
    # run_probes fits each family for the scaled budget: 3 steps at 16 px, 6 at 32 px
    x = _images()
    for side, want in ((16, 3), (32, 6)):
        ticks: list[tuple[int, int]] = []
        small = ProbeConfig(steps=3, steps_reference_side=16, families=("blend", "warp"))
        run_probes(_Switch(), F.interpolate(x[:20], size=side), small,
                   progress=lambda phase, done, total, losses, ratio: ticks.append((done, total)))
        assert ticks[-1] == (2 * want, 2 * want), (side, ticks)
