"""Each backdoored zoo model through the service's own scan job (``python -m guard_server.worker``), exactly as
``VetModel`` runs it: the outcome and its reason, the re-scan's score and smallest probe ratio where a mitigated
model was re-scanned, and that model's AE / DAE / RE with the real trigger on the zoo's test set.

It measures the admission policy (``guard_server/policy.py``) on models whose real triggers are known: which
mitigated versions the service would serve, and whether their backdoors are really gone (docs/scan.md, "A re-scan
that reads benign only narrowly"). D_be is 400 images drawn with a seed the zoo never trained on.

Usage::

    .venv/bin/python benchmarks/service_path.py --zoo .bench/zoo --out .bench/service_path [--part 0 --parts 2]
        [--only headpose/clean_label,gaze/badnets]

One JSON line per model on stdout. About 1-4 minutes per ResNet18 x0.25 model on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scan_tables import benign_set  # noqa: E402
from drmguard_engine.attacks import load_attack  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.training import evaluate  # noqa: E402


def run_worker(job: dict[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """Runs one scan job in the service's worker and returns its last event of each kind."""
    (out / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "guard_server.worker", str(out / "job.json")], capture_output=True,
                       text=True, cwd=str(out), env=env)
    events: dict[str, dict[str, Any]] = {}
    for line in p.stdout.splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        events[str(r.get("ev"))] = r
    if p.returncode:
        events["failed"] = {"returncode": p.returncode, "stderr": p.stderr[-500:]}
    return events


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "zoo")
    p.add_argument("--out", type=Path, default=ROOT / ".bench" / "service_path")
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated <task>/<kind> filters")
    p.add_argument("--max-rescan-score", type=float, default=0.5, help="the server's --mitigate-max-rescan-score")
    p.add_argument("--cv-folds", type=int, default=5, help="the server's --mitigate-cv-folds (0: one hold-out split)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-unmasked-check", action="store_true", help="the server's --no-mitigate-unmasked-check")
    p.add_argument("--extra-seeds", type=int, default=2, help="the server's --mitigate-extra-seeds")
    a = p.parse_args(argv)
    a.out, a.zoo = a.out.resolve(), a.zoo.resolve()  # the worker runs in each model's own directory
    metas = [m for m in sorted(a.zoo.rglob("meta.json")) if json.loads(m.read_text())["backdoored"]]
    for i, meta in enumerate(metas):
        if i % a.parts != a.part or (a.only and not any(k in str(meta) for k in a.only.split(","))):
            continue
        e = json.loads(meta.read_text())
        d, task = meta.parent, e["task"]
        name = f"{task}-{e['kind']}-{d.name}"
        b = benign_set(task, int(e["size"]), 400, 777)
        buf = io.BytesIO()
        np.savez(buf, images=(b.images.numpy() * 255).round().astype(np.uint8), labels=b.labels.numpy())
        out = a.out / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "benign.npz").write_bytes(buf.getvalue())
        job = {"model_path": str(d / "model.onnx"), "benign_path": str(out / "benign.npz"),
               "benign_sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "reference_paths": [], "task": task,
               "profile": "default", "device": a.device, "allow_mitigated": True, "tolerance": 0.1,
               "mitigate_max_probe_ratio": 0.01, "mitigate_max_rescan_score": a.max_rescan_score,
               "holdout_fraction": 0.2, "cv_folds": a.cv_folds, "out_dir": str(out), "threads": 1,
               "mitigate_unmasked_above": 0.01, "mitigate_unmasked_check": not a.no_unmasked_check,
               "mitigate_extra_seeds": a.extra_seeds}
        ev = run_worker(job, out)
        row: dict[str, Any] = {"model": name, "task": task, "kind": e["kind"]}
        if "scan_done" in ev:
            row["decision"] = ev["scan_done"]["report"]["decision"]
        mit = ev.get("mitigation_done", {}).get("report", {})
        if mit.get("clean_cost"):
            row["clean_cost"] = mit["clean_cost"]
        if mit:
            row |= {"escalated": mit.get("escalated"), "unmasked_check": mit.get("unmasked_check"),
                    "triggers": mit.get("triggers")}
        if "result" in ev:
            row["outcome"], row["reason"] = ev["result"].get("outcome"), ev["result"].get("reason", "")
        if "rescan_done" in ev:
            rep = ev["rescan_done"]["report"]
            row["rescan_score"] = rep["score"]
            row["rescan_min_probe"] = min((x["variance_ratio"] for x in rep.get("probes") or []), default=None)
            row["unmasked_after"] = ev["rescan_done"].get("unmasked_after")
        if "failed" in ev:
            row["failed"] = ev["failed"]
        if (out / "mitigated.onnx").exists():
            xte, yte = make_dataset(task, 500, size=int(e["size"]), seed=int(e.get("data_seed", 0)) + 10_000)
            attack = load_attack(d / "attack.npz")
            before = evaluate(load_onnx_model(d / "model.onnx"), xte, yte, task, attack=attack, device=a.device)
            after = evaluate(load_onnx_model(out / "mitigated.onnx"), xte, yte, task, attack=attack, device=a.device)
            row |= {k: [round(before[k], 2), round(after[k], 2)] for k in ("ae", "dae", "re")}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
