"""How well the service's clean-error check reads what a mitigation really costs: one hold-out split against K-fold
cross-validation (``drmguard_engine.clean_cost``), each beside the rise measured on a large test set.

For each backdoored zoo model that the default scan flags and the service would repair (deciding probe ratio at most
0.01), on the service's D_be (400 images, seed 777):

* ``split``: the old check. The model is mitigated on 80% of D_be (the service's seeded split) and its rise is
  read on the 20% held back (80 images); ``split_test`` is the same model's rise on the test set.
* ``cv``: the rise estimated by ``folds``-fold cross-validation over all 400 images, with its 95% interval;
  ``final_test`` is the rise, on the test set, of the model mitigated on all of D_be (the one the new check serves).
* AE / DAE of that final model with the real trigger, so a cheaper repair is not one that kept the backdoor.

The test set holds ``--n-test`` images (default 2,000) drawn with a seed neither the zoo nor D_be used.

Usage::

    .venv/bin/python benchmarks/clean_cost.py --zoo .bench/zoo --out docs/results/clean_cost.jsonl
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.zoo_repairs import backdoored_models  # noqa: E402
from drmguard_engine.clean_cost import cross_validated_cost  # noqa: E402
from drmguard_engine.scan import mitigate, mitigation_config, repeat_config  # noqa: E402
from drmguard_engine.training import evaluate  # noqa: E402
from guard_server.worker import split_holdout  # noqa: E402


def _rise(before: float, after: float) -> float:
    return round(after / before - 1.0, 4)


def _write(path: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "zoo")
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per model (appended)")
    p.add_argument("--only", default="", help="comma-separated substrings of the model's path")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", default="default", help="the scan profile (fast: a dry run)")
    p.add_argument("--mitigate-steps", type=int, default=0, help="0: MitigationConfig's default (a dry run: fewer)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["model"] for line in a.out.read_text().splitlines()} if a.out.exists() else set()
    for z in backdoored_models(a.zoo, only=a.only, skip=done, profile=a.profile, device=a.device):
        t0 = time.time() - z.scan_seconds
        model, benign, task, report = z.model, z.benign, z.task, z.report
        buf = io.BytesIO()  # the bytes a registry would upload: the service seeds its split with their sha256
        np.savez(buf, images=(benign.images.numpy() * 255).round().astype(np.uint8), labels=benign.labels.numpy())
        train_idx, hold_idx = split_holdout(len(benign), 0.2, hashlib.sha256(buf.getvalue()).hexdigest())
        row = {"model": z.name, "task": task, "kind": z.kind, "verdict": report.verdict, "scan_seconds": z.scan_seconds}
        if z.refusal:
            _write(a.out, row | {"skipped": z.refusal[:120]})
            continue
        xte, yte = z.test_set(a.n_test)
        attack = z.attack()
        orig = evaluate(model, xte, yte, task, attack=attack, device=a.device)
        mcfg = mitigation_config(None, report)
        if a.mitigate_steps:
            mcfg = dataclasses.replace(mcfg, steps=a.mitigate_steps)
        t1 = time.time()
        split_model, srep = mitigate(copy.deepcopy(model), benign.subset(train_idx), task, report=report,
                                     config=mcfg, holdout=benign.subset(hold_idx), device=a.device)
        row["split_seconds"] = round(time.time() - t1, 1)
        split_test = evaluate(split_model, xte, yte, task, device=a.device)["re"]
        row |= {"split": _rise(srep.clean_error_before, srep.clean_error_after), "split_test": _rise(orig["re"],
                                                                                                    split_test)}
        final, frep = mitigate(copy.deepcopy(model), benign, task, report=report, config=mcfg, device=a.device)
        fin = evaluate(final, xte, yte, task, attack=attack, device=a.device)
        # the folds repeat the served repair's recipe (with the unmasked probes where it escalated), as the service
        cost = cross_validated_cost(model, benign, task, report=report, config=repeat_config(mcfg, frep),
                                    folds=a.folds, device=a.device)
        row |= {"cv": round(cost.rise, 4), "cv_low": round(cost.rise_low, 4), "cv_high": round(cost.rise_high, 4),
                "cv_folds": [round(r, 4) for r in cost.fold_rises], "cv_seconds": round(cost.seconds, 1),
                "escalated": frep.escalated}
        row |= {"final_test": _rise(orig["re"], fin["re"]), "re": [round(orig["re"], 3), round(fin["re"], 3)],
                "ae": [round(orig["ae"], 2), round(fin["ae"], 2)], "dae": [round(orig["dae"], 2), round(fin["dae"], 2)],
                "seconds": round(time.time() - t0, 1)}
        _write(a.out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
