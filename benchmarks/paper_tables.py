"""Regenerates the paper's tables (2-9, 11-15) on the synthetic 64x64 zoo, side by side with the baselines.

One command (``make paper-tables``) runs, on every model of the zoo built by ``benchmarks/zoo.py``:

* identification: DRMGuard in the ``default`` profile and in a budget-reduced ``paper`` profile (labelled
  ``paper@<steps>``: the paper's method and hyperparameters, fewer steps, because the paper's 5,000 + 2,000 steps take
  about 11 h per model on this CPU), Neural Cleanse and FeatureRE generalised to regression (the registry in
  ``drmguard_engine.defenses.registry``): Tables 2-4, 9 (adaptive attack), 11 (multi-target WaNet), 12 (other
  architectures) and 14 (Blend, SIG), with TP/FP/FN/TN, accuracy and ROC-AUC;
* mitigation: DRMGuard, Fine-tuning, Fine-pruning and ANP on each implanted backdoored model, AE / DAE / clean RE
  measured with the model's *real* trigger on the zoo's test set: Tables 5, 6, 13, 15;
* ablations: lambda1, lambda2, the size of D_be (Table 7) and without FSRT / MTR (Table 8).

Everything is cached by content under ``<out>/cache`` (the model's sha256, the method's full configuration, the D_be
settings), so a stopped run resumes where it stopped and a changed setting recomputes only what it changes. A scan is
cached per component (DRMGuard's reverse engineering; each probe family), so ablations and decision-rule changes
reuse what they can. Tables and plots go to ``<out>`` (``docs/results`` by default): ``paper_tables.md`` and PNGs.

Usage::

    .venv/bin/python benchmarks/paper_tables.py --quick --out /tmp/pt     # tiny zoo, tiny budgets: minutes (CI)
    .venv/bin/python benchmarks/paper_tables.py                           # the full size on .bench/zoo (hours)
    .venv/bin/python benchmarks/paper_tables.py --sections identification mitigation --tasks gaze
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from scan_tables import benign_set, confusion, target_distance, zoo_entries  # noqa: E402

from drmguard_engine.attacks import load_attack  # noqa: E402
from drmguard_engine.data.benign import BenignSet  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.defenses.probes import probe_rigidity, run_probes  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402
from drmguard_engine.scan import (  # noqa: E402
    MitigationConfig,
    ScanConfig,
    ScanReport,
    decide,
    deciding_family,
    get_profile,
    mitigate,
    needs_rigidity,
    needs_unmasked,
    scan,
)
from drmguard_engine.training import evaluate  # noqa: E402

SECTIONS = ("identification", "baselines", "mitigation", "ablations")
BENIGN_SEED = 777  # D_be: the synthetic distribution, a seed the training never saw
HOLDOUT_SEED = 778  # the mitigation hold-out (tolerances), never trained on
EPS = 0.03


def _probe_key(e: dict[str, Any], pc: Any, n: int) -> list[Any]:
    """A probe's cache key: the model, D_be and the probe's config without the rigidity check's knobs (they do not
    change the probe)."""
    d = json.loads(json.dumps(pc.__dict__, default=float))
    return ["probe", e["sha"], {k: v for k, v in d.items() if not k.startswith("rigidity_")}, n, BENIGN_SEED]


def _log(msg: str) -> None:
    print(f"[tables {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Cache:
    """JSON results under ``root``, one file per content key, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get_or(self, key_obj: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.root / f"{_key(key_obj)}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        self.put(key_obj, value)
        return value

    def path(self, key_obj: Any, suffix: str = ".json") -> Path:
        return self.root / f"{_key(key_obj)}{suffix}"

    def put(self, key_obj: Any, value: dict[str, Any]) -> None:
        path = self.root / f"{_key(key_obj)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, default=float))
        os.replace(tmp, path)


class Bench:
    """The zoo, its data and the cached computations on it."""

    def __init__(
        self,
        zoo_dirs: list[Path],
        out: Path,
        *,
        n_benign: int,
        paper_steps: int,
        baseline_steps: int | None,
        cache: Path | None = None,
        paper_models: int = 2,
        quick: bool,
    ) -> None:
        self.entries = [e for z in zoo_dirs if z.exists() for e in zoo_entries(z)]
        for e in self.entries:
            m = e.get("metrics", {})
            e["implanted"] = (not e["backdoored"]) or m.get("ae", 1e9) <= 2 * m.get("re", 0.0)
            e["sha"] = hashlib.sha256((Path(e["dir"]) / "model.onnx").read_bytes()).hexdigest()
            # the tables group models by task and data: the synthetic zoo is "gaze", a real one "gaze/mpiifacegaze"
            ds = e.get("dataset", "synthetic")
            e["group"] = e["task"] if ds == "synthetic" else f"{e['task']}/{ds}"
        self.out, self.n_benign, self.quick = out, n_benign, quick
        self.paper_steps, self.baseline_steps = paper_steps, baseline_steps
        self.paper_models = paper_models
        self.cache = Cache(cache or out / "cache")
        self._sets: dict[tuple[str, int, int, int], BenignSet] = {}

    # ------------------------------------------------------------------------------------------ data & models
    def dbe(self, task: str, size: int, n: int | None = None, seed: int = BENIGN_SEED) -> BenignSet:
        k = (task, size, n or self.n_benign, seed)
        if k not in self._sets:
            self._sets[k] = benign_set(task, size, k[2], seed)
        return self._sets[k]

    def dbe_e(self, e: dict[str, Any], n: int | None = None) -> BenignSet:
        """D_be for a model: fresh synthetic images, or the first 80% of a real dataset's benign split (the rest
        is the mitigation hold-out); ``n`` caps it (the D_be-size ablation)."""
        if e.get("dataset", "synthetic") == "synthetic":
            return self.dbe(e["task"], int(e["size"]), n)
        x, y = self._real_benign(e)
        k = max(4, int(len(x) * 0.8))
        k = min(k, n) if n and n < self.n_benign else k
        return BenignSet(torch.from_numpy(x[:k]).float() / 255.0, torch.from_numpy(y[:k]))

    def _real_benign(self, e: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        from zoo import real_splits

        _, be, _ = real_splits(e["dataset"], e["data_root"], int(e["size"]), int(e["data_seed"]),
                               int(e.get("max_images", 0)))
        return be

    def holdout(self, e: dict[str, Any]) -> BenignSet:
        if e.get("dataset", "synthetic") != "synthetic":
            x, y = self._real_benign(e)
            k = max(4, int(len(x) * 0.8))
            return BenignSet(torch.from_numpy(x[k:]).float() / 255.0, torch.from_numpy(y[k:]))
        return self.dbe(e["task"], int(e["size"]), max(50, self.n_benign // 2), HOLDOUT_SEED)

    def test_set(self, e: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if e.get("dataset", "synthetic") != "synthetic":
            from zoo import real_splits

            return real_splits(e["dataset"], e["data_root"], int(e["size"]), int(e["data_seed"]),
                               int(e.get("max_images", 0)))[2]
        return make_dataset(
            e["task"], int(e["n_test"]), size=int(e["size"]), seed=int(e["data_seed"]) + 10_000
        )

    def model(self, e: dict[str, Any]) -> Any:
        # a fresh import every time: mitigation changes the weights in place
        return load_onnx_model(Path(e["dir"]) / "model.onnx")

    # ------------------------------------------------------------------------------------------ scan components
    def paper_profile(self, task: str, **over: Any) -> ScanConfig:
        """The paper's method and hyperparameters at a reduced step budget (``paper@<steps>``)."""
        steps = self.paper_steps
        return get_profile("paper", task, steps=steps, pretrain_steps=steps, **over)

    def profile(self, name: str, task: str, over: dict[str, Any]) -> ScanConfig:
        if name == "paper":
            return self.paper_profile(task, **over)
        cfg = get_profile(name, task, **over)
        if self.quick:  # CI size: the pipeline, not the science
            cfg = get_profile(name, task, **{"steps": 30, "probe_steps": 30, **over})
        return cfg

    def reverse(self, e: dict[str, Any], cfg: ScanConfig, n: int) -> dict[str, Any]:
        dg = json.loads(json.dumps(cfg.to_dict()["drmguard"], default=float))
        key = ["reverse", e["sha"], dg, n, BENIGN_SEED]

        def compute() -> dict[str, Any]:
            return self._run_reverse(e, cfg, n, key)

        return self.cache.get_or(key, compute)

    def _run_reverse(self, e: dict[str, Any], cfg: ScanConfig, n: int, key: Any) -> dict[str, Any]:
        _log(
            f"  reverse engineering {self.name(e)} ({cfg.drmguard.pretrain_steps}+{cfg.drmguard.steps} steps)"
        )
        t0 = time.perf_counter()
        rep = scan(
            self.model(e),
            self.dbe_e(e, n),
            e["task"],
            ScanConfig(cfg.profile, cfg.drmguard, None, "epsilon"),
        )
        assert rep.reverse is not None
        # the generator is kept (weights only, npz) so mitigation can rebuild D_rp without scanning again
        _save_state(self.cache.path(key, ".gen.npz"), rep.reverse.generator)
        return {
            "perturbation_ratio": rep.perturbation_ratio,
            "output_variance_ratio": rep.output_variance_ratio,
            "rav": rep.rav,
            "rnv": rep.rnv,
            "drmguard_target": rep.drmguard_target,
            "seconds": time.perf_counter() - t0,
        }

    def probe(self, e: dict[str, Any], cfg: ScanConfig, family: str, n: int) -> dict[str, Any]:
        assert cfg.probes is not None
        pc = cfg.probes.replace(families=(family,))
        key = _probe_key(e, pc, n)

        def compute() -> dict[str, Any]:
            _log(f"  probe {family} on {self.name(e)}")
            r = run_probes(self.model(e), self.dbe_e(e, n).images, pc)[0]
            assert r.transform is not None
            # the transform is kept (weights only, npz) so mitigation can rebuild D_rp without scanning again
            _save_state(self.cache.path(key, ".probe.npz"), r.transform)
            return {
                "family": r.family,
                "variance_ratio": r.variance_ratio,
                "fit_variance_ratio": r.fit_variance_ratio,
                "collapse_point": r.collapse_point,
                "drift": r.drift,
                "perturbation_ratio": r.perturbation_ratio,
                "seconds": r.seconds,
            }

        if self.cache.path(key).exists() and not self.cache.path(key, ".probe.npz").exists():
            self.cache.path(key).unlink()  # cached before transforms were kept: compute again
        return self.cache.get_or(key, compute)

    def rigidity(self, e: dict[str, Any], cfg: ScanConfig, probe: dict[str, Any], n: int) -> dict[str, Any]:
        """The rigidity check of a flagged probe (cached like the probe itself), started from its cached transform."""
        from drmguard_engine.defenses.probes import _Probe

        assert cfg.probes is not None
        pc = cfg.probes.replace(families=(probe["family"],))
        key = ["rigidity", e["sha"], json.loads(json.dumps(pc.__dict__, default=float)), n, BENIGN_SEED,
               [round(v, 6) for v in probe["collapse_point"]]]

        def compute() -> dict[str, Any]:
            _log(f"  rigidity of the {probe['family']} probe on {self.name(e)}")
            tr = _Probe(probe["family"], (3, int(e["size"]), int(e["size"])), pc, None)
            _load_state(tr, self.cache.path(_probe_key(e, pc, n), ".probe.npz"))
            return probe_rigidity(self.model(e), self.dbe_e(e, n).images, pc, probe["family"],
                                  probe["collapse_point"], tr.eval())

        return self.cache.get_or(key, compute)

    def scan_row(
        self, e: dict[str, Any], profile: str, over: dict[str, Any] | None = None, n: int | None = None
    ) -> dict[str, Any]:
        """A DRMGuard scan of one model in one profile (from cached components), decided by the current rule."""
        over, n = over or {}, n or self.n_benign
        cfg = self.profile(profile, e["task"], over)
        rev = self.reverse(e, cfg, n)
        probes = [dict(self.probe(e, cfg, f, n)) for f in (cfg.probes.families if cfg.probes else ())]
        flagged = needs_rigidity(cfg, probes)
        for p in probes:
            if p["family"] in flagged:
                p["rigidity"] = self.rigidity(e, cfg, p, n)
        score, thr, why = decide(cfg, rev["perturbation_ratio"], rev["output_variance_ratio"], probes)
        target = rev["drmguard_target"]
        decisive = [p for p in probes if p["family"] == deciding_family(why)]
        if decisive:
            target = decisive[0]["collapse_point"]
        return self.row(
            e,
            method=self.method_name(profile, over, n),
            verdict=score >= thr,
            score=score,
            threshold=thr,
            decision=why,
            target=target,
            seconds=rev["seconds"] + sum(p["seconds"] + p.get("rigidity", {}).get("seconds", 0) for p in probes),
            extra={
                "perturbation_ratio": rev["perturbation_ratio"],
                "output_variance_ratio": rev["output_variance_ratio"],
                "probes": {p["family"]: p["variance_ratio"] for p in probes},
                "rigidity": {p["family"]: p["rigidity"]["rigidity"] for p in probes if "rigidity" in p},
            },
        )

    def method_name(self, profile: str, over: dict[str, Any], n: int) -> str:
        name = f"paper@{self.paper_steps}" if profile == "paper" else profile
        if over:
            name += "[" + ",".join(f"{k}={v}" for k, v in sorted(over.items())) + "]"
        if n != self.n_benign:
            name += f"[D_be={n}]"
        return name

    def cached_report(self, e: dict[str, Any]) -> ScanReport:
        """The default scan's report of a model, rebuilt from the cached components with its reversed triggers (the
        generator and the probes' transforms), as ``mitigate`` needs it; a component cached without its weights
        is computed again."""
        from dataclasses import asdict

        from drmguard_engine.defenses.drmguard import ReverseResult
        from drmguard_engine.defenses.generator import build_generator
        from drmguard_engine.defenses.probes import ProbeResult, _Probe

        row = self.scan_row(e, "default")
        cfg = self.profile("default", e["task"], {})
        n, shape = self.n_benign, (3, int(e["size"]), int(e["size"]))
        dg = json.loads(json.dumps(cfg.to_dict()["drmguard"], default=float))
        rkey = ["reverse", e["sha"], dg, n, BENIGN_SEED]
        if not self.cache.path(rkey, ".gen.npz").exists():
            self.cache.put(rkey, self._run_reverse(e, cfg, n, rkey))
        rev = self.reverse(e, cfg, n)
        gen = build_generator(cfg.drmguard.generator, shape[0], width=cfg.drmguard.generator_width)
        _load_state(gen, self.cache.path(rkey, ".gen.npz"))
        rr = ReverseResult(
            generator=gen.eval(),
            poisoned=torch.empty(0),
            perturbation_ratio=rev["perturbation_ratio"],
            estimated_target=rev["drmguard_target"],
            output_variance_ratio=rev["output_variance_ratio"],
            rav=rev["rav"],
            rnv=rev["rnv"],
        )
        prs = []
        assert cfg.probes is not None
        for fam in cfg.probes.families:
            pc = cfg.probes.replace(families=(fam,))
            pkey = _probe_key(e, pc, n)
            p = self.probe(e, cfg, fam, n)
            tr = _Probe(fam, shape, pc, None)
            _load_state(tr, self.cache.path(pkey, ".probe.npz"))
            prs.append(
                ProbeResult(
                    family=fam,
                    variance_ratio=p["variance_ratio"],
                    fit_variance_ratio=p["fit_variance_ratio"],
                    collapse_point=p["collapse_point"],
                    drift=p["drift"],
                    perturbation_ratio=p["perturbation_ratio"],
                    seconds=p["seconds"],
                    transform=tr.eval(),
                )
            )
        return ScanReport(
            verdict=row["verdict"],
            perturbation_ratio=rev["perturbation_ratio"],
            threshold=cfg.drmguard.epsilon,
            score=row["score"],
            score_threshold=row["score_threshold"],
            decision=row["decision"],
            estimated_target=row["estimated_target"],
            drmguard_target=rev["drmguard_target"],
            steps=0,
            seconds=row["seconds"],
            profile=cfg.profile,
            task=e["task"],
            rav=rev["rav"],
            rnv=rev["rnv"],
            output_variance_ratio=rev["output_variance_ratio"],
            config=asdict(cfg),
            reverse=rr,
            probe_results=prs,
        )

    # ------------------------------------------------------------------------------------------ baselines
    def baseline_row(self, e: dict[str, Any], name: str) -> dict[str, Any]:
        from drmguard_engine.defenses.registry import get_defense

        defense = get_defense(name)
        cfg = _defense_config(defense, self.baseline_steps)
        cfg_dict = json.loads(json.dumps(getattr(cfg, "__dict__", {}), default=str))
        key = ["detect", name, e["sha"], cfg_dict, self.n_benign, BENIGN_SEED]

        def compute() -> dict[str, Any]:
            _log(f"  {name} on {self.name(e)}")
            rep = defense.detect(self.model(e), self.dbe_e(e), e["task"], config=cfg)
            return json.loads(json.dumps(rep.to_dict(), default=float))

        rep = self.cache.get_or(key, compute)
        return self.row(
            e,
            method=name,
            verdict=rep["verdict"] == "backdoored",
            score=rep["score"],
            threshold=rep["score_threshold"],
            decision=rep["decision"],
            target=rep.get("estimated_target"),
            seconds=rep["seconds"],
            extra={},
        )

    # ------------------------------------------------------------------------------------------ mitigation
    def mitigation_row(self, e: dict[str, Any], method: str) -> dict[str, Any]:
        """AE / DAE / clean RE on the zoo's test set with the real trigger, after one mitigation method."""
        # mitigation baselines run at their own defaults (the same fine-tuning budget as DRMGuard's mitigation);
        # only the CI-size run shrinks them
        cfg: Any = None
        if method in ("drmguard", "drmguard_labels"):
            # drmguard_labels: the paper's targets (D_be and D_rp with their annotations), side by side with ours
            targets = "labels" if method == "drmguard_labels" else "teacher"
            cfg = MitigationConfig(steps=self.baseline_steps if self.quick else 300, targets=targets)
        elif method != "undefended":
            from drmguard_engine.defenses.registry import get_defense

            d = get_defense(method)
            cfg = _defense_config(d, self.baseline_steps) if self.quick else _defense_config(d, None)
        cfg_dict = json.loads(json.dumps(getattr(cfg, "__dict__", {}), default=str))
        if isinstance(cfg, MitigationConfig):
            # an option that is off runs exactly the computation cached before the option existed
            off = (("refresh_every", "refresh_steps") if not cfg.refresh_every else ()) + (
                ("neighbourhood_sigma", "neighbourhood_share") if not cfg.neighbourhood_sigma else ())
            if not needs_unmasked(self.cached_report(e), cfg.unmasked_above):
                off += ("unmasked_families", "unmasked_above", "unmasked_rigidity_below")
            cfg_dict = {k: v for k, v in cfg_dict.items() if k not in off}
        key = ["mitigate", method, e["sha"], self.n_benign, BENIGN_SEED, HOLDOUT_SEED, cfg_dict]

        def compute() -> dict[str, Any]:
            _log(f"  mitigation {method} on {self.name(e)}")
            xte, yte = self.test_set(e)
            attack = load_attack(Path(e["dir"]) / "attack.npz")
            model, dbe, hold = self.model(e), self.dbe_e(e), self.holdout(e)
            t0 = time.perf_counter()
            details: dict[str, Any] = {}
            if method == "undefended":
                pass
            elif method in ("drmguard", "drmguard_labels"):
                report = self.cached_report(e)
                details["verdict"] = report.verdict
                model, mrep = mitigate(model, dbe, e["task"], report=report, holdout=hold, config=cfg)
                details.update(mrep.to_dict())
            else:
                model, mrep = d.mitigate(model, dbe, e["task"], holdout=hold, config=cfg)
                details.update(json.loads(json.dumps(mrep.to_dict(), default=float)))
            seconds = time.perf_counter() - t0
            m = evaluate(model, xte, yte, e["task"], attack=attack)
            return {"ae": m["ae"], "dae": m["dae"], "re": m["re"], "seconds": seconds, "details": details}

        r = self.cache.get_or(key, compute)
        return {
            "task": e["group"],
            "kind": e["kind"],
            "arch": e["arch"],
            "seed": e["seed"],
            "method": method,
            **r,
        }

    # ------------------------------------------------------------------------------------------ rows
    @staticmethod
    def name(e: dict[str, Any]) -> str:
        return f"{e['task']}/{e['kind']} {e['arch']} w{e['width']:g} s{e['seed']}"

    def row(
        self,
        e: dict[str, Any],
        *,
        method: str,
        verdict: bool,
        score: float,
        threshold: float,
        decision: str,
        target: list[float] | None,
        seconds: float,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        m = e.get("metrics", {})
        rr = m.get("real_trigger_ratio")
        return {
            "task": e["group"],
            "kind": e["kind"],
            "arch": e["arch"],
            "width": e["width"],
            "seed": e["seed"],
            "method": method,
            "backdoored": bool(e["backdoored"]),
            "trigger": "-"
            if not e["backdoored"]
            else ("strong" if rr is not None and rr >= EPS else "subtle"),
            "real_trigger_ratio": rr,
            "clean_re": m.get("re"),
            "ae": m.get("ae"),
            "verdict": "backdoored" if verdict else "benign",
            "score": float(score),
            "score_threshold": float(threshold),
            "decision": decision,
            "estimated_target": target,
            "seconds": float(seconds),
            "target_distance": target_distance(e["task"], target, e.get("target"))
            if target is not None
            else None,
            **extra,
        }

    def paper_subset(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The models the (slow) paper profile runs on: the first ``paper_models`` benign ones and as many
        backdoored ones, the paper's main attacks first (BadNets, WaNet, IA, Clean Label, then the others)."""
        ben = [e for e in entries if not e["backdoored"]][: self.paper_models]
        order = ["badnets", "wanet", "input_aware", "clean_label", "blend", "sig"]
        bad = sorted(
            (e for e in entries if e["backdoored"]),
            key=lambda e: (order.index(e["kind"]) if e["kind"] in order else 99, e["seed"]),
        )
        return ben + bad[: self.paper_models]

    def select(
        self,
        *,
        tasks: list[str] | None = None,
        kinds: list[str] | None = None,
        archs: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        return [
            e
            for e in self.entries
            if e["implanted"]
            and (tasks is None or e["group"] in tasks)
            and (kinds is None or e["kind"] in kinds)
            and (archs is None or e["arch"] in archs)
        ]


def _defense_config(defense: Any, steps: int | None) -> Any:
    """The defense's default configuration, with ``steps`` as its budget where it has a ``steps`` option."""
    from dataclasses import fields

    cls = getattr(defense, "config_class", None)
    if cls is None:
        return None
    return cls(steps=steps) if steps is not None and "steps" in {f.name for f in fields(cls)} else cls()


def _save_state(path: Path, module: torch.nn.Module) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    os.replace(tmp, path)


def _load_state(module: torch.nn.Module, path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        module.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files})


# ---------------------------------------------------------------------------------------------- tables


def _f(v: Any, p: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def ident_table(rows: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Tables 2-4 form: per attack and all attacks, per method, TP/FP/FN/TN, accuracy and ROC-AUC."""
    out = [
        "| attack | trigger | method | models | TP | FP | FN | TN | accuracy | ROC-AUC (vs benign) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    kinds = sorted({r["kind"] for r in rows if r["backdoored"]})
    for kind in [*kinds, "**all**"]:
        for method in methods:
            mr = [r for r in rows if r["method"] == method]
            ben = [r for r in mr if not r["backdoored"]]
            kr = [r for r in mr if r["backdoored"] and (kind == "**all**" or r["kind"] == kind)]
            if not kr:
                continue
            c = confusion(kr + ben)
            trig = "/".join(sorted({r["trigger"] for r in kr}))
            out.append(
                f"| {kind} | {trig} | {method} | {len(kr)}+{len(ben)} | {c['tp']} | {c['fp']} | {c['fn']} | "
                f"{c['tn']} | {_f(c['accuracy'], 2)} | {_f(c['auc'])} |"
            )
    return out


def per_model_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| model | trigger | real ratio | method | score | verdict | decided by | target distance (deg) | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["backdoored"], r["kind"], r["seed"], r["method"])):
        ok = "ok" if (r["verdict"] == "backdoored") == r["backdoored"] else "**wrong**"
        out.append(
            f"| {r['kind']} {r['arch']} s{r['seed']} | {r['trigger']} | {_f(r['real_trigger_ratio'], 4)} | "
            f"{r['method']} | {_f(r['score'], 2)} | {r['verdict']} ({ok}) | {r['decision']} | "
            f"{_f(r['target_distance'], 1)} | {r['seconds']:.0f} |"
        )
    return out


def mitigation_table(rows: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """Tables 5/6 form: AE and DAE (and clean RE) per attack and method; goal DAE <= 2x clean RE, RE +<=10%."""
    out = [
        "| attack | model | " + " | ".join(f"{m} AE / DAE / RE" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for key in sorted({(r["task"], r["kind"], r["arch"], r["seed"]) for r in rows}):
        cells = []
        for m in methods:
            r = next(
                (r for r in rows if (r["task"], r["kind"], r["arch"], r["seed"]) == key and r["method"] == m),
                None,
            )
            cells.append("n/a" if r is None else f"{r['ae']:.2f} / {r['dae']:.2f} / {r['re']:.2f}")
        out.append(f"| {key[1]} | {key[2]} s{key[3]} | " + " | ".join(cells) + " |")
    means = []
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        means.append(
            "n/a"
            if not mr
            else f"{np.mean([r['ae'] for r in mr]):.2f} / {np.mean([r['dae'] for r in mr]):.2f} / "
            f"{np.mean([r['re'] for r in mr]):.2f}"
        )
    out.append("| **mean** | | " + " | ".join(means) + " |")
    return out


def plots(rows: list[dict[str, Any]], out: Path, task: str, methods: list[str]) -> list[str]:
    """ROC curves per method and the score distribution (benign vs backdoored) against each threshold."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (extra `plots`)
        return []
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        if not any(r["backdoored"] for r in mr) or all(r["backdoored"] for r in mr):
            continue
        s = np.array([r["score"] for r in mr])
        y = np.array([r["backdoored"] for r in mr])
        thr = np.r_[np.inf, np.sort(np.unique(s))[::-1]]
        tpr = [(s[y] >= t).mean() for t in thr]
        fpr = [(s[~y] >= t).mean() for t in thr]
        axes[0].plot(fpr, tpr, marker=".", label=m)
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {task}")
    axes[0].legend(fontsize=7)
    for i, m in enumerate(methods):
        mr = [r for r in rows if r["method"] == m]
        for r in mr:
            axes[1].scatter(
                np.log10(max(r["score"] / r["score_threshold"], 1e-4)),
                i + (0.15 if r["backdoored"] else -0.15),
                c="tab:red" if r["backdoored"] else "tab:blue",
                s=14,
            )
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set_yticks(range(len(methods)), methods, fontsize=7)
    axes[1].set(
        xlabel="log10(score / threshold)  (right of the line = flagged)",
        title="clean (blue) vs backdoored (red)",
    )
    fig.tight_layout()
    name = f"paper_tables_{task.replace('/', '_')}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- sections

ATTACK_SETS = {
    "Tables 2-4 (BadNets, IA, Clean Label, WaNet)": ["badnets", "input_aware", "clean_label", "wanet"],
    "Table 14 (Blend, SIG)": ["blend", "sig", "blend_subtle", "sig_subtle"],
    "Table 9 (adaptive attack)": ["adaptive"],
    "Table 11 (multi-target WaNet)": ["wanet_multi"],
}


def section_identification(b: Bench, tasks: list[str], with_baselines: bool, paper_tasks: list[str]) -> list[str]:
    lines = [
        "## Identification (Tables 2-4, 9, 11, 12, 14)",
        "",
        "Positive = backdoored. `n+m` models = n backdoored + m benign. ROC-AUC on each method's `score` "
        "(higher = more suspicious). Trigger: *strong* when its real L1 ratio >= epsilon 0.03, *subtle* below.",
        "",
    ]
    all_rows: list[dict[str, Any]] = []
    for task in tasks:
        entries = b.select(tasks=[task], archs=["resnet18"])
        paper = task in paper_tasks
        methods = (
            ["default"]
            + ([f"paper@{b.paper_steps}"] if paper else [])
            + (["neural_cleanse", "featurere"] if with_baselines else [])
        )
        rows = []
        paper_set = {id(e) for e in b.paper_subset(entries)} if paper else set()
        for i, e in enumerate(entries):
            _log(f"[{i + 1}/{len(entries)}] identification {b.name(e)}")
            rows.append(b.scan_row(e, "default"))
            if id(e) in paper_set:
                rows.append(b.scan_row(e, "paper"))
            if with_baselines:
                rows += [b.baseline_row(e, "neural_cleanse"), b.baseline_row(e, "featurere")]
        all_rows += rows
        lines += [f"### {task}: all attacks", "", *ident_table(rows, methods), ""]
        for title, kinds in ATTACK_SETS.items():
            sub = [r for r in rows if not r["backdoored"] or r["kind"] in kinds]
            if any(r["backdoored"] for r in sub):
                lines += [f"#### {task}: {title}", "", *ident_table(sub, methods), ""]
        lines += [f"Per model ({task}):", "", *per_model_table(rows), ""]
        for png in plots(rows, b.out, task, methods):
            lines += [f"![{task}]({png})", ""]
        # Table 12: the other architectures (their own benign models)
        arch_entries = [e for e in b.select(tasks=[task]) if e["arch"] != "resnet18"]
        if arch_entries:
            arows = [b.scan_row(e, "default") for e in arch_entries]
            lines += [f"### {task}: other architectures (Table 12)", ""]
            for arch in sorted({r["arch"] for r in arows}):
                lines += [
                    f"{arch}:",
                    "",
                    *ident_table([r for r in arows if r["arch"] == arch], ["default"]),
                    "",
                ]
            lines += [*per_model_table(arows), ""]
            all_rows += arows
    (b.out / "paper_tables_identification.json").write_text(json.dumps(all_rows, indent=1, default=float))
    return lines


def section_mitigation(b: Bench, tasks: list[str]) -> list[str]:
    methods = ["undefended", "drmguard", "drmguard_labels", "fine_tuning", "fine_pruning", "anp"]
    lines = [
        "## Mitigation (Tables 5, 6, 13, 15)",
        "",
        "AE (to the attack's target; higher is better after mitigation), DAE (to the true labels on triggered "
        "test inputs; lower is better) and clean RE, degrees, on the zoo's test set with each model's *real* "
        "trigger. Goals: DRMGuard's DAE within 2x the model's clean RE, clean RE up by no more than 10%.",
        "",
    ]
    rows_all = []
    for task in tasks:
        rows = []
        for e in [e for e in b.select(tasks=[task]) if e["backdoored"]]:
            for m in methods:
                rows.append(b.mitigation_row(e, m))
        rows_all += rows
        lines += [f"### {task}", "", *mitigation_table(rows, methods), ""]
        dg = [r for r in rows if r["method"] == "drmguard"]
        und = {(r["kind"], r["arch"], r["seed"]): r for r in rows if r["method"] == "undefended"}
        ok = [
            r
            for r in dg
            if r["dae"] <= 2 * und[(r["kind"], r["arch"], r["seed"])]["re"]
            and r["re"] <= 1.10 * und[(r["kind"], r["arch"], r["seed"])]["re"]
        ]
        lines += [f"DRMGuard meets both goals on {len(ok)}/{len(dg)} models.", ""]
    (b.out / "paper_tables_mitigation.json").write_text(json.dumps(rows_all, indent=1, default=float))
    return lines


def section_ablations(b: Bench, tasks: list[str], per_kind: int) -> list[str]:
    """Table 7 (lambda1, lambda2, D_be size) and Table 8 (no FSRT, no MTR) on a subset of each task's zoo.

    The switches act on DRMGuard's reverse engineering. They run in the ``default`` profile (whose verdict the
    probes usually decide, so the table also shows the reversed trigger's perturbation ratio, the quantity the
    paper's rule reads) and, for the base setting, in the reduced ``paper`` profile on the same models."""
    lines = [
        "## Ablations (Tables 7, 8)",
        "",
        "DRMGuard's switches (lambda1, lambda2, FSRT, MTR) and the size of D_be, on the `default` profile (its "
        "verdict, and the mean perturbation ratio of the reversed trigger, which the paper's epsilon rule reads), "
        f"with the reduced paper profile `paper@{b.paper_steps}` as the base line, on a subset of each task's zoo "
        "(the first benign models and the first implanted BadNets/WaNet/Blend models).",
        "",
    ]
    rows = []
    for task in tasks:
        ents = b.select(tasks=[task], archs=["resnet18"])
        ben = [e for e in ents if not e["backdoored"]][:per_kind]
        bad = [e for e in ents if e["backdoored"] and e["kind"] in ("badnets", "wanet", "blend")][:per_kind]
        lam1 = (10.0, 30.0) if task.split("/")[0] == "gaze" else (5.0, 20.0)
        lam2 = 600.0 if task.split("/")[0] == "gaze" else 50.0
        variants: list[tuple[str, dict[str, Any], int | None]] = [("paper", {}, None), ("default", {}, None)]
        variants += [("default", {"lambda1": v}, None) for v in lam1]
        variants += [("default", {"lambda2": lam2}, None)]
        variants += [("default", {"use_fsrt": False}, None), ("default", {"use_mtr": False}, None)]
        variants += [("default", {}, round(b.n_benign * 0.5))]  # D_be at 5% of the training set (paper: 5-15%)
        if b.quick:  # CI size: one variant of each kind
            variants = [
                variants[0],
                variants[1],
                variants[2],
                ("default", {"use_fsrt": False}, None),
                ("default", {}, round(b.n_benign * 0.5)),
            ]
        for prof, over, n in variants:
            for e in ben + bad:
                rows.append(b.scan_row(e, prof, over, n))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for task in tasks:
        tr = [r for r in rows if r["task"] == task]
        lines += [
            f"### {task}",
            "",
            "| variant | TP | FP | FN | TN | accuracy | ROC-AUC | mean ratio benign | "
            "mean ratio backdoored |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            mr = [r for r in tr if r["method"] == m]
            c = confusion(mr)
            rb = [r["perturbation_ratio"] for r in mr if not r["backdoored"]]
            rd = [r["perturbation_ratio"] for r in mr if r["backdoored"]]
            lines.append(
                f"| {m} | {c['tp']} | {c['fp']} | {c['fn']} | {c['tn']} | {_f(c['accuracy'], 2)} | "
                f"{_f(c['auc'])} | {_f(float(np.mean(rb)) if rb else None, 4)} | "
                f"{_f(float(np.mean(rd)) if rd else None, 4)} |"
            )
        lines.append("")
    (b.out / "paper_tables_ablations.json").write_text(json.dumps(rows, indent=1, default=float))
    return lines


def quick_zoo(out: Path) -> Path:
    """A tiny zoo for the CI-size run: 32 px, gaze, two benign and two backdoored ResNet18 x0.125 models."""
    from zoo import Zoo, ZooSettings

    s = ZooSettings(size=32, n_train=600, n_test=100, steps=200, milestones=(160,), surrogate_steps=30)
    z = Zoo(out, s)
    for seed in (0, 1):
        z.build("gaze", "benign", "resnet18", 0.125, seed)
    for kind in ("badnets", "blend"):
        z.build("gaze", kind, "resnet18", 0.125, 100)
    return out


def real_zoo(name: str, root: str, out: Path, quick: bool) -> Path:
    """Builds a zoo on a real dataset (the paper's 80/10/10 split): six benign models and BadNets, Blend, SIG and
    WaNet (--quick: 32 px, one benign and one BadNets model, a few hundred steps)."""
    from zoo import Zoo, ZooSettings

    from drmguard_engine.data.real import TASK_OF

    task = TASK_OF[name]
    if quick:
        s = ZooSettings(size=32, steps=200, milestones=(160,), surrogate_steps=30, dataset=name, data_root=root)
        benign, kinds = (0, 1), ("badnets",)
    else:
        s = ZooSettings(dataset=name, data_root=root)
        benign, kinds = tuple(range(6)), ("badnets", "blend", "sig", "wanet")
    z = Zoo(out, s)
    for seed in benign:
        z.build(task, "benign", "resnet18", 0.125 if quick else 0.25, seed)
    for kind in kinds:
        z.build(task, kind, "resnet18", 0.125 if quick else 0.25, 100)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--zoo", type=Path, nargs="+", default=[ROOT / ".bench" / "zoo", ROOT / ".bench" / "zoo-arch"]
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--tasks", nargs="+", default=None, help="default: gaze headpose (--quick: gaze)")
    p.add_argument(
        "--n-benign", type=int, default=400, help="size of D_be (10%% of the zoo's 4,000 training images)"
    )
    p.add_argument(
        "--paper-steps",
        type=int,
        default=40,
        help="pre-training and optimisation steps of the reduced paper profile (the paper: 5000 + 2000)",
    )
    p.add_argument(
        "--no-paper", action="store_true", help="leave the paper profile out of the identification tables"
    )
    p.add_argument(
        "--paper-models",
        type=int,
        default=1,
        help="benign and backdoored models per task the paper profile runs on (it is slow on a CPU)",
    )
    p.add_argument(
        "--baseline-steps",
        type=int,
        default=None,
        help="optimisation steps of the detection baselines (default: each defense's own default)",
    )
    p.add_argument("--paper-tasks", nargs="+", default=None, help="tasks the paper profile runs on (default: --tasks)")
    p.add_argument("--ablation-tasks", nargs="+", default=None, help="tasks the ablations run on (default: --tasks)")
    p.add_argument(
        "--ablation-models", type=int, default=2, help="benign and backdoored models per task in ablations"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=ROOT / ".bench" / "paper-tables-cache",
        help="where results are cached by content (--quick: <out>/cache)",
    )
    p.add_argument("--real", action="append", default=[], metavar="NAME=DIR",
                   help="also build a zoo on a real dataset in its own format and tabulate it: mpiifacegaze, "
                        "columbiagaze, biwi or pandora (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--quick", action="store_true", help="CI size: a tiny 32 px zoo (built here) and tiny budgets"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    if a.quick:
        a.tasks = a.tasks or ["gaze"]
        a.zoo, a.cache = ([quick_zoo(a.out / "zoo")] if "gaze" in a.tasks else []), a.out / "cache"
        a.n_benign, a.paper_steps, a.baseline_steps, a.ablation_models = 60, 5, 20, 1
    a.tasks = a.tasks or ["gaze", "headpose"]
    a.out.mkdir(parents=True, exist_ok=True)
    for item in a.real:
        from drmguard_engine.data.real import TASK_OF

        name, _, root = item.partition("=")
        if name not in TASK_OF or not root or not Path(root).is_dir():
            p.error(f"--real {item!r}: use NAME=DIR with NAME one of {', '.join(TASK_OF)} and DIR its folder")
        base = a.out if a.quick else ROOT / ".bench"
        a.zoo = [*a.zoo, real_zoo(name, str(Path(root).resolve()), base / f"zoo-{name}", a.quick)]
        if TASK_OF[name] not in a.tasks:
            a.tasks = [*a.tasks, TASK_OF[name]]
    b = Bench(
        a.zoo,
        a.out,
        n_benign=a.n_benign,
        paper_steps=a.paper_steps,
        baseline_steps=a.baseline_steps,
        cache=a.cache,
        paper_models=a.paper_models,
        quick=a.quick,
    )
    a.tasks = [g for t in a.tasks for g in sorted({e["group"] for e in b.entries if e["task"] == t})]
    _log(
        f"{len(b.entries)} zoo models ({sum(e['implanted'] for e in b.entries)} usable), sections {a.sections}"
    )
    lines = [
        "# The paper's tables on the synthetic zoo",
        "",
        f"Generated by `benchmarks/paper_tables.py{' --quick' if a.quick else ''}`; D_be = {a.n_benign} "
        f"synthetic images (seed {BENIGN_SEED}); reduced paper profile `paper@{a.paper_steps}` "
        f"({a.paper_steps} pre-training + {a.paper_steps} steps; the paper: 5,000 + 2,000); detection baselines "
        f"at {a.baseline_steps or 'their default'} steps.",
        "",
    ]
    skipped = [b.name(e) for e in b.entries if not e["implanted"]]
    if skipped:
        lines += ["Left out (the attack did not implant, AE > 2x clean RE): " + ", ".join(skipped), ""]
    if "identification" in a.sections or "baselines" in a.sections:
        paper_tasks = [] if a.no_paper else (a.paper_tasks or a.tasks)
        lines += section_identification(b, a.tasks, "baselines" in a.sections, paper_tasks)
    if "mitigation" in a.sections:
        lines += section_mitigation(b, a.tasks)
    if "ablations" in a.sections:
        lines += section_ablations(b, [t for t in a.tasks if t in (a.ablation_tasks or a.tasks)], a.ablation_models)
    wall = time.time() - t0
    lines += [f"Wall time of this run: {wall:.0f} s (results cached by content are reused).", ""]
    (a.out / "paper_tables.md").write_text("\n".join(lines))
    _log(f"wrote {a.out / 'paper_tables.md'} in {wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
