"""The rigidity check's two reductions, side by side on every saved scan report that kept its control errors.

``probes.probe_rigidity`` fits the flagged probe towards its collapse point and towards 4 control points
around it; ``rigidity`` is the controls' error over the collapse point's. This reads saved default-profile
reports (each probe's ``rigidity`` entry keeps ``collapse_error`` and ``control_errors``), reduces the
control errors both ways (``probes.rigidity_of``: "mean", the form first shipped, and "median", the default
since 2026-11-27), decides each report again with ``scan.decide`` under the default profile, and prints one
row per model plus the accuracy of each form. Nothing is re-fitted, so the two columns come from exactly the
same fits. Reports whose scan ran no rigidity check (no probe below the threshold) decide the same either
way and are left out.

A report's truth comes from its file name: "benign" or "clean" in the name is a clean model, anything else a
backdoored one.

Usage::

    .venv/bin/python benchmarks/rigidity_statistic.py                      # docs/results/**/*.json
    .venv/bin/python benchmarks/rigidity_statistic.py R1.json R2.json ... --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drmguard_engine.defenses.probes import RIGIDITY_STATISTICS, rigidity_of  # noqa: E402
from drmguard_engine.scan import decide, get_profile  # noqa: E402


def _reports(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in paths:
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(r, dict) or not isinstance(r.get("probes"), list):
                continue
            if r.get("profile", "default") != "default" or "output_variance_ratio" not in r:
                continue
            if any("control_errors" in (d.get("rigidity") or {}) for d in r["probes"]):
                out.append((f, r))
    return out


def redecide(report: dict[str, Any], statistic: str) -> tuple[float, str, dict[str, float]]:
    """``(score, why, {family: rigidity})`` of a saved default-profile report, its rigidity reduced by
    ``statistic``."""
    cfg = get_profile("default", report.get("task", "gaze"))
    probes, rig = [], {}
    for d in report["probes"]:
        d = dict(d)
        r = d.get("rigidity")
        if r and "control_errors" in r:
            value = rigidity_of(r["collapse_error"], r["control_errors"], statistic)
            d["rigidity"] = {**r, "rigidity": value}
            rig[d["family"]] = value
        probes.append(d)
    score, _, why = decide(cfg, report["perturbation_ratio"], report["output_variance_ratio"], probes)
    return score, why, rig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, default=[ROOT / "docs" / "results"])
    ap.add_argument("--json", type=Path, default=None, help="also write one JSON row per report here")
    a = ap.parse_args(argv)
    rows = []
    for f, r in _reports(a.paths):
        name = str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)
        clean = "benign" in f.name or "clean" in f.name
        row: dict[str, Any] = {"report": name, "backdoored": not clean}
        for stat in RIGIDITY_STATISTICS:
            score, why, rig = redecide(r, stat)
            row[stat] = {"score": score, "verdict": "backdoored" if score >= 1 else "benign",
                         "rigidity": rig, "decision": why}
        rows.append(row)
    if not rows:
        print("no default-profile reports with control errors under " + ", ".join(map(str, a.paths)))
        return 1
    heads = " | ".join(f"{s}: rigidity | {s}: score, verdict" for s in RIGIDITY_STATISTICS)
    print(f"| report | truth | {heads} |")
    print("|---|---|" + "---|---|" * len(RIGIDITY_STATISTICS))
    for row in rows:
        cells = []
        for s in RIGIDITY_STATISTICS:
            rig = ", ".join(f"{k} {v:.2f}" for k, v in row[s]["rigidity"].items())
            ok = row[s]["verdict"] == ("backdoored" if row["backdoored"] else "benign")
            cells += [rig, f"{row[s]['score']:.2f} {row[s]['verdict']}{'' if ok else ' (**wrong**)'}"]
        truth = "backdoored" if row["backdoored"] else "clean"
        print(f"| {row['report']} | {truth} | " + " | ".join(cells) + " |")
    print()
    for s in RIGIDITY_STATISTICS:
        right = sum(r[s]["verdict"] == ("backdoored" if r["backdoored"] else "benign") for r in rows)
        fp = sum(r[s]["verdict"] == "backdoored" and not r["backdoored"] for r in rows)
        fn = sum(r[s]["verdict"] == "benign" and r["backdoored"] for r in rows)
        print(f"{s}: {right}/{len(rows)} right, {fp} false positives, {fn} false negatives")
    if a.json:
        a.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
