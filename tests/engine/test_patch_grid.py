"""The square-patch search of the patch probe (``ProbeConfig.patch_grid``, docs/scan.md), screened and not.

The model under test has a backdoor that reads a red 3 px square only at its exact place: one pixel off, or a
red pixel next to it, and the gate stays shut. Below the threshold its gate gives no gradient, so the annealed
soft mask of the patch probe cannot find it (as with torchvision's MobileNet V3-small BadNets model); the
square search must.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from drmguard_engine.defenses.probes import ProbeConfig, run_probes
from drmguard_engine.errors import ConfigError

SIDE, TOP, LEFT, SIZE = 3, 29, 29, 32
TARGET = torch.tensor([-10.0, 15.0])


class ExactSquareGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        ring = torch.zeros(1, SIZE, SIZE)
        ring[:, TOP - 1:TOP + SIDE + 1, LEFT - 1:LEFT + SIDE + 1] = 1
        ring[:, TOP:TOP + SIDE, LEFT:LEFT + SIDE] = 0
        self.register_buffer("ring", ring.bool())
        self.register_buffer("target", TARGET.clone())  # a buffer, so that the gate runs on any device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0] - x[:, 1:].amax(1)  # 1 for pure red, at most 0 for anything not red
        inside = red[:, TOP:TOP + SIDE, LEFT:LEFT + SIDE].flatten(1).amin(1)
        outside = red.masked_fill(~self.ring, -1.0).flatten(1).amax(1)
        gate = torch.sigmoid(200 * (inside - 0.9)) * torch.sigmoid(200 * (0.9 - outside))
        return (1 - gate[:, None]) * self.net(x) * 20 + gate[:, None] * self.target


def _images(n: int = 120) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.7 + 0.15


def test_the_gate_fires_only_at_the_exact_square():
    model, x = ExactSquareGate().eval(), _images(20)
    def with_square(top: int, left: int, side: int = SIDE) -> torch.Tensor:
        y = x.clone()
        y[:, :, top:top + side, left:left + side] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        return model(y)
    with torch.no_grad():
        assert torch.allclose(with_square(TOP, LEFT), TARGET.expand(20, 2), atol=1e-3)
        for top, left, side in ((TOP - 1, LEFT, SIDE), (TOP, LEFT - 1, SIDE), (TOP - 1, LEFT - 1, SIDE + 1)):
            assert (with_square(top, left, side) - TARGET).abs().min() > 1.0


def test_the_annealed_patch_probe_misses_it_and_the_square_search_finds_it():
    model, x = ExactSquareGate().eval(), _images()
    cfg = dict(families=("patch",), exclude_fraction=0.0, steps=60, batch_size=30)
    (plain,) = run_probes(model, x, ProbeConfig(**cfg))
    assert plain.variance_ratio > 0.2
    # screened on 2 of the 4 search images (the default), and unscreened (the thorough profile)
    for screen in (2, 0):
        (found,) = run_probes(model, x, ProbeConfig(**cfg, patch_grid=True, patch_grid_images=4,
                                                    patch_grid_screen=screen))
        assert found.variance_ratio < 0.01, screen
        assert torch.allclose(torch.tensor(found.collapse_point), TARGET, atol=0.2)


def test_the_screen_keeps_the_square_the_full_search_finds():
    from drmguard_engine.defenses.probes import _square_seed

    model, x = ExactSquareGate().eval(), _images(12)
    with torch.no_grad():
        var = model(x).var(0, unbiased=False)
    found = {}
    for screen, keep in ((0, 256), (2, 256), (3, 16)):
        cfg = ProbeConfig(patch_grid_images=6, patch_grid_screen=screen, patch_grid_keep=keep)
        found[screen] = _square_seed(model, x, var, cfg, torch.zeros(1, 1, SIZE, SIZE), None).square
    assert found[0][:3] == (SIDE, TOP, LEFT) and found[0][3] == [1.0, 0.0, 0.0]
    assert found[2] == found[0] and found[3] == found[0]


def test_spread_images_picks_the_outputs_furthest_apart():
    from drmguard_engine.defenses.probes import spread_images

    out = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [0.0, 0.2], [-4.0, 0.0], [0.0, 3.0]])
    var = torch.tensor([1.0, 1.0])
    # (5, 0) is furthest from the mean (0.18, 0.53); then (-4, 0) from it; then (0, 3), furthest from both
    assert spread_images(out, var, 3).tolist() == [2, 4, 5]
    # in benign stds: with the second output's variance 0.01, (0, 3) is 30 stds out and comes first
    assert spread_images(out, torch.tensor([1.0, 0.01]), 2).tolist()[0] == 5
    assert spread_images(out, var, 10).tolist() == spread_images(out, var, 6).tolist()  # at most every image


def test_square_search_settings_are_checked():
    with pytest.raises(ConfigError, match="patch_grid_sides"):
        ProbeConfig(patch_grid_sides=(0.0,))
    with pytest.raises(ConfigError, match="patch_grid_images"):
        ProbeConfig(patch_grid_images=1)
    with pytest.raises(ConfigError, match="patch_grid_screen"):
        ProbeConfig(patch_grid_screen=1)  # a screen of one image has no variance
    with pytest.raises(ConfigError, match="patch_grid_keep"):
        ProbeConfig(patch_grid_keep=0)
    with pytest.raises(ConfigError, match="no patch_grid_sides fit"):
        ProbeConfig(patch_grid=True, patch_grid_sides=(0.5,))  # a square of half the side is 25% of the image


def test_images_too_small_for_any_square_skip_the_search():
    # at 8 px the smallest square (2 px, 6% of the area) is over the 2% budget: the soft-mask fit stands alone
    from drmguard_engine.defenses.probes import _square_seed, square_candidates

    cfg = ProbeConfig(families=("patch",), steps=5, batch_size=8, exclude_fraction=0.0, patch_grid=True)
    assert square_candidates((3, 8, 8), cfg)[0] == []
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert _square_seed(model, x, torch.ones(2), cfg, torch.zeros(1, 1, 8, 8), None) is None
    (plain,) = run_probes(model, x, cfg.replace(patch_grid=False))
    (searched,) = run_probes(model, x, cfg)
    assert searched.variance_ratio == pytest.approx(plain.variance_ratio)


def test_the_square_seed_of_a_greyscale_model_is_one_of_the_greys():
    # one channel: the palette is the RGB corners' means (0, 1/3, 2/3, 1); the seeded probe paints one exactly
    from drmguard_engine.defenses.probes import _square_seed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        var = model(x).var(0, unbiased=False)
    seed = _square_seed(model, x, var, ProbeConfig(patch_grid_images=4), torch.zeros(1, 1, SIZE, SIZE), None)
    with torch.no_grad():
        grey = torch.sigmoid(seed.pattern).unique()
        area = float(seed.patch_mask().mean())
    assert grey.numel() == 1
    assert min(abs(float(grey) - g) for g in (0.0, 1 / 3, 2 / 3, 1.0)) < 1e-3
    assert 0.0 < area <= ProbeConfig().patch_area


def test_default_screens_the_square_search_thorough_does_not_and_fast_has_none():
    from drmguard_engine.scan import get_profile, list_profiles

    assert "thorough" in list_profiles()
    thorough, default, fast = (get_profile(p, "gaze") for p in ("thorough", "default", "fast"))
    assert default.probes.patch_grid and default.probes.patch_grid_screen == 2
    assert thorough.probes.patch_grid and thorough.probes.patch_grid_screen == 0
    assert thorough.probes.replace(patch_grid_screen=2) == default.probes
    assert not fast.probes.patch_grid
    assert (thorough.probe_threshold, thorough.rigidity_threshold) == (default.probe_threshold,
                                                                      default.rigidity_threshold)
    # the ablation switch turns it off
    assert not get_profile("default", "gaze", probe_patch_grid=False).probes.patch_grid


def test_bfloat16_probes_on_the_cpu_stay_float32():
    # the precision setting is autocast on CUDA only (tests/engine/test_gpu.py runs it there): on the CPU it must
    # not change a single number
    x = _images(40)
    cfg = dict(families=("blend", "patch"), steps=5, batch_size=20, patch_grid=True, patch_grid_images=4)
    a = run_probes(ExactSquareGate().eval(), x, ProbeConfig(**cfg))
    b = run_probes(ExactSquareGate().eval(), x, ProbeConfig(**cfg, precision="bfloat16"))
    assert [p.variance_ratio for p in a] == [p.variance_ratio for p in b]
    with pytest.raises(ConfigError, match="precision"):
        ProbeConfig(precision="float16")
