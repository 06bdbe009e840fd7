"""How many control points the rigidity check needs: one flagged probe, checked with 4 and with 8 controls.

For each model, the default profile's probe of one family is fitted as a scan fits it (the same seed, data
split and budget), and ``probes.probe_rigidity`` is run from its transform with each number of controls. For
gaze (two outputs) 4 controls lie on the output axes and 8 every 45 degrees (``probes.control_points``); the 4
are among the 8. Each row gives both reductions of the control errors (median and mean), so a collapse point
at the edge or a corner of the output range shows as one or two hard directions.

The DRMGuard reverse engineering is skipped: it does not enter the rigidity check.

Usage::

    .venv/bin/python benchmarks/rigidity_controls.py --task gaze --benign D.npz --family blend \
        M1.onnx M2.onnx --controls 4 8 --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drmguard_engine.data.benign import load_benign_npz  # noqa: E402
from drmguard_engine.defenses.probes import probe_rigidity, rigidity_of, run_probes  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.scan import get_profile  # noqa: E402


def measure(model_path: Path, benign: Path, task: str, family: str, controls: list[int]) -> dict:
    model = load_onnx_model(model_path).eval()
    images = load_benign_npz(benign, task=task).images
    cfg = get_profile("default", task).probes.replace(families=(family,))
    t0 = time.perf_counter()
    (probe,) = run_probes(model, images, cfg)
    row = {"model": str(model_path), "family": family, "variance_ratio": probe.variance_ratio,
           "collapse_point": probe.collapse_point, "probe_seconds": time.perf_counter() - t0}
    for n in controls:
        r = probe_rigidity(model, images, cfg.replace(rigidity_controls=n), family, probe.collapse_point,
                           probe.transform)
        ratios = [e / r["collapse_error"] for e in r["control_errors"]]
        row[f"controls_{n}"] = {"median": rigidity_of(r["collapse_error"], r["control_errors"], "median"),
                                "mean": rigidity_of(r["collapse_error"], r["control_errors"], "mean"),
                                "per_control": ratios, "seconds": r["seconds"]}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--task", required=True, choices=["gaze", "headpose"])
    ap.add_argument("--benign", required=True, type=Path)
    ap.add_argument("--family", default="blend")
    ap.add_argument("--controls", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--json", type=Path, default=None, help="append one JSON row per model here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for m in a.models:
        row = measure(m, a.benign, a.task, a.family, a.controls)
        parts = [f"{m.name} {a.family} {row['variance_ratio']:.4f}"]
        for n in a.controls:
            c = row[f"controls_{n}"]
            parts.append(f"{n} controls: median {c['median']:.2f} mean {c['mean']:.2f} "
                         f"[{', '.join(f'{v:.2f}' for v in c['per_control'])}] {c['seconds']:.0f}s")
        print(" | ".join(parts), flush=True)
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
