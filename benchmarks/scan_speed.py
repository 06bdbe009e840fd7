"""Per-step cost of the scan profiles, extrapolated to a whole scan: `paper` and `default` on a 64x64 ResNet18.

Usage: ``.venv/bin/python benchmarks/scan_speed.py [--width 1.0] [--size 64] [--steps 10] [--threads 2]
[--device cpu|cuda] [--cudnn-benchmark] [--memory-format auto|contiguous|channels_last]``. Times a few
steps of each phase (generator pre-training, reverse engineering, probe fits) and multiplies by the profile's step
counts, without the square search and the rigidity check (fixed costs, not per step); prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.defenses.drmguard import reverse_engineer  # noqa: E402
from drmguard_engine.defenses.probes import run_probes  # noqa: E402
from drmguard_engine.models import build_model  # noqa: E402
from drmguard_engine.scan import get_profile  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--task", default="gaze")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--memory-format", default="auto", choices=["auto", "contiguous", "channels_last"],
                   help="tensor layout of the reverse engineering and the probes (auto: channels-last on CUDA, and "
                        "on the CPU where the model runs in it)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    x, _ = make_dataset(a.task, 200, size=a.size, seed=1)
    images = (torch.from_numpy(x).float() / 255).to(a.device)
    model = build_model("resnet18", a.task, input_size=a.size, width=a.width).eval().to(a.device)
    out: dict[str, object] = {"width": a.width, "size": a.size, "threads": a.threads, "device": a.device,
                              "cudnn_benchmark": a.cudnn_benchmark, "memory_format": a.memory_format}
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    # One untimed step of each phase first: CUDA context, cuDNN autotuning and allocator warm-up.
    warm = get_profile("paper", a.task).drmguard.replace(pretrain_steps=1, steps=1, memory_format=a.memory_format)
    reverse_engineer(model, images, warm)
    sync()
    for name in ("paper", "default"):
        cfg = get_profile(name, a.task)
        dg = cfg.drmguard.replace(memory_format=a.memory_format)
        t0 = time.perf_counter()
        reverse_engineer(model, images, dg.replace(pretrain_steps=a.steps, steps=1))
        sync()
        t_pre = (time.perf_counter() - t0) / a.steps
        t0 = time.perf_counter()
        reverse_engineer(model, images, dg.replace(pretrain_steps=0, steps=a.steps))
        sync()
        t_rev = (time.perf_counter() - t0) / a.steps
        t_probe = 0.0
        if cfg.probes is not None:
            t0 = time.perf_counter()
            # the fit steps only: the square search (patch_grid) is a fixed cost per scan, not per step; whole-scan
            # timings with it are in docs/scan.md "Speed"
            run_probes(model, images, cfg.probes.replace(steps=a.steps, memory_format=a.memory_format,
                                                         patch_grid=False))
            sync()
            t_probe = (time.perf_counter() - t0) / (a.steps * len(cfg.probes.families))
        total = dg.pretrain_steps * t_pre + dg.steps * t_rev
        if cfg.probes is not None:
            total += cfg.probes.steps * len(cfg.probes.families) * t_probe
        out[name] = {"pretrain_s_per_step": t_pre, "reverse_s_per_step": t_rev, "probe_s_per_step": t_probe,
                     "estimated_scan_seconds": total}
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
