"""One scan job in its own process: ``python -m guard_server.worker JOB.json``.

A subprocess per job isolates the server from a hostile model (a crash or OOM kills the job, not the
server), keeps the GIL of the gRPC process free for Predict, and makes cancellation a signal.
The job reads its inputs from the blob store (paths in the job file), and writes one JSON object per line
to the original stdout (library output is redirected to stderr). Events, in order:

``{"ev": "state", "state": "SCANNING"}``, ``{"ev": "progress", ...}`` (the engine's ScanProgress),
``{"ev": "scan_done", "report": {...}, "seconds": s}``, ``{"ev": "state", "state": "MITIGATING"}``,
``{"ev": "mitigation_done", ...}``, ``{"ev": "result", "outcome": "benign"|"mitigated"|"rejected", ...}``
or ``{"ev": "error", "kind": "...", "message": "..."}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from .policy import mitigation_outcome, scan_outcome, survived_unlearning

_OUT: TextIO | None = None
_LAST_PROGRESS = [0.0]


_EMIT = threading.Lock()  # a job's pieces side by side (drmguard_engine.parallel) report from threads of their own


def emit(ev: str, **fields: Any) -> None:
    assert _OUT is not None
    line = json.dumps({"ev": ev, **fields}, default=_json_default) + "\n"
    with _EMIT:
        _OUT.write(line)
        _OUT.flush()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _progress_cb(stage: str) -> Any:
    def cb(p: Any) -> None:
        now = time.monotonic()
        last = p.step >= p.total if p.total else False
        # Throttled to ~10 events/s: watchers want motion, not every optimiser step.
        if not last and now - _LAST_PROGRESS[0] < 0.1:
            return
        _LAST_PROGRESS[0] = now
        emit("progress", stage=stage, phase=p.phase, step=int(p.step), total=int(p.total),
             losses={k: v for k, v in ((k, _finite(v)) for k, v in dict(p.losses or {}).items()) if v is not None},
             perturbation_ratio=_finite(p.perturbation_ratio), message=str(p.message or ""))
    return cb


def split_holdout(n: int, fraction: float, seed_hex: str) -> tuple[list[int], list[int]]:
    """Deterministic (train, holdout) split of n indices, seeded by the benign set's sha256."""
    import numpy as np

    rng = np.random.default_rng(int(seed_hex[:16], 16))
    perm = rng.permutation(n)
    k = max(1, int(round(n * fraction)))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def clean_error(model: Any, benign: Any, task: str, device: str) -> float:
    """Regression error (degrees) of ``model`` on a labelled set, computed on ``device`` (the scan's device: the
    error before and after mitigation are compared, so both are measured on the same one)."""
    import torch

    from drmguard_engine.tasks import regression_error

    model.to(device).eval()
    with torch.no_grad():
        preds = torch.cat([model(benign.images[i:i + 256].to(device)).cpu() for i in range(0, len(benign), 256)])
    return regression_error(task, preds, benign.labels)


