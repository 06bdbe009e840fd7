"""``drmguard-engine scan`` and ``drmguard-engine mitigate`` (registered by ``cli.py``)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from .cli import CliError, Command, check_device, default_device, existing_file, parse_overrides, writable_path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the ONNX regression model to vet (read as data, never executed)")
    p.add_argument("--benign", required=True,
                   help="benign set D_be: .npz with images (N,C,H,W) uint8 or float32 [0,1] (labels optional for scan)")
    p.add_argument("--task", required=True, choices=["gaze", "headpose"], help="what the model regresses")
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--profile", default="default",
                   help="scan profile: default (ours, measured in docs/scan.md), paper (the method as written), "
                        "fast (smaller budgets), reference, thorough (default plus a square-patch search)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="override a DRMGuard option (ablations), e.g. --set use_fsrt=false --set lambda2=600 "
                        "--set epsilon=0.05 --set steps=500; probe options take a probe_ prefix")
    p.add_argument("--benign-fraction", type=float, default=1.0,
                   help="use only this fraction of D_be (the D_be-size ablation; default 1.0)")
    p.add_argument("--workers", type=int, default=0,
                   help="on the CPU, independent pieces of the job (the scan's reverse engineering, probe families "
                        "and rigidity checks; the --cv-folds folds) run side by side in threads, each with --threads "
                        "torch threads (0, the default: as many as the cores hold; 1: one after the other). The "
                        "report does not depend on it")


def _workers(a: argparse.Namespace) -> int:
    import torch

    from .parallel import side_by_side

    if a.workers < 0:
        raise CliError(f"--workers must be 0 (as many as the cores hold) or at least 1, got {a.workers}")
    return a.workers or side_by_side(torch.get_num_threads())


def _load(a: argparse.Namespace, *, need_labels: bool) -> tuple[Any, Any, Any, str]:
    import torch

    from .data.benign import load_benign_npz
    from .onnx_io import load_onnx_model
    from .tasks import Task

    model_path = existing_file(a.model, "--model")
    benign_path = existing_file(a.benign, "--benign")
    task = Task.parse(a.task)
    device = check_device(a.device or default_device())
    model = load_onnx_model(model_path)
    c, h, w = (int(s) for s in model.input_shape)
    benign = load_benign_npz(benign_path, task=task, require_labels=need_labels, channels=c, size=(h, w))
    if not 0 < a.benign_fraction <= 1:
        raise CliError(f"--benign-fraction must be in (0, 1], got {a.benign_fraction}")
    if a.benign_fraction < 1:
        g = torch.Generator().manual_seed(0)
        k = max(4, int(round(len(benign) * a.benign_fraction)))
        benign = benign.subset(torch.randperm(len(benign), generator=g)[:k])
    if model.output_dim != task.dim:
        raise CliError(f"the model has {model.output_dim} outputs but task {task.value} needs {task.dim}; check --task")
    return model, benign, task, device


class _Bar:
    """One tqdm bar per phase on stderr, with the loss terms and the perturbation ratio."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar, self.phase = quiet, None, None

    def __call__(self, ev: Any) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if ev.phase != self.phase:
            self.close()
            self.phase = ev.phase
            self.bar = tqdm(total=ev.total, desc=ev.phase, file=sys.stderr, unit="step", dynamic_ncols=True,
                            disable=None)
        assert self.bar is not None
        self.bar.n = ev.step
        post = {k: f"{v:.4g}" for k, v in list(ev.losses.items())[:4]}
        if ev.perturbation_ratio is not None:
            post["ratio"] = f"{ev.perturbation_ratio:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=float))
    os.replace(tmp, path)


def _run_scan(a: argparse.Namespace) -> dict[str, Any]:
    from .scan import get_profile, scan

    report_path = writable_path(a.report, "--report")
    side = _workers(a)
    model, benign, task, device = _load(a, need_labels=False)
    cfg = get_profile(a.profile, task, **parse_overrides(a.set))
    bar = _Bar(a.quiet)
    try:
        report = scan(model, benign, task, cfg, device=device, progress=bar, workers=side)
    finally:
        bar.close()
    out = report.to_dict()
    out["model"] = str(a.model)
    _write_json(report_path, out)
    if a.plots:
        from .plots import scan_plots

        written = scan_plots(report, benign, Path(a.plots), model=model)
        out["plots"] = [str(p) for p in written]
    if not a.json:
        sys.stderr.write(f"{Path(a.model).name}: {report.one_line()}\n")
        print(f"{report.verdict} (score {report.score:.3f} vs {report.score_threshold:g}; report {report_path})")
        return None  # type: ignore[return-value]
    return {k: out[k] for k in ("verdict", "score", "score_threshold", "perturbation_ratio", "threshold",
                                "decision", "estimated_target", "steps", "seconds", "profile")} | {
        "report": str(report_path)}


