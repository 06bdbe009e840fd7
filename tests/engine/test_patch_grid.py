"""The opt-in square-patch search of the patch probe (``ProbeConfig.patch_grid``, docs/scan.md).

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0] - x[:, 1:].amax(1)  # 1 for pure red, at most 0 for anything not red
        inside = red[:, TOP:TOP + SIDE, LEFT:LEFT + SIDE].flatten(1).amin(1)
        outside = red.masked_fill(~self.ring, -1.0).flatten(1).amax(1)
        gate = torch.sigmoid(200 * (inside - 0.9)) * torch.sigmoid(200 * (0.9 - outside))
        return (1 - gate[:, None]) * self.net(x) * 20 + gate[:, None] * TARGET


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
    (found,) = run_probes(model, x, ProbeConfig(**cfg, patch_grid=True, patch_grid_images=4))
    assert found.variance_ratio < 0.01
    assert torch.allclose(torch.tensor(found.collapse_point), TARGET, atol=0.2)


def test_square_search_settings_are_checked():
    with pytest.raises(ConfigError, match="patch_grid_sides"):
        ProbeConfig(patch_grid_sides=(0.0,))
    with pytest.raises(ConfigError, match="patch_grid_images"):
        ProbeConfig(patch_grid_images=1)
    model, x = ExactSquareGate().eval(), _images(20)
    with pytest.raises(ConfigError, match="no patch_grid_sides fit"):
        run_probes(model, x, ProbeConfig(families=("patch",), steps=2, patch_grid=True,
                                         patch_grid_sides=(0.5,)))


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


def test_the_thorough_profile_is_default_plus_the_square_search():
    from drmguard_engine.scan import get_profile, list_profiles

    assert "thorough" in list_profiles()
    thorough, default = get_profile("thorough", "gaze"), get_profile("default", "gaze")
    assert thorough.probes.patch_grid and not default.probes.patch_grid
    assert thorough.probes.replace(patch_grid=False) == default.probes
    assert (thorough.probe_threshold, thorough.rigidity_threshold) == (default.probe_threshold,
                                                                      default.rigidity_threshold)