def run_job(job: dict[str, Any]) -> None:
    import torch

    from drmguard_engine.clean_cost import cross_validated_cost
    from drmguard_engine.data import load_benign_npz
    from drmguard_engine.errors import CancelledError
    from drmguard_engine.onnx_io import export_onnx, load_onnx_model
    from drmguard_engine.parallel import side_by_side
    from drmguard_engine.scan import (extra_probes, mitigate, mitigation_config, repeat_config, scan,
                                      unmasked_probes, unmasked_triggers)

    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    # the job's independent pieces side by side where its share of the cores allows (drmguard_engine.parallel);
    # 0 = decided here, from this process's torch threads; a job written before the setting existed: one at a time
    side = int(job.get("parallel", 1)) or side_by_side(torch.get_num_threads(), jobs=int(job.get("scan_workers", 1)))
    device = job["device"]
    task = job["task"]
    try:
        model = load_onnx_model(Path(job["model_path"]).read_bytes())
        c, h, w = (int(s) for s in model.input_shape)
        benign = load_benign_npz(Path(job["benign_path"]).read_bytes(), task=task, channels=c, size=(h, w))
        refs = [load_onnx_model(Path(p).read_bytes()) for p in job.get("reference_paths", [])]
    except CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as a FAILED scan with the reason
        emit("error", kind="input", message=f"{type(exc).__name__}: {exc}")
        return

    emit("state", state="SCANNING")
    t0 = time.monotonic()
    report = scan(model, benign, task, config=job["profile"], device=device, progress=_progress_cb("scan"),
                  cancel=cancel, references=refs, workers=side)
    rep = report.to_dict()
    emit("scan_done", report=rep, seconds=time.monotonic() - t0, verdict=report.verdict,
         perturbation_ratio=_finite(report.perturbation_ratio))
    # what a person should check before trusting the verdict (a model that does not fit D_be) ends every reason
    warn = "".join(f"; WARNING: {w}" for w in report.warnings)
    decided = scan_outcome(rep, allow_mitigated=bool(job.get("allow_mitigated", True)),
                           max_probe_ratio=float(job.get("mitigate_max_probe_ratio", 0.01)),
                           require_fit=bool(job.get("mitigate_require_fit", True)), warn=warn)
    if decided is not None:
        emit("result", outcome=decided[0], reason=decided[1])
        return

    emit("state", state="MITIGATING")
    t1 = time.monotonic()
    # where the scan's probe found the trigger only approximately (the operator raised the ratio above), mitigation
    # also fits the probes without the task-region exclusion and unlearns them (engine: MitigationConfig)
    mcfg = mitigation_config(None, report)
    if "mitigate_unmasked_above" in job:
        mcfg = dataclasses.replace(mcfg, unmasked_above=float(job["mitigate_unmasked_above"]))
    # a job written before the check and the extra fits existed (resumed after an upgrade) runs without them
    mcfg = dataclasses.replace(mcfg, unmasked_check=bool(job.get("mitigate_unmasked_check", False)),
                               extra_seeds=int(job.get("mitigate_extra_seeds", 0)))
    folds = min(int(job.get("cv_folds", 0)), len(benign))
    if folds >= 2:
        # the served model is mitigated on every benign image; its clean-error cost is measured afterwards, by
        # cross-validation (drmguard_engine.clean_cost), on the submitted model as it was
        train_set, holdout = benign, None
        before = after = float("nan")
        submitted = load_onnx_model(Path(job["model_path"]).read_bytes())
    else:
        train_idx, hold_idx = split_holdout(len(benign), float(job["holdout_fraction"]), job["benign_sha256"])
        train_set, holdout = benign.subset(train_idx), benign.subset(hold_idx)
        before = clean_error(model, holdout, task, device)
    # the deciding family's other triggers, searched once for the repair and every fold of its clean-error check
    extra = extra_probes(model, train_set.images.to(device), report, mcfg, progress=_progress_cb("mitigate"),
                         cancel=cancel)
    fixed, mrep = mitigate(model, train_set, task, report=report, config=mcfg, device=device,
                           progress=_progress_cb("mitigate"), cancel=cancel, holdout=holdout, extra=extra)
    out_path = Path(job["out_dir"]) / "mitigated.onnx"
    fixed = fixed.to("cpu").eval()
    export_onnx(fixed, out_path, input_shape=tuple(model.input_shape), input_name=model.input_name,
                output_name=model.output_name)
    data = out_path.read_bytes()
    # Re-scan and measure what will be served: the exported ONNX, loaded back like any upload.
    served = load_onnx_model(data)
    if holdout is not None:
        after = clean_error(served, holdout, task, device)
    emit("state", state="MITIGATING", message="re-scanning the mitigated model")
    rescan = scan(served, benign, task, config=job["profile"], device=device, progress=_progress_cb("rescan"),
                  cancel=cancel, references=refs, workers=side)
    rdict = rescan.to_dict()
    # where unmasked probes were unlearned, they look again on the served model: the default re-scan's probes
    # cannot see a trigger read through the task region (measured: gaze Blend, mitigated without them, re-scans
    # benign while an unmasked blend probe still collapses it to 0.0001, rigidity 27; docs/scan.md)
    # (the engine's own check, where it ran and found nothing, looked at these weights before their export)
    unmasked_after: dict[str, Any] = dict(mrep.unmasked_check)
    if any(name.endswith("_unmasked") for name in mrep.probe_triggers):
        unmasked_after = unmasked_triggers(unmasked_probes(
            served.eval(), train_set.images.to(device), report, mcfg.unmasked_families, when_above=0.0,
            rigidity_below=mcfg.unmasked_rigidity_below, progress=_progress_cb("rescan"), cancel=cancel))
    survived = survived_unlearning(rep, unmasked_after, mcfg.unmasked_rigidity_below)
    max_rescan = float(job.get("mitigate_max_rescan_score", 0.5))
    mdict = mrep.to_dict()
    cost: dict[str, Any] = {}
    if folds >= 2 and rescan.verdict == "benign" and rescan.score <= max_rescan and not survived:
        emit("state", state="MITIGATING", message=f"measuring the clean-error cost ({folds}-fold cross-validation)")
        estimate = cross_validated_cost(submitted, benign, task, report=report, config=repeat_config(mcfg, mrep),
                                        folds=folds, seed=int(job["benign_sha256"][:8], 16), device=device,
                                        progress=_progress_cb("cost"), cancel=cancel, workers=side, extra=extra)
        before, after, cost = estimate.before, estimate.after, estimate.to_dict()
        mdict["clean_cost"] = cost  # the report's own clean_error_before/after are on the images it was fitted on
    emit("mitigation_done", report=mdict, clean_error_before=_finite(before), clean_error_after=_finite(after),
         mitigated_path=str(out_path), mitigated_sha256=hashlib.sha256(data).hexdigest())
    emit("rescan_done", report=rdict, verdict=rescan.verdict, perturbation_ratio=_finite(rescan.perturbation_ratio),
         seconds=time.monotonic() - t1, unmasked_after=unmasked_after, unmasked_max_ratio=mcfg.unmasked_rigidity_below)
    outcome, reason = mitigation_outcome(rescan.verdict, survived, before, after, float(job["tolerance"]),
                                         rescan_score=rescan.score, max_rescan_score=max_rescan, cost=cost)
    emit("result", outcome=outcome, reason=reason + warn)


def die_with_parent() -> None:
    """Linux: get SIGKILL when the server that started us dies, so no orphan keeps scanning."""
    parent = os.environ.get("DRMGUARD_PARENT_PID")
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the server died before the line above took effect
        os._exit(4)


def main(argv: list[str] | None = None) -> int:
    global _OUT
    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    # Our protocol owns the real stdout; anything a library prints goes to stderr.
    _OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    job = json.loads(Path(args[0]).read_text())
    try:
        run_job(job)
    except Exception as exc:  # noqa: BLE001
        from drmguard_engine.errors import CancelledError

        if isinstance(exc, CancelledError):
            emit("error", kind="cancelled", message="cancelled")
            return 3
        traceback.print_exc()
        emit("error", kind="internal", message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