def _add_scan(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNGs: benign / reversed / residual images, target estimate over steps, angle scatter")


def _run_mitigate(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .clean_cost import cross_validated_cost
    from .onnx_io import export_onnx
    from .scan import MitigationConfig, get_profile, mitigate, repeat_config, scan

    report_path = writable_path(a.report, "--report")
    out_path = writable_path(a.out, "--out")
    if a.cv_folds and a.cv_folds < 2:
        raise CliError(f"--cv-folds must be 0 (off) or at least 2 folds, got {a.cv_folds}")
    side = _workers(a)
    model, benign, task, device = _load(a, need_labels=True)
    cfg = get_profile(a.profile, task, **parse_overrides(a.set))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(benign), generator=g)
    n_hold = max(2, int(round(a.holdout * len(benign))))
    hold, train_set = benign.subset(perm[:n_hold]), benign.subset(perm[n_hold:])
    bar = _Bar(a.quiet)
    try:
        report = scan(model, train_set, task, cfg, device=device, progress=bar, workers=side)
        if not report.backdoored and not a.force:
            bar.close()
            result = {"verdict": report.verdict, "mitigated": False, "scan": report.to_dict(),
                      "message": "the scan found no backdoor; nothing to mitigate (use --force to fine-tune anyway)"}
            _write_json(report_path, result)
            if not a.json:
                print(f"benign: not mitigated (report {report_path})")
                return None  # type: ignore[return-value]
            return {k: result[k] for k in ("verdict", "mitigated", "message")}
        # the paper profile mitigates as the paper does (labels) unless told otherwise
        targets = a.targets or ("labels" if report.profile == "paper" else "teacher")
        mcfg = MitigationConfig(steps=a.steps, lr=a.lr, targets=targets, probe_triggers=a.probe_triggers,
                                unmasked_check=not a.no_unmasked_check,
                                extra_seeds=MitigationConfig.extra_seeds if a.extra_seeds is None else a.extra_seeds)
        cost = None
        mitigated, mrep = mitigate(copy.deepcopy(model) if a.cv_folds else model, train_set, task, report=report,
                                   config=mcfg, holdout=hold, device=device, progress=bar)
        if a.cv_folds:  # on the submitted model, with the recipe the repair above ended with
            cost = cross_validated_cost(model, benign, task, report=report, config=repeat_config(mcfg, mrep),
                                        folds=a.cv_folds, device=device, progress=bar, workers=side)
    finally:
        bar.close()
    export_onnx(mitigated.cpu(), out_path, input_shape=tuple(model.input_shape), input_name=model.input_name,
                output_name=model.output_name)
    mdict = mrep.to_dict() | ({"clean_cost": cost.to_dict()} if cost is not None else {})
    result = {"verdict": report.verdict, "mitigated": True, "out": str(out_path), "mitigation": mdict,
              "scan": report.to_dict()}
    _write_json(report_path, result)
    if not a.json:
        m = mrep
        print(f"mitigated -> {out_path}: clean error {m.clean_error_before:.2f} -> {m.clean_error_after:.2f} deg, "
              f"reversed-trigger error {m.reversed_error_before:.2f} -> {m.reversed_error_after:.2f} deg")
        if m.escalated:
            print("the backdoor survived the first repair (a probe fitted without the eye-region exclusion still "
                  f"collapsed the outputs: {_ratios(m.unmasked_check)}); repaired again with the unmasked probes")
        if cost is not None:
            print(f"cross-validated clean-error cost ({cost.folds} folds, {cost.n} images): {cost.before:.2f} -> "
                  f"{cost.after:.2f} deg ({cost.rise:+.1%}, 95% interval {cost.rise_low:+.1%} to {cost.rise_high:+.1%})")
        return None  # type: ignore[return-value]
    return {"verdict": report.verdict, "mitigated": True, "out": str(out_path), **mdict}


def _ratios(triggers: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k} variance ratio {float(v['variance_ratio']):.4f}" for k, v in triggers.items())


def _add_mitigate(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--out", required=True, help="where to write the mitigated ONNX model")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of D_be held back to measure clean error before/after (never trained on)")
    p.add_argument("--cv-folds", type=int, default=0,
                   help="also measure the clean-error cost by k-fold cross-validation over the whole benign set (the "
                        "service's check, default 5 there; 0: off). Mitigates k more copies")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps on D_be + D_rp (default 300)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--targets", choices=["teacher", "labels"], default=None,
                   help="what the fine-tuning fits: the model's own outputs on the clean images (teacher, the "
                        "default: clean error barely moves) or the benign set's labels (labels, the paper's reading "
                        "and the default with --profile paper)")
    p.add_argument("--probe-triggers", choices=["flagged", "decisive"], default="flagged",
                   help="which probes' reversed triggers join D_rp: every probe below the threshold (flagged, "
                        "default) or the best one only (decisive)")
    p.add_argument("--extra-seeds", type=int, default=None,
                   help="fit the deciding probe family from this many more seeds before unlearning; a fit that "
                        "collapses the outputs elsewhere (a second trigger) joins D_rp (default: the engine's "
                        "MitigationConfig.extra_seeds; 0: off)")
    p.add_argument("--no-unmasked-check", action="store_true",
                   help="do not fit the probes without the eye-region exclusion on the repaired model (by default, "
                        "where one still collapses its outputs the model is repaired again with them)")
    p.add_argument("--force", action="store_true", help="fine-tune even when the scan finds no backdoor")


COMMANDS = [
    Command("scan", "scan an ONNX regression model for a backdoor (DRMGuard) and write a JSON report", _add_scan,
            _run_scan),
    Command("mitigate", "scan, then unlearn the backdoor (fine-tune on D_be + reversed poisoned set) and export "
            "the mitigated ONNX model", _add_mitigate, _run_mitigate),
]
