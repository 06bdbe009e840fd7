"""Pilot (not in the scan): an exhaustive search over solid square patches, for triggers the probe misses.

The patch probe fits a soft per-pixel mask annealed from half the image down to 2% of it. A model that keys
on a patch's exact size and position (torchvision's MobileNet V3-small with a BadNets patch: a 1-pixel shift
of the 6 px patch, or a 7 px patch, and the backdoor stops firing) gives that fit no gradient to follow, and
the scan misses it (docs/scan.md, "torchvision networks"). This pilot tries every square patch of three
sides (7%, 10% and 14% of the image side), at positions spaced by half a side (image edges included), in the
8 corner colours of the RGB cube, with the scan's saliency exclusion, on 6 images of the fit half of D_be.
It then scores the five best on the held-out half (variance ratio, as the probes do) and prints them with
their collapse point.

Usage::

    .venv/bin/python benchmarks/patch_grid.py MODEL.onnx [D_be.npz]   # 70-90 s for MobileNet V3-small, 1 core
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drmguard_engine.data.benign import load_benign_npz  # noqa: E402
from drmguard_engine.defenses.probes import saliency_exclusion  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402


def _mask(h: int, side: int, i: int, j: int, excl: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(1, 1, h, h)
    m[..., i:i + side, j:j + side] = 1
    return m * (1 - excl)


def main() -> int:
    torch.set_num_threads(1)
    model = load_onnx_model(sys.argv[1]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = load_benign_npz(sys.argv[2] if len(sys.argv) > 2 else ".bench/heldout/be.npz",
                        require_labels=False).images
    h = x.shape[-1]
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    fit, held = x[: len(x) // 2], x[len(x) // 2:]
    excl = saliency_exclusion(model, fit[:100], 0.10, 3)
    colours = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    sub, t0, found = fit[:6], time.perf_counter(), []
    with torch.no_grad():
        v_fit, v_held = model(fit).var(0), model(held).var(0)
        for side in (max(2, round(h * 0.07)), max(2, round(h * 0.1)), max(2, round(h * 0.14))):
            pos = sorted({*range(0, h - side + 1, max(1, side // 2)), h - side})
            cands = [(side, i, j, c) for i, j in itertools.product(pos, pos) for c in colours]
            for k in range(0, len(cands), 64):
                chunk = cands[k:k + 64]
                masks = torch.cat([_mask(h, s, i, j, excl) for s, i, j, _ in chunk])[:, None]
                pats = torch.stack([c for *_, c in chunk]).view(-1, 1, 3, 1, 1)
                xs = (sub[None] * (1 - masks) + masks * pats).flatten(0, 1)
                y = model(xs).view(len(chunk), len(sub), -1)
                for (s, i, j, c), r in zip(chunk, (y.var(1) / v_fit).mean(1).tolist(), strict=True):
                    found.append((r, s, i, j, c.tolist()))
        found.sort(key=lambda r: r[0])
        print(f"{len(found)} candidates in {time.perf_counter() - t0:.0f} s")
        for r, s, i, j, c in found[:5]:
            m = _mask(h, s, i, j, excl)
            y = model(held * (1 - m) + m * torch.tensor(c).view(1, 3, 1, 1))
            ratio = (y.var(0) / v_held).mean().item()
            print(f"side {s} at ({i},{j}) colour {c}: 6-image ratio {r:.4f}, held-out ratio {ratio:.4f}, "
                  f"collapse point {[round(v, 1) for v in y.mean(0).tolist()]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
