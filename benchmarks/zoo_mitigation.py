"""Scans and mitigates the backdoored models of a zoo (``benchmarks/zoo.py``) as the service would, and scores
each with its real trigger: the paper's Table 5 form (AE, DAE and clean RE before and after), one JSON line per
model, then a Markdown table.

D_be is drawn from the zoo's synthetic distribution with a seed its training never saw; 20% of it is held back
to measure clean error (as the service's ``--holdout-fraction``). Each model is scanned with the default
profile; a model the scan calls benign is not mitigated (its row says so). The goals are the issue's: DAE within
2x the model's clean RE, and clean RE up by at most 10%.

Usage::

    .venv/bin/python benchmarks/zoo_mitigation.py --zoo /tmp/z224/zoo --device cuda --out /tmp/z224/res
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scan_tables import benign_set  # noqa: E402
from drmguard_engine.attacks import load_attack  # noqa: E402
from drmguard_engine.data.benign import BenignSet  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.scan import mitigate, scan  # noqa: E402
from drmguard_engine.training import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-benign", type=int, default=400)
    p.add_argument("--benign-seed", type=int, default=777)
    p.add_argument("--n-test", type=int, default=500)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    # D_be (split into fit / hold-out) and the test set, made once per (task, size, data seed)
    sets: dict[tuple[Any, ...], tuple[BenignSet, BenignSet, np.ndarray, np.ndarray]] = {}
    for meta_path in sorted(a.zoo.rglob("meta.json")):
        e = json.loads(meta_path.read_text())
        if not e["backdoored"]:
            continue
        d, task, size = meta_path.parent, e["task"], int(e["size"])
        key = (task, size, int(e.get("data_seed", 0)))
        if key not in sets:
            bset = benign_set(task, size, a.n_benign, a.benign_seed)
            n_hold = max(1, round(0.2 * len(bset)))
            xte, yte = make_dataset(task, a.n_test, size=size, seed=key[2] + 10_000)  # the zoo's own test set
            sets[key] = (bset.subset(np.arange(n_hold, len(bset))), bset.subset(np.arange(n_hold)), xte, yte)
        train_set, hold, xte, yte = sets[key]
        attack = load_attack(d / "attack.npz")
        model = load_onnx_model(d / "model.onnx")
        before = evaluate(model, xte, yte, task, attack=attack, device=a.device)
        t0 = time.time()
        report = scan(model, train_set, task, "default", device=a.device)
        row = {"task": task, "kind": e["kind"], "size": size, "width": e["width"], "seed": e["seed"],
               "verdict": report.verdict, "decision": report.decision, "scan_seconds": round(time.time() - t0, 1),
               "re_before": before["re"], "ae_before": before["ae"], "dae_before": before["dae"]}
        if report.verdict == "backdoored":
            t1 = time.time()
            fixed, mrep = mitigate(model, train_set, task, report=report, holdout=hold, device=a.device)
            after = evaluate(fixed, xte, yte, task, attack=attack, device=a.device)
            row |= {"re_after": after["re"], "ae_after": after["ae"], "dae_after": after["dae"],
                    "mitigate_seconds": round(time.time() - t1, 1), "triggers": mrep.triggers,
                    "dae_goal": after["dae"] <= 2 * before["re"], "re_goal": after["re"] <= 1.1 * before["re"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (a.out / "mitigation.json").write_text(json.dumps(rows, indent=1))
    lines = ["| attack | verdict | AE before | DAE before | RE before | AE after | DAE after | RE after | "
             "DAE <= 2 RE | RE +<=10% |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        g = lambda k: ("yes" if r[k] else "**no**") if k in r else "-"  # noqa: E731
        lines.append(f"| {r['kind']} | {r['verdict']} | {f('ae_before')} | {f('dae_before')} | {f('re_before')} | "
                     f"{f('ae_after')} | {f('dae_after')} | {f('re_after')} | {g('dae_goal')} | {g('re_goal')} |")
    (a.out / "mitigation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
