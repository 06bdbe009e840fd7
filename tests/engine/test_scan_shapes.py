"""Scans of input shapes the zoo never has: one grey channel, a non-square image whose sides are not multiples of
the generator's 8, an ONNX file from torch's legacy exporter at opset 13 with its own input and output names.

MPIIGaze's eye-patch models take 36x60 greyscale images (a LeNet: two 5x5 convs, a 500-unit fully connected
layer, the head); these tests use the same graph shape at 12x20 with tiny budgets, so they check the plumbing
(import, benign-set validation, generator padding, probes, the report and its plots), not the verdict. A trained
36x60 LeNet pair was scanned with the command line for the verdicts (docs/scan.md, "Other input shapes").
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from drmguard_engine.data.benign import load_benign_npz
from drmguard_engine.errors import DataError
from drmguard_engine.onnx_io import load_onnx_model
from drmguard_engine.scan import get_profile, scan

H, W = 12, 20
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.onnx: the legacy exporter, on purpose


class _EyeLeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(6 * 2 * 6, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.5) / 0.25))


def _onnx() -> bytes:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.onnx.export(_EyeLeNet().eval(), torch.rand(1, 1, H, W), buf, input_names=["eyes"], output_names=["gaze"],
                      opset_version=13, dynamic_axes={"eyes": {0: "n"}, "gaze": {0: "n"}}, dynamo=False)
    return buf.getvalue()


def _benign_npz(channels: int = 1) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, images=rng.integers(0, 256, (24, channels, H, W), dtype=np.uint8),
             labels=rng.normal(0, 10, (24, 2)).astype(np.float32))
    return buf.getvalue()


@pytest.mark.parametrize("profile", ["default", "paper"])
def test_grey_non_square_lenet_scans_end_to_end(profile: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from drmguard_engine.plots import scan_plots

    model = load_onnx_model(_onnx())
    assert tuple(model.input_shape) == (1, H, W)
    benign = load_benign_npz(_benign_npz(), task="gaze", channels=1, size=(H, W))
    over = dict(steps=4, pretrain_steps=2, batch_size=8)
    if profile == "default":
        over.update(probe_steps=3, probe_rigidity_steps=2)
    report = scan(model, benign, "gaze", get_profile(profile, "gaze", **over))
    # the report's own contract holds on this shape: the verdict follows the score, and the paper's score is
    # epsilon / ratio
    assert (report.verdict == "backdoored") == (report.score >= report.score_threshold)
    if profile == "paper":
        assert report.score == pytest.approx(0.03 / report.perturbation_ratio, rel=1e-6)
    assert 0 < report.perturbation_ratio < 1 and len(report.estimated_target) == 2
    assert np.isfinite(report.score) and report.steps > 0
    if profile == "default":
        assert {p["family"] for p in report.probes} == {"blend", "patch", "warp", "smooth"}
    paths = scan_plots(report, benign, tmp_path, model=model)
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_benign_set_with_the_wrong_channels_is_refused_with_the_models_shape() -> None:
    with pytest.raises(DataError, match="1 channels"):
        load_benign_npz(_benign_npz(channels=3), task="gaze", channels=1, size=(H, W))
