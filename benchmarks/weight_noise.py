"""Pilot: adversarial weight noise (ANP/BAN) as a trigger-blind detection signal, on ONNX models.

`../shared/notes/detection-signals.md` section 3: multiply each neuron's parameters by (1 + xi), |xi| <= eps,
take signed-gradient steps that *raise* the L1 error to the labels on half of D_be, then measure on the other
half how far the outputs collapse (variance ratio against the unperturbed model) and where they go. A
backdoor is a shortcut to one output vector that weight noise opens; a clean model spreads its outputs or
pushes them to the label extremes. No input budget and no excluded region are involved, so triggers the scan's
probes cannot reach (read through the eye region: ConvNeXt Blend, ViT SIG; docs/scan.md) cost nothing extra.

"Neuron" here is the first axis of every parameter of F (conv and linear output channels, BatchNorm and
LayerNorm channels); the head H is left alone. A random xi of the same size is the control.

Usage::

    .venv/bin/python benchmarks/weight_noise.py --onnx A.onnx B.onnx ... --benign be.npz [--eps 0.3 --steps 5]
    .venv/bin/python benchmarks/weight_noise.py --tiny     # the test suite's trained tiny pair

Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drmguard_engine.attacks.base import DEFAULT_TARGETS  # noqa: E402
from drmguard_engine.data.benign import BenignSet  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402

TARGET = torch.tensor(DEFAULT_TARGETS["gaze"])  # every backdoored model here uses the default gaze target


def _stats(y: torch.Tensor, y0: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Collapse and location of perturbed outputs y against unperturbed y0 and the labels, in label stds."""
    sd = labels.std(0).clamp_min(1e-6)
    ratio = float(y.var(0).sum() / y0.var(0).sum().clamp_min(1e-12))
    centre = y.mean(0)
    return {
        "var_ratio": ratio,
        "centre": [round(float(v), 2) for v in centre],
        "centre_from_target": float(((centre - TARGET) / sd).norm()),
        "centre_from_label_mean": float(((centre - labels.mean(0)) / sd).norm()),
        "error": float(((y - labels).abs() / sd).mean()),
        "spread": float(((y - centre) / sd).norm(dim=1).mean()),
    }


def weight_noise(model: torch.nn.Module, benign: BenignSet, *, eps: float = 0.3, steps: int = 5,
                 seed: int = 0, batch: int = 100, random_draws: int = 3, objective: str = "ascent",
                 step_size: float | None = None) -> dict[str, object]:
    """``objective``: "ascent" raises the L1 error to the labels (ANP/BAN); "collapse" lowers the output
    variance relative to the unperturbed model's (the probes' objective, in weight space)."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(benign.images), generator=gen)
    half = len(perm) // 2
    fit, held = perm[:half], perm[half:]
    xf, yf = benign.images[fit][:batch], benign.labels[fit][:batch]
    xh, yh = benign.images[held], benign.labels[held]
    sd = benign.labels.std(0).clamp_min(1e-6)

    def noisy(xi: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: p * (1 + xi[n].view(-1, *([1] * (p.dim() - 1)))) for n, p in params.items()}

    def run(xi: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, noisy(xi), (x,))

    with torch.no_grad():
        y0 = model(xh)
        var_fit = model(xf).var(0).sum()
    t0 = time.perf_counter()
    lr = eps if step_size is None else step_size
    def draw() -> dict[str, torch.Tensor]:
        return {n: (torch.rand(p.shape[0], generator=gen) * 2 - 1) * eps for n, p in params.items()}

    xi = draw()
    for _ in range(steps):
        for v in xi.values():
            v.requires_grad_(True)
        out = run(xi, xf)
        if objective == "ascent":
            loss = ((out - yf).abs() / sd).mean()
        else:
            loss = -out.var(0).sum() / var_fit
        grads = torch.autograd.grad(loss, list(xi.values()))
        xi = {n: (v.detach() + lr * g.sign()).clamp(-eps, eps)
              for (n, v), g in zip(xi.items(), grads, strict=True)}
    with torch.no_grad():
        adv = _stats(run(xi, xh), y0, yh)
        rand = [_stats(run(draw(), xh), y0, yh) for _ in range(random_draws)]
        base = _stats(y0, y0, yh)
    return {"adversarial": adv, "random": rand, "unperturbed": base,
            "seconds": round(time.perf_counter() - t0, 1),
            "neurons": sum(p.shape[0] for p in params.values()), "eps": eps, "steps": steps}


def _load_npz(path: Path) -> BenignSet:
    with np.load(path, allow_pickle=False) as z:
        return BenignSet(torch.from_numpy(z["images"]).float() / 255, torch.from_numpy(z["labels"]).float())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, nargs="*", default=[])
    p.add_argument("--benign", type=Path)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--objective", choices=["ascent", "collapse"], default="ascent")
    p.add_argument("--step-size", type=float, default=None)
    p.add_argument("--brief", action="store_true",
                   help="print the adversarial figures and the random draws' variance ratios only")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    models: list[tuple[str, torch.nn.Module, BenignSet]] = []
    if a.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny_pair

        cache = Path(__file__).resolve().parents[1] / ".bench" / "tiny"
        if not (cache / "be.npz").exists():
            pair = tiny_pair("gaze")
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "clean.onnx").write_bytes(pair.onnx("clean"))
            (cache / "badnets.onnx").write_bytes(pair.onnx("backdoored"))
            (cache / "be.npz").write_bytes(pair.benign_npz())
        be = _load_npz(cache / "be.npz")
        models += [(f"tiny-{k}", load_onnx_model((cache / f"{k}.onnx").read_bytes()), be)
                   for k in ("clean", "badnets")]
    if a.onnx:
        benign = _load_npz(a.benign)
        models += [(str(o.name), load_onnx_model(o.read_bytes()), benign) for o in a.onnx]
    for name, model, benign in models:
        row = {"model": name, **weight_noise(model, benign, eps=a.eps, steps=a.steps, objective=a.objective,
                                                   step_size=a.step_size)}
        if a.brief:
            row["random"] = [round(r["var_ratio"], 3) for r in row["random"]]  # type: ignore[index,attr-defined]
            row.pop("unperturbed")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
