"""The benign-fit diagnostic of a scan report: a model that does not fit D_be's labels gets a warning that says
what to check (``scan.benign_fit``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from drmguard_engine.data.benign import BenignSet
from drmguard_engine.scan import FIT_WARNING_RATIO, benign_fit
from drmguard_engine.tasks import regression_error


class _ChannelMeans(nn.Module):
    """f(x) = A @ (per-channel mean of x) + b: a model whose outputs are known for any image."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.tensor([[400.0, -200.0, 0.0], [0.0, 300.0, 300.0]])
        self.b = torch.tensor([-100.0, -300.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) @ self.a.t() + self.b


class _Radians(_ChannelMeans):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.deg2rad(super().forward(x))


@pytest.fixture(scope="module")
def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # images whose channel means vary: each image is a random grey level per channel plus noise
    images = (torch.rand(200, 3, 1, 1, generator=gen) * 0.6 + 0.2
              + 0.05 * torch.randn(200, 3, 8, 8, generator=gen)).clamp(0, 1)
    model = _ChannelMeans()
    with torch.no_grad():
        labels = model(images) + 0.5 * torch.randn(200, 2, generator=gen)  # degrees, 0.5 of label noise
    return model, images, labels


def test_a_model_that_fits_its_labels_gets_no_warning(data):
    model, images, labels = data
    fit = benign_fit(model, BenignSet(images, labels), "gaze")
    mean = labels.mean(0, keepdim=True).expand_as(labels)
    assert fit["error"] == pytest.approx(regression_error("gaze", model(images).detach(), labels), rel=1e-5)
    assert fit["mean_predictor_error"] == pytest.approx(regression_error("gaze", mean, labels), rel=1e-5)
    assert fit["ratio"] < 0.1 and fit["warning"] == ""


@pytest.mark.parametrize(("what", "hint"), [
    ("labels_in_radians", "labels in radians?"),
    ("outputs_in_radians", "outputs in radians?"),
    ("labels_swapped", "labels' units (degrees) and order (pitch, yaw)"),
    ("images_not_its_own", "images are what the model expects"),
])
def test_a_model_that_does_not_fit_its_labels_gets_a_warning_saying_what_to_check(data, what, hint):
    model, images, labels = data
    if what == "labels_in_radians":
        labels = torch.deg2rad(labels)
    elif what == "outputs_in_radians":
        model = _Radians()
    elif what == "labels_swapped":
        labels = labels.flip(1)
    else:
        images = images.roll(1, dims=0)  # each image belongs to another label
    fit = benign_fit(model, BenignSet(images, labels), "gaze")
    assert fit["ratio"] >= FIT_WARNING_RATIO
    assert "does not fit the benign set" in fit["warning"] and hint in fit["warning"], fit["warning"]


def test_no_labels_no_fit():
    assert benign_fit(_ChannelMeans(), BenignSet(torch.rand(4, 3, 8, 8), None), "gaze") == {}


def test_a_non_finite_output_is_a_warning(data):
    model, images, labels = data
    broken = _ChannelMeans()
    broken.b = torch.tensor([math.nan, 0.0])
    fit = benign_fit(broken, BenignSet(images, labels), "gaze")
    assert fit["warning"].startswith("the model does not fit the benign set")
