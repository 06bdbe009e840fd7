"""The scan's CUDA paths, against the same computation on the CPU (``gpu`` marker: skipped without a CUDA device).

CI has no GPU; these run on a lent GPU machine (``benchmarks/device_square.sh``, docs/gpu.md). The model is the
square-search test's exact-square gate (``test_patch_grid.py``), which a scan must find on either device, in either
precision of the probes.
"""

from __future__ import annotations

import pytest
import torch
from test_patch_grid import TARGET, ExactSquareGate, _images
from torch import nn

from drmguard_engine.data.benign import BenignSet
from drmguard_engine.defenses.probes import ProbeConfig, run_probes
from drmguard_engine.scan import get_profile, scan

pytestmark = pytest.mark.gpu

_SEARCH = dict(families=("patch",), exclude_fraction=0.0, steps=60, batch_size=30, patch_grid=True,
               patch_grid_images=4)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_square_search_on_cuda_finds_the_cpu_square(precision: str) -> None:
    x = _images()
    (cpu,) = run_probes(ExactSquareGate().eval(), x, ProbeConfig(**_SEARCH))
    (gpu,) = run_probes(ExactSquareGate().eval().cuda(), x.cuda(), ProbeConfig(**_SEARCH, precision=precision))
    assert cpu.variance_ratio < 0.01 and gpu.variance_ratio < 0.01, (cpu.variance_ratio, gpu.variance_ratio)
    assert torch.allclose(torch.tensor(gpu.collapse_point), TARGET, atol=0.2)


class Split(nn.Module):
    """A network as a scan takes it: features F, then one linear head H (here the identity on the 2 outputs)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_default_scan_on_cuda_gives_the_cpu_verdicts(precision: str) -> None:
    # a short default scan (20 reverse-engineering steps; the probes and the square search as shipped) of the
    # gate and of its network without the gate, on each device
    benign = BenignSet(_images(80), None)
    verdicts: dict[tuple[str, str], str] = {}
    for device in ("cpu", "cuda"):
        cfg = get_profile("default", "gaze", steps=20, pretrain_steps=20,
                          probe_precision=precision if device == "cuda" else "float32")
        gate = ExactSquareGate()
        for name, model in (("gate", Split(gate).eval()), ("clean", Split(nn.Sequential(gate.net)).eval())):
            r = scan(model, benign, "gaze", cfg, device=device)
            assert r.device.startswith(device)
            verdicts[name, device] = r.verdict
    assert verdicts["gate", "cuda"] == verdicts["gate", "cpu"] == "backdoored", verdicts
    assert verdicts["clean", "cuda"] == verdicts["clean", "cpu"], verdicts
