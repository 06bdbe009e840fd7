"""What running a job's independent pieces side by side buys on the CPU (``drmguard_engine.parallel``).

Trains the demo's backdoored model (``guard_server.demo.make_models``: ResNet18 x0.25, 64 px, BadNets, 1,000 steps,
2,000 training images, its 300-image benign set; or ``--model``/``--benign`` for another), then, in each layout
given by ``--layouts`` (``THREADS:WORKERS``: torch threads per piece, pieces side by side), back to back in one
process: a ``default`` scan (``scan(workers=...)``: the reverse engineering, the probe families, the rigidity
checks) and the service's 5-fold clean-error check on that scan's report (300 mitigation steps per fold;
``cross_validated_cost(workers=...)``, skipped with ``--folds 0`` or on a benign verdict). Each layout's numbers
are compared with the first one's; at the same thread count they must be equal to the last bit.

Usage::

    .venv/bin/python benchmarks/side_by_side.py --out docs/results/side_by_side.json
    .venv/bin/python benchmarks/side_by_side.py --model M.onnx --benign D.npz --folds 0 --layouts 2:1,1:2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drmguard_engine.clean_cost import cross_validated_cost  # noqa: E402
from drmguard_engine.data import load_benign_npz  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.scan import mitigation_config, scan  # noqa: E402
from guard_server.demo import make_models  # noqa: E402


def _same(a: dict, b: dict) -> bool:
    drop = ("seconds", "timings")

    def clean(d: object) -> object:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in drop}
        if isinstance(d, list):
            return [clean(v) for v in d]
        return d

    return clean(a) == clean(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="1:1,1:2,2:1", help="THREADS:WORKERS,... (default 1:1,1:2,2:1)")
    ap.add_argument("--folds", type=int, default=5, help="folds of the clean-error check (0: no check)")
    ap.add_argument("--model", default=None, help="an ONNX model instead of the demo's backdoored one")
    ap.add_argument("--benign", default=None, help="its benign set (.npz, with labels for the check)")
    ap.add_argument("--task", default="gaze")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    a = ap.parse_args()
    layouts = [tuple(int(v) for v in s.split(":")) for s in a.layouts.split(",")]
    train_s = 0.0
    if a.model:
        model = load_onnx_model(Path(a.model).read_bytes())
        c, h, w = (int(v) for v in model.input_shape)
        benign = load_benign_npz(Path(a.benign).read_bytes(), task=a.task, channels=c, size=(h, w))
    else:
        with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
            t0 = time.perf_counter()
            models = make_models(Path(tmp), task=a.task, size=64, width=0.25, steps=1000, n_train=2000,
                                 n_benign=300, seed=0, threads=1)
            train_s = time.perf_counter() - t0
            model = load_onnx_model(Path(models["backdoored"]).read_bytes())
            benign = load_benign_npz(Path(models["benign"]).read_bytes(), task=a.task, channels=3, size=(64, 64))
    rows: list[dict] = []
    for threads, workers in layouts:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        report = scan(model, benign, a.task, "default", workers=workers)
        row = {"threads": threads, "workers": workers, "scan_seconds": round(time.perf_counter() - t0, 1),
               "verdict": report.verdict, "score": report.score, "report": report.to_dict()}
        if a.folds and report.backdoored:
            t0 = time.perf_counter()
            cost = cross_validated_cost(model, benign, a.task, report=report, config=mitigation_config(None, report),
                                        folds=a.folds, seed=0, workers=workers)
            row.update(cost_seconds=round(time.perf_counter() - t0, 1), rise=cost.rise, fold_rises=cost.fold_rises)
        same = [r for r in rows if r["threads"] == threads]
        if same:
            row["same_as"] = f"{same[0]['threads']}:{same[0]['workers']}"
            row["same_numbers"] = _same(row["report"], same[0]["report"]) and row.get("fold_rises") == same[0].get(
                "fold_rises")
        rows.append(row)
        print(f"threads {threads} x workers {workers}: scan {row['scan_seconds']} s ({report.verdict}, score "
              f"{report.score:.3f})" + (f", check {row['cost_seconds']} s (rise {row['rise']:+.4%})"
                                         if "cost_seconds" in row else "")
              + (f"; same numbers as {row['same_as']}: {row['same_numbers']}" if same else ""), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r["timings"] = r.pop("report")["timings"]
        Path(a.out).write_text(json.dumps({"model": a.model or "demo backdoored", "train_seconds": train_s,
                                           "folds": a.folds, "layouts": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
