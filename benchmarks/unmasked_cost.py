"""What ``--mitigate-unmasked-above 0`` costs: the served repair with and without the unmasked probes, per zoo model.

After a probe-decided backdoored verdict, mitigation also fits the blend/smooth probes without the scan's eye-region
exclusion and unlearns what they find when the deciding probe's ratio is above ``MitigationConfig.unmasked_above``
(default 0.01). The service repairs only models whose deciding ratio is at most 0.01, so by default it never fits
them there; at 0 it always does (a second trigger read through the eyes would be unlearned too). For each backdoored
zoo model the service would repair, this scans it once (``default``, D_be = 400 images, seed 777), mitigates it on
all of D_be at each ``--settings`` value, and reads the repaired model on ``--n-test`` fresh images: clean error
(RE) rise, AE and DAE with the real trigger, the triggers unlearned, the seconds.

Usage::

    .venv/bin/python benchmarks/unmasked_cost.py --zoo .bench/zoo --out docs/results/unmasked_cost.jsonl
    .venv/bin/python benchmarks/unmasked_cost.py --settings 0 --cv-folds 5 --no-final \
        --out docs/results/unmasked_cv.jsonl

``--cv-folds`` adds the service's cross-validated estimate (what admission decides on; the folds side by side).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scan_tables import benign_set  # noqa: E402
from drmguard_engine.attacks import load_attack  # noqa: E402
from drmguard_engine.clean_cost import cross_validated_cost  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.parallel import side_by_side  # noqa: E402
from drmguard_engine.scan import mitigate, mitigation_config, scan  # noqa: E402
from drmguard_engine.training import evaluate  # noqa: E402
from guard_server.policy import mitigation_refusal  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "zoo")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per model and setting (appended)")
    p.add_argument("--settings", default="0.01,0", help="unmasked_above values (default 0.01,0)")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated substrings of the model's path")
    p.add_argument("--cv-folds", type=int, default=0,
                   help="also the service's cross-validated estimate with this many folds (0: off)")
    p.add_argument("--no-final", action="store_true", help="skip the repair on all of D_be and its test-set reading")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    side = side_by_side(a.threads)
    settings = [float(v) for v in a.settings.split(",")]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for meta in sorted(a.zoo.rglob("meta.json")):
        e = json.loads(meta.read_text())
        d, task, size = meta.parent, e["task"], int(e["size"])
        if not e["backdoored"] or (a.only and not any(v in str(meta) for v in a.only.split(","))):
            continue
        t0 = time.time()
        benign = benign_set(task, size, 400, 777)
        model = load_onnx_model(d / "model.onnx")
        report = scan(model, benign, task, "default", workers=side)
        name = f"{task}-{e['kind']}-{d.name}"
        refusal = mitigation_refusal(report.to_dict(), 0.01) if report.verdict == "backdoored" else "not flagged"
        if refusal:
            print(f"{name}: skipped ({refusal[:80]})", flush=True)
            continue
        xte, yte = make_dataset(task, a.n_test, size=size, seed=int(e.get("data_seed", 0)) + 20_000)
        attack = load_attack(d / "attack.npz")
        orig = evaluate(model, xte, yte, task, attack=attack)
        for above in settings:
            t1 = time.time()
            mcfg = dataclasses.replace(mitigation_config(None, report), unmasked_above=above)
            row = {"model": name, "task": task, "kind": e["kind"], "unmasked_above": above,
                   "decision": report.decision[:60], "scan_seconds": round(t1 - t0, 1)}
            if not a.no_final:
                fixed, mrep = mitigate(copy.deepcopy(model), benign, task, report=report, config=mcfg)
                fin = evaluate(fixed, xte, yte, task, attack=attack)
                row |= {"triggers": mrep.triggers, "re": [round(orig["re"], 3), round(fin["re"], 3)],
                        "rise": round(fin["re"] / orig["re"] - 1, 4),
                        "ae": [round(orig["ae"], 2), round(fin["ae"], 2)],
                        "dae": [round(orig["dae"], 2), round(fin["dae"], 2)], "seconds": round(time.time() - t1, 1)}
            if a.cv_folds:
                cost = cross_validated_cost(model, benign, task, report=report, config=mcfg, folds=a.cv_folds,
                                            workers=side)
                row |= {"cv": round(cost.rise, 4), "cv_low": round(cost.rise_low, 4),
                        "cv_high": round(cost.rise_high, 4), "cv_seconds": round(cost.seconds, 1)}
            print(json.dumps(row), flush=True)
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
