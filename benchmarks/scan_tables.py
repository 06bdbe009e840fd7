"""Scans every model of the zoo (``benchmarks/zoo.py``) and writes the paper's identification tables.

For each zoo model (loaded from its ONNX file through ``drmguard_engine.onnx_io``, as the service loads a
submitted model) and each requested profile, it runs ``drmguard_engine.scan`` on a benign set D_be drawn from the
same synthetic distribution as the model's training data (a seed the training never saw), caches the report by
content (model sha256, profile, overrides, D_be settings), and writes:

* ``scan_<profile>.md``: Tables 2-4 form per task (TP/FP/FN/TN, accuracy, ROC-AUC on ``score``), per attack and
  all attacks, and per model the diagnostics a safety engineer needs: the real trigger's L1 ratio beside the
  reversed one (strong = real ratio >= epsilon, subtle = below), the decisive statistic, and the distance between
  the estimated and the real target vector;
* ``scan_<profile>.json``: the raw rows.

Usage::

    .venv/bin/python benchmarks/scan_tables.py --zoo .bench/zoo --profiles default paper --out docs/results
    .venv/bin/python benchmarks/scan_tables.py --zoo .bench/zoo --profiles default --set use_fsrt=false --tag no_fsrt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from drmguard_engine.data.benign import BenignSet  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.metrics import roc_auc  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.scan import decide, get_profile, scan  # noqa: E402
from drmguard_engine.tasks import Task, per_sample_error  # noqa: E402


def _log(msg: str) -> None:
    print(f"[scan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def zoo_entries(zoo: Path) -> list[dict[str, Any]]:
    out = []
    for meta in sorted(zoo.rglob("meta.json")):
        m = json.loads(meta.read_text())
        m["dir"] = str(meta.parent)
        out.append(m)
    return out


def benign_set(task: str, size: int, n: int, seed: int) -> BenignSet:
    x, y = make_dataset(task, n, size=size, seed=seed)
    return BenignSet(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y))


def target_distance(task: str, est: list[float], real: list[float] | None) -> float | None:
    if real is None:
        return None
    return float(per_sample_error(Task.parse(task), torch.tensor([est]), torch.tensor([real]))[0])


def run(zoo: Path, out: Path, profiles: list[str], overrides: dict[str, Any], tag: str, n_benign: int,
        benign_seed: int, kinds: list[str] | None, tasks: list[str] | None,
        device: str = "cpu") -> dict[str, list[dict[str, Any]]]:
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    entries = [e for e in zoo_entries(zoo) if (kinds is None or e["kind"] in kinds)
               and (tasks is None or e["task"] in tasks)]
    _log(f"{len(entries)} zoo models, profiles {profiles}, overrides {overrides}")
    results: dict[str, list[dict[str, Any]]] = {}
    sets: dict[tuple[str, int], BenignSet] = {}
    for profile in profiles:
        rows = []
        for i, e in enumerate(entries):
            onnx_path = Path(e["dir"]) / "model.onnx"
            sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
            key = hashlib.sha256(json.dumps([sha, profile, overrides, n_benign, benign_seed],
                                            sort_keys=True).encode()).hexdigest()[:16]
            cpath = cache / f"{key}.json"
            if cpath.exists():
                rep = json.loads(cpath.read_text())
            else:
                task, size = e["task"], int(e["size"])
                if (task, size) not in sets:
                    sets[(task, size)] = benign_set(task, size, n_benign, benign_seed)
                model = load_onnx_model(onnx_path)
                cfg = get_profile(profile, task, **overrides)
                t0 = time.time()
                report = scan(model, sets[(task, size)], task, cfg, device=device)
                rep = report.to_dict()
                rep.pop("loss_history", None)
                rep["wall_seconds"] = time.time() - t0
                tmp = cpath.with_suffix(".tmp")
                tmp.write_text(json.dumps(rep, default=float))
                os.replace(tmp, cpath)
            # re-decide with the current rule (cached statistics, current thresholds)
            cfg = get_profile(profile, e["task"], **overrides)
            rep["score"], rep["score_threshold"], rep["decision"] = decide(
                cfg, rep["perturbation_ratio"], rep.get("output_variance_ratio", 1.0), rep.get("probes", []))
            rep["verdict"] = "backdoored" if rep["score"] >= rep["score_threshold"] else "benign"
            if rep.get("probes") and "probe" in rep["decision"]:
                rep["estimated_target"] = min(rep["probes"], key=lambda p: p["variance_ratio"])["collapse_point"]
            m = e.get("metrics", {})
            row = {
                "task": e["task"], "kind": e["kind"], "arch": e["arch"], "width": e["width"], "seed": e["seed"],
                "size": int(e.get("size", 64)),
                "backdoored": bool(e["backdoored"]), "real_trigger_ratio": m.get("real_trigger_ratio"),
                # a model whose backdoor did not implant (AE > 2x clean RE) carries no backdoor to find
                "implanted": (not e["backdoored"]) or (m.get("ae", 1e9) <= 2 * m.get("re", 0.0)),
                "clean_re": m.get("re"), "ae": m.get("ae"), "target": e.get("target"),
                "verdict": rep["verdict"], "score": rep["score"], "score_threshold": rep["score_threshold"],
                "perturbation_ratio": rep["perturbation_ratio"], "decision": rep["decision"],
                "estimated_target": rep["estimated_target"], "seconds": rep["seconds"],
                "output_variance_ratio": rep.get("output_variance_ratio"),
                "probes": {p["family"]: {"ratio": p["variance_ratio"], "drift": p["drift"],
                                         "point": p["collapse_point"]} for p in rep.get("probes", [])},
                "target_distance": target_distance(e["task"], rep["estimated_target"], e.get("target")),
                "model": str(onnx_path),
            }
            rows.append(row)
            _log(f"[{i + 1}/{len(entries)}] {profile}: {e['task']}/{e['kind']} {e['arch']} s{e['seed']}: "
                 f"{row['verdict']} score {row['score']:.3f} ratio {row['perturbation_ratio']:.4f} "
                 f"probes {({k: round(v['ratio'], 4) for k, v in row['probes'].items()})} ({row['seconds']:.0f}s)")
        name = profile if not tag else f"{profile}_{tag}"
        results[name] = rows
        (out / f"scan_{name}.json").write_text(json.dumps(rows, indent=1, default=float))
        (out / f"scan_{name}.md").write_text(tables(rows, name, overrides))
        _log(f"wrote {out / f'scan_{name}.md'}")
    return results


def confusion(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tp = sum(r["backdoored"] and r["verdict"] == "backdoored" for r in rows)
    fn = sum(r["backdoored"] and r["verdict"] != "backdoored" for r in rows)
    fp = sum((not r["backdoored"]) and r["verdict"] == "backdoored" for r in rows)
    tn = sum((not r["backdoored"]) and r["verdict"] != "backdoored" for r in rows)
    n = max(1, tp + fn + fp + tn)
    auc: float | None = None
    if any(r["backdoored"] for r in rows) and any(not r["backdoored"] for r in rows):
        auc = roc_auc([r["score"] for r in rows], [r["backdoored"] for r in rows])
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "accuracy": (tp + tn) / n, "auc": auc}


def _f(v: Any, p: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def tables(rows: list[dict[str, Any]], name: str, overrides: dict[str, Any]) -> str:
    sizes = sorted({int(r.get("size", 64)) for r in rows})
    lines = [f"# Identification on the synthetic {'/'.join(f'{z}x{z}' for z in sizes)} zoo: profile `{name}`", ""]
    if overrides:
        lines += [f"Overrides: `{json.dumps(overrides)}`", ""]
    lines += ["Tables 2-4 form. Positive = backdoored. ROC-AUC on the report's `score`. 'vs benign' rows pair the "
              "attack's models with all benign models of the task.", ""]
    dropped = [r for r in rows if not r.get("implanted", True)]
    rows = [r for r in rows if r.get("implanted", True)]
    if dropped:
        lines += ["Left out (the attack did not implant: AE > 2x clean RE, so there is no backdoor to find): "
                  + ", ".join(f"{r['task']}/{r['kind']} s{r['seed']} (AE {_f(r['ae'], 1)}, RE {_f(r['clean_re'], 1)}; "
                              f"verdict {r['verdict']})" for r in dropped), ""]
    for task in sorted({r["task"] for r in rows}):
        tr = [r for r in rows if r["task"] == task]
        ben = [r for r in tr if not r["backdoored"]]
        c = confusion(tr)
        lines += [f"## {task}", "", "| attack | models | TP | FP | FN | TN | accuracy | ROC-AUC (vs benign) |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind in sorted({r["kind"] for r in tr if r["backdoored"]}):
            kr = [r for r in tr if r["kind"] == kind]
            ck = confusion(kr + ben)
            lines.append(f"| {kind} | {len(kr)} | {ck['tp']} | {ck['fp']} | {ck['fn']} | {ck['tn']} | "
                         f"{_f(ck['accuracy'], 2)} | {_f(ck['auc'])} |")
        lines.append(f"| **all** | {len(tr)} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} | "
                     f"**{_f(c['accuracy'], 2)}** | **{_f(c['auc'])}** |")
        lines += ["", "Per model (strong trigger: real-trigger L1 ratio >= epsilon 0.03; subtle: below):", "",
                  "| kind | arch | seed | trigger | real ratio | reversed ratio | probe ratios (blend/patch/warp) | "
                  "score | verdict | decided by | target distance (deg) | clean RE |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(tr, key=lambda r: (r["backdoored"], r["kind"], r["arch"], r["seed"])):
            rr = r["real_trigger_ratio"]
            trig = "-" if not r["backdoored"] else ("strong" if rr is not None and rr >= 0.03 else "subtle")
            pr = "/".join(_f(r["probes"].get(k, {}).get("ratio"), 3) for k in ("blend", "patch", "warp"))
            ok = "ok" if (r["verdict"] == "backdoored") == r["backdoored"] else "**wrong**"
            lines.append(f"| {r['kind']} | {r['arch']} w{r['width']:g} | {r['seed']} | {trig} | {_f(rr, 4)} | "
                         f"{_f(r['perturbation_ratio'], 4)} | {pr} | {_f(r['score'], 2)} | {r['verdict']} ({ok}) | "
                         f"{r['decision']} | {_f(r['target_distance'], 1)} | {_f(r['clean_re'], 2)} |")
        secs = [r["seconds"] for r in tr]
        lines += ["", f"Scan time per model: mean {np.mean(secs):.0f} s, max {np.max(secs):.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "zoo")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--profiles", nargs="+", default=["default"])
    p.add_argument("--set", action="append", default=[], metavar="OPTION=JSON", help="scan option override")
    p.add_argument("--tag", default="", help="suffix for the output files (ablations)")
    p.add_argument("--n-benign", type=int, default=400, help="size of D_be (default 400)")
    p.add_argument("--benign-seed", type=int, default=777)
    p.add_argument("--kinds", nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where to scan: cpu (default) or cuda (the cache key ignores it)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides: dict[str, Any] = {}
    for item in a.set:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    run(a.zoo, a.out, a.profiles, overrides, a.tag, a.n_benign, a.benign_seed, a.kinds, a.tasks, a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
