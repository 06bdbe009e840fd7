"""When to unlearn the unmasked probes: the served repair with and without them, per zoo model.

After a probe-decided backdoored verdict, mitigation also fits the blend/smooth probes without the scan's eye-region
exclusion and unlearns what they find when the deciding probe's ratio is above ``MitigationConfig.unmasked_above``
(default 0.01). The service repairs only models whose deciding ratio is at most 0.01, so at 0.01 alone it never fits
them there; at 0 it always does (a second trigger read through the eyes would be unlearned too); ``check`` (the
default since round 19, ``MitigationConfig.unmasked_check``) repairs at 0.01, fits the unmasked probes on the repaired
model, and repairs the submitted model again with them only where one still collapses it. For each backdoored zoo
model the service would repair, this scans it once (``default``, D_be = 400 images, seed 777), mitigates it on all
of D_be at each ``--settings`` value, and reads the repaired model on ``--n-test`` fresh images: clean error (RE)
rise, AE and DAE with the real trigger, the triggers unlearned, whether the check escalated, the seconds.

Usage::

    .venv/bin/python benchmarks/unmasked_cost.py --zoo .bench/zoo --out docs/results/unmasked_cost.jsonl
    .venv/bin/python benchmarks/unmasked_cost.py --settings 0 --cv-folds 5 --no-final \
        --out docs/results/unmasked_cv.jsonl

``--cv-folds`` adds the service's cross-validated estimate (what admission decides on; the folds side by side,
repeating the served repair's recipe).
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

from benchmarks.zoo_repairs import backdoored_models  # noqa: E402
from drmguard_engine.clean_cost import cross_validated_cost  # noqa: E402
from drmguard_engine.cli import parse_overrides  # noqa: E402
from drmguard_engine.parallel import side_by_side  # noqa: E402
from drmguard_engine.scan import MitigationConfig, mitigate, mitigation_config, repeat_config  # noqa: E402
from drmguard_engine.training import evaluate  # noqa: E402


def _config(setting: str, base: MitigationConfig, overrides: list[str]) -> MitigationConfig:
    fields = parse_overrides(overrides, "--mitigation")
    if setting == "check":
        return dataclasses.replace(base, unmasked_check=True, **fields)
    return dataclasses.replace(base, unmasked_above=float(setting), unmasked_check=False, **fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "zoo")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per model and setting (appended)")
    p.add_argument("--settings", default="0.01,0,check",
                   help="unmasked_above values (the repair alone), or 'check' (the default: 0.01, then the unmasked "
                        "probes fitted on the repaired model and a second repair with them where one survived)")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="processes sharing the cores (pieces side by side: cores/jobs)")
    p.add_argument("--only", default="", help="comma-separated substrings of the model's path")
    p.add_argument("--cv-folds", type=int, default=0,
                   help="also the service's cross-validated estimate with this many folds (0: off)")
    p.add_argument("--mitigation", nargs="*", default=[], metavar="KEY=VALUE",
                   help="MitigationConfig fields for every setting (e.g. extra_seeds=2)")
    p.add_argument("--no-final", action="store_true", help="skip the test-set reading of the repair on all of D_be")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    side = side_by_side(a.threads, jobs=a.jobs)
    settings = a.settings.split(",")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for z in backdoored_models(a.zoo, only=a.only, workers=side):
        model, benign, task, report = z.model, z.benign, z.task, z.report
        if z.refusal:
            print(f"{z.name}: skipped ({z.refusal[:80]})", flush=True)
            continue
        xte, yte = z.test_set(a.n_test)
        attack = z.attack()
        orig = evaluate(model, xte, yte, task, attack=attack)
        for setting in settings:
            t1 = time.time()
            mcfg = _config(setting, mitigation_config(None, report), a.mitigation)
            row = {"model": z.name, "task": task, "kind": z.kind, "mitigation": a.mitigation,
                   "unmasked_above": mcfg.unmasked_above,
                   "unmasked_check": mcfg.unmasked_check, "decision": report.decision[:60],
                   "scan_seconds": z.scan_seconds}
            fixed, mrep = mitigate(copy.deepcopy(model), benign, task, report=report, config=mcfg)
            row |= {"escalated": mrep.escalated, "check": mrep.unmasked_check, "seconds": round(time.time() - t1, 1)}
            if not a.no_final:
                fin = evaluate(fixed, xte, yte, task, attack=attack)
                row |= {"triggers": mrep.triggers, "re": [round(orig["re"], 3), round(fin["re"], 3)],
                        "rise": round(fin["re"] / orig["re"] - 1, 4),
                        "ae": [round(orig["ae"], 2), round(fin["ae"], 2)],
                        "dae": [round(orig["dae"], 2), round(fin["dae"], 2)]}
            if a.cv_folds:  # the folds repeat the served repair's recipe, as the service does
                cost = cross_validated_cost(model, benign, task, report=report, config=repeat_config(mcfg, mrep),
                                            folds=a.cv_folds, workers=side)
                row |= {"cv": round(cost.rise, 4), "cv_low": round(cost.rise_low, 4),
                        "cv_high": round(cost.rise_high, 4), "cv_seconds": round(cost.seconds, 1)}
            print(json.dumps(row), flush=True)
            with a.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
