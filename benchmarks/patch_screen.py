"""Can the square search screen its candidates on fewer images? (``ProbeConfig.patch_grid_screen``)

The square search (``ProbeConfig.patch_grid``) scores every solid square on ``patch_grid_images`` (6) fit images:
13,016 candidates x 6 forward passes at any image size. This benchmark computes all of them once, then asks
where the 6-image winner would rank if the candidates were first scored on only ``k`` of the images, chosen in
two ways: the first ``k``, or the ``k`` whose outputs lie furthest apart (what the scan uses). A screen that keeps
the top ``keep`` candidates for the 6-image pass loses nothing when the winner's screen rank stays under
``keep``. It also times the real search with and without the screen, through the engine.

Usage::

    .venv/bin/python benchmarks/patch_screen.py MODEL.onnx [MODEL.onnx ...] --benign D.npz [--json OUT.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drmguard_engine.data.benign import load_benign_npz  # noqa: E402
from drmguard_engine.defenses import probes  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402


def analyse(path: str, images: torch.Tensor, ks: tuple[int, ...]) -> dict:
    model = load_onnx_model(path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = probes.ProbeConfig(patch_grid=True)
    fit, _, out_fit, _, var_fit, _ = probes._prepare(model, images, cfg)
    exclude = probes.saliency_exclusion(model, fit[: cfg.saliency_images], cfg.exclude_fraction,
                                        cfg.exclude_dilate)
    sub = fit[: cfg.patch_grid_images]
    cands, colours = probes.square_candidates(sub.shape[1:], cfg)
    t0 = time.perf_counter()
    y = probes.square_outputs(model, sub, cands, colours, 1 - exclude, None)  # (n_cands, 6, k)
    full_s = time.perf_counter() - t0
    full = (y.var(1, unbiased=False) / var_fit).mean(1)
    best = int(full.argmin())
    row = {"model": Path(path).name, "candidates": len(cands), "full_seconds": round(full_s, 1),
           "best": list(cands[best]), "best_ratio_6": round(float(full[best]), 5)}
    for k in ks:
        for how, idx in (("first", torch.arange(k)), ("spread", probes.spread_images(out_fit[: len(sub)], var_fit, k))):
            screen = (y[:, idx].var(1, unbiased=False) / var_fit).mean(1)
            rank = int((screen < screen[best]).sum())
            row[f"rank_{how}{k}"] = rank
    # the engine's search with the screen, timed (full_seconds above is the search without it)
    for screen in (2, 3):
        c = cfg.replace(patch_grid_screen=screen)
        t0 = time.perf_counter()
        seed = probes._square_seed(model, fit, var_fit, c, exclude, None)
        row[f"search_seconds_screen{screen}"] = round(time.perf_counter() - t0, 1)
        row[f"search_found_screen{screen}"] = list(seed.square)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--benign", required=True)
    ap.add_argument("--json", help="append one JSON line per model here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = load_benign_npz(args.benign, require_labels=False).images
    for path in args.models:
        row = analyse(path, images, (2, 3))
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
