"""Does a multi-trigger backdoor keep a trigger the probes cannot reach? For a zoo model with several real triggers
(multi-target WaNet) and its repaired version: each real trigger's output-variance ratio on D_be (a low ratio: the
trigger still collapses the outputs to its target) and what one probe family reaches from several seeds.

Usage::

    .venv/bin/python benchmarks/second_trigger.py --zoo-model .bench/zoo/gaze/wanet_multi/<dir> \
        --mitigated .bench/service_path-s19/<name>/mitigated.onnx [--family warp --seeds 0,1,2]

Prints one JSON line per model and measurement (docs/scan.md, "The rebuilt zoo through the service's own worker").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scan_tables import benign_set  # noqa: E402
from drmguard_engine.attacks import load_attack  # noqa: E402
from drmguard_engine.cli import parse_overrides  # noqa: E402
from drmguard_engine.defenses.probes import run_probes  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.scan import get_profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo-model", type=Path, required=True, help="the zoo model's directory (model.onnx, attack.npz)")
    p.add_argument("--mitigated", type=Path, help="its repaired ONNX model (the worker's mitigated.onnx)")
    p.add_argument("--family", default="warp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="probe settings (ProbeConfig fields)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    meta = json.loads((a.zoo_model / "meta.json").read_text())
    task, benign = meta["task"], benign_set(meta["task"], int(meta["size"]), 400, 777)
    attack = load_attack(a.zoo_model / "attack.npz")
    cfg = get_profile("default", task).probes.replace(**parse_overrides(a.set))
    models = [("submitted", a.zoo_model / "model.onnx")] + ([("mitigated", a.mitigated)] if a.mitigated else [])
    for name, path in models:
        model = load_onnx_model(path).eval()
        x = benign.images
        with torch.no_grad():
            var0 = model(x).var(0)
            for which in range(len(attack.targets)):
                out = model(attack.apply(x, which) if len(attack.targets) > 1 else attack.apply(x))
                print(json.dumps({"model": name, "trigger": which, "target": attack.targets[which].tolist(),
                                  "variance_ratio": round(float((out.var(0) / var0).mean()), 4),
                                  "mean_output": [round(v, 2) for v in out.mean(0).tolist()]}), flush=True)
        for seed in (int(s) for s in a.seeds.split(",")):
            r = run_probes(model, x, cfg.replace(families=(a.family,), seed=seed))[0]
            print(json.dumps({"model": name, "probe": a.family, "seed": seed, "set": a.set,
                              "variance_ratio": round(float(r.variance_ratio), 4),
                              "collapse_point": [round(v, 2) for v in r.collapse_point]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
