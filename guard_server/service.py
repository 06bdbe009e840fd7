"""GuardCore: vet -> scan -> admit -> serve. No gRPC types here (the servicers translate).

Scans run in a subprocess per job (see ``worker.py``), driven by a few worker threads; the gRPC threads
only store uploads, enqueue, and run inference. Admission writes the verdict and the ADMITTED state in one
SQLite transaction; serving needs a loaded, warmed-up session *and* an ADMITTED row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import store as st
from .errors import (
    AlreadyExistsError,
    InvalidRequestError,
    ModelNotFoundError,
    PreconditionError,
    QueueFullError,
    UnavailableError,
)
from .metrics import Metrics
from .policy import mitigation_outcome, scan_outcome, survived_unlearning
from .runtime import LoadedModel, load_session, resolve_providers
from .settings import ServerSettings

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TASKS = ("gaze", "headpose")
TASK_DIM = {"gaze": 2, "headpose": 3}


@dataclass
class ModelInfo:
    """What the server needs from a checked ONNX graph."""

    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]  # C, H, W
    output_dim: int


def inspect_onnx(data: bytes, task: str, max_bytes: int = 512 * 1024 * 1024) -> ModelInfo:
    """Runs the engine's ONNX checks (single file, standard domains, op allow-list, caps) and reads the I/O.

    Raises:
        UnsupportedModelError / InvalidRequestError: with what to fix.
    """
    from drmguard_engine.onnx_io import check_onnx_bytes, input_layout

    proto = check_onnx_bytes(data, max_bytes=max_bytes)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise InvalidRequestError(
            f"the model must have exactly one input (N, C, H, W) and one output (N, d); it has {len(inputs)} "
            f"inputs and {len(proto.graph.output)} outputs")
    inp, out = inputs[0], proto.graph.output[0]

    def dims(v: Any) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

    ishape, oshape = dims(inp), dims(out)
    if len(ishape) != 4 or any(d <= 0 for d in ishape[1:]):
        raise InvalidRequestError(f"the model input {inp.name!r} must be (N, C, H, W) with fixed C, H, W; "
                                  f"it is {ishape}")
    if inp.type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
        raise InvalidRequestError(f"the model input {inp.name!r} must be float32 (images in [0, 1])")
    if len(oshape) != 2 or oshape[1] != TASK_DIM[task]:
        raise InvalidRequestError(f"task {task} needs an output (N, {TASK_DIM[task]}); the model's output "
                                  f"{out.name!r} is {oshape}")
    # (C, H, W) whatever the graph's layout: benign sets are channels-first for every model
    nhwc = input_layout(ishape) == "NHWC"
    chw = (ishape[3], ishape[1], ishape[2]) if nhwc else (ishape[1], ishape[2], ishape[3])
    return ModelInfo(inp.name, out.name, chw, oshape[1])


@dataclass
class Submission:
    name: str
    version: str
    task: str
    sha256: str
    model: bytes
    profile: str = ""
    references: list[tuple[str, str]] = field(default_factory=list)
    benign_set_id: str = ""
    benign: bytes = b""
    benign_sha256: str = ""


@dataclass
class SubmitResult:
    scan_id: str
    name: str
    version: str
    state: str
    reused: bool
    message: str


class ScanHub:
    """In-memory event fan-out for WatchScan (progress is not persisted; state changes are)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: dict[str, list[dict[str, Any]]] = {}

    def publish(self, scan_id: str, ev: dict[str, Any]) -> None:
        with self._cond:
            lst = self._events.setdefault(scan_id, [])
            lst.append(ev)
            if len(lst) > 2000:  # bound memory per scan: keep the newest events
                del lst[: len(lst) - 1000]
            self._cond.notify_all()

    def length(self, scan_id: str) -> int:
        with self._cond:
            return len(self._events.get(scan_id, ()))

    def wait(self, scan_id: str, after: int, timeout: float) -> tuple[list[dict[str, Any]], int]:
        with self._cond:
            lst = self._events.get(scan_id, [])
            if len(lst) <= after:
                self._cond.wait(timeout)
                lst = self._events.get(scan_id, [])
            after = min(after, len(lst))
            return list(lst[after:]), len(lst)

    def forget(self, scan_id: str) -> None:
        with self._cond:
            self._events.pop(scan_id, None)


def _verdict_str(v: Any) -> str:
    return str(getattr(v, "value", v) or "")


class GuardCore:
    """The service: submissions, the scan queue and workers, admission, and the served sessions."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = st.Store(settings.data_dir)
        self.hub = ScanHub()
        self.device = settings.resolved_device
        self.providers = resolve_providers(settings.providers)
        self._queue: queue.Queue[str] = queue.Queue()
        self._qlock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._cancelled: set[str] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.RLock()  # guards the maps below; swaps are single assignments under it
        self._served: dict[str, LoadedModel] = {}
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._swap_lock = threading.Lock()  # one activation at a time
        self._profiles: list[str] | None = None
        logger.info("inference providers requested %s, available here %s", list(settings.providers), self.providers)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Loads the served versions, re-queues interrupted scans, starts the scan workers."""
        for name, version in self.store.served():
            try:
                self._activate(name, version, pin=None, force=True)
            except Exception:  # noqa: BLE001 - one bad blob must not stop the server
                logger.exception("could not load served version %s:%s at start", name, version)
        for row in self.store.scans_in(st.ACTIVE_STATES):
            # Interrupted scans start again from the beginning; their versions were never served.
            self.store.set_state(row.scan_id, st.QUEUED, "re-queued after restart")
            self._queue.put(row.scan_id)
            logger.info("re-queued scan %s (%s:%s) after restart", row.scan_id, row.name, row.version)
        self._refresh_gauges()
        for i in range(self.settings.resolved_workers):
            t = threading.Thread(target=self._worker_loop, name=f"scan-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stops workers; running scan processes are ended and stay in their state (re-queued at start)."""
        self._stopping.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            _terminate(p)
        for t in self._threads:
            t.join(timeout=10)
        self.store.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------------------------------ submissions
    def profiles(self) -> list[str]:
        if self._profiles is None:
            from drmguard_engine.scan import list_profiles

            self._profiles = list(list_profiles())
        return self._profiles

    def check_header(self, name: str, version: str, task: str, profile: str) -> str:
        """Validates the header fields (before any bytes are accepted); returns the profile to use."""
        if not NAME_RE.match(name or ""):
            raise InvalidRequestError(f"model name {name!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ - "
                                      "(starting with a letter or digit)")
        if not NAME_RE.match(version or ""):
            raise InvalidRequestError(f"version {version!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ - "
                                      "(starting with a letter or digit)")
        if task not in TASKS:
            raise InvalidRequestError("task is missing: set TASK_GAZE or TASK_HEADPOSE")
        profile = profile or self.settings.default_profile
        if profile not in self.profiles():
            raise InvalidRequestError(f"unknown scan profile {profile!r}; choose one of {', '.join(self.profiles())}")
        m = self.store.model(name)
        if m is not None and m.task != task:
            raise PreconditionError(f"model {name!r} is registered as task {m.task}, not {task}")
        return profile

    def add_benign(self, data: bytes, *, task: str = "", sha256: str = "") -> tuple[str, int, tuple[int, ...], bool]:
        """Validates and stores a benign set; returns (id, n, (C,H,W), has_labels)."""
        from drmguard_engine.data import load_benign_npz

        digest = hashlib.sha256(data).hexdigest()
        if sha256 and sha256.lower() != digest:
            raise InvalidRequestError(f"benign set sha256 mismatch: header says {sha256}, the bytes hash to {digest}; "
                                      "re-send the file")
        known = self.store.benign(digest)
        if known is not None:
            return digest, int(known.num_images), tuple(json.loads(known.shape)), bool(known.has_labels)
        bs = load_benign_npz(data, task=task or None, require_labels=True)
        self.store.blobs.put(data)
        self.store.add_benign(digest, len(bs), bs.image_shape, bs.labels is not None)
        return digest, len(bs), bs.image_shape, bs.labels is not None

    def submit(self, sub: Submission) -> SubmitResult:
        """Checks a submission, stores it, and queues its scan (or answers from an earlier record)."""
        if self.stopping:
            raise UnavailableError("the server is shutting down; retry on another instance or later")
        profile = self.check_header(sub.name, sub.version, sub.task, sub.profile)
        digest = hashlib.sha256(sub.model).hexdigest()
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sub.sha256 or ""):
            raise InvalidRequestError("header.sha256 must be the 64-hex-digit sha256 of the model bytes")
        if sub.sha256.lower() != digest:
            raise InvalidRequestError(f"model sha256 mismatch: header says {sub.sha256}, the bytes hash to {digest}; "
                                      "the upload was corrupted or the header is wrong")
        existing = self.store.version(sub.name, sub.version)
        if existing is not None:
            if existing.sha256 == digest:
                return SubmitResult(existing.scan_id, sub.name, sub.version, existing.state, True,
                                    "this version was submitted before with identical bytes; answering from the record")
            raise AlreadyExistsError(f"{sub.name}:{sub.version} already exists with different bytes; "
                                     "submit under a new version")
        info = inspect_onnx(sub.model, sub.task, self.settings.max_model_bytes)  # ONNX checked before anything else runs
        # Benign set.
        if sub.benign_set_id:
            b = self.store.benign(sub.benign_set_id)
            if b is None:
                raise ModelNotFoundError(f"benign set {sub.benign_set_id!r} not found; upload it with UploadBenignSet")
            benign_id, shape = b.id, tuple(json.loads(b.shape))
        elif sub.benign:
            benign_id, _, shape, _ = self.add_benign(sub.benign, task=sub.task, sha256=sub.benign_sha256)
        else:
            raise InvalidRequestError("no benign data: set header.benign_set_id or send benign_chunk messages")
        if tuple(shape) != info.input_shape:
            raise InvalidRequestError(f"the benign images are {tuple(shape)} (C, H, W) but the model expects "
                                      f"{info.input_shape}; resize the benign set to the model's input")
        refs: list[tuple[str, str]] = []
        for rn, rv in sub.references:
            r = self.store.version(rn, rv)
            if r is None:
                raise ModelNotFoundError(f"reference {rn}:{rv} not found")
            if r.state != st.ADMITTED:
                raise PreconditionError(f"reference {rn}:{rv} is {r.state}; only ADMITTED versions can be references")
            refs.append((rn, rv))
        meta = {"input_name": info.input_name, "output_name": info.output_name,
                "input_shape": list(info.input_shape), "output_dim": info.output_dim}
        self.store.blobs.put(sub.model)
        prior = self.store.finished_scan_for_sha(digest)
        if prior is not None and prior.task == sub.task:
            return self._reuse(prior, sub, profile, benign_id, refs, meta)
        with self._qlock:
            if self._queue.qsize() >= self.settings.queue_size:
                raise QueueFullError(f"the scan queue is full ({self.settings.queue_size} waiting); retry later")
            scan_id = self.store.create_scan(name=sub.name, version=sub.version, task=sub.task, sha256=digest,
                                             profile=profile, benign_id=benign_id, refs=refs, meta=meta)
            self.store.set_state(scan_id, st.QUEUED, "queued")
            self._queue.put(scan_id)
        self._publish_state(scan_id, st.QUEUED, "queued")
        self._refresh_gauges()
        logger.info("queued scan %s for %s:%s (%s, profile %s)", scan_id, sub.name, sub.version, sub.task, profile)
        return SubmitResult(scan_id, sub.name, sub.version, st.QUEUED, False, "queued for scanning")

    def _reuse(self, prior: st.Row, sub: Submission, profile: str, benign_id: str, refs: list[tuple[str, str]],
               meta: dict[str, Any]) -> SubmitResult:
        """Identical bytes were vetted before: copy that verdict (and its mitigated version) without a scan."""
        scan_id = self.store.create_scan(name=sub.name, version=sub.version, task=sub.task, sha256=prior.sha256,
                                         profile=profile, benign_id=benign_id, refs=refs, meta=meta)
        common = dict(report=prior.report, perturbation_ratio=prior.perturbation_ratio, reused_from=prior.scan_id,
                      mitigation_report=prior.mitigation_report, rescan_report=prior.rescan_report,
                      clean_error_before=prior.clean_error_before, clean_error_after=prior.clean_error_after)
        msg = f"identical bytes were vetted in scan {prior.scan_id}; answering from that record"
        if prior.state == st.ADMITTED and not prior.mitigated:
            admitted = self.store.admit(scan_id, verdict=prior.verdict, reason=prior.reason, **common)
        elif prior.state == st.ADMITTED:
            mv = self.store.version(prior.name, prior.admitted_version)
            mname = self._mitigated_name(sub.name, sub.version)
            admitted = self.store.admit(scan_id, verdict=prior.verdict, reason=prior.reason, mitigated_version=mname,
                                        mitigated_sha=mv.sha256 if mv else "", mitigated_meta=meta, **common)
        else:
            self.store.set_state(scan_id, prior.state, msg, verdict=prior.verdict, reason=prior.reason, **common)
            admitted = ""
        if admitted:
            self._try_activate(sub.name, admitted)
        state = self.store.scan(scan_id).state  # type: ignore[union-attr]
        self._publish_final(scan_id)
        return SubmitResult(scan_id, sub.name, sub.version, state, True, msg)

    def cancel(self, scan_id: str) -> str:
        row = self.store.scan(scan_id)
        if row is None:
            raise ModelNotFoundError(f"scan {scan_id!r} not found")
        if row.state in st.FINAL_STATES:
            raise PreconditionError(f"scan {scan_id} already finished ({row.state}); nothing to cancel")
        with self._lock:
            self._cancelled.add(scan_id)
            proc = self._procs.get(scan_id)
        if proc is None:
            self.store.set_state(scan_id, st.FAILED, "cancelled", reason="cancelled by request")
            self._publish_final(scan_id)
        else:
            threading.Thread(target=_terminate, args=(proc,), daemon=True).start()
        return st.FAILED

    # ------------------------------------------------------------------------------------ workers
    def _worker_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                scan_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._refresh_gauges()
            row = self.store.scan(scan_id)
            if row is None or row.state != st.QUEUED:
                continue  # cancelled while queued
            try:
                self._run_scan(row)
            except Exception:  # noqa: BLE001 - a failed job must not kill the worker
                logger.exception("scan %s failed", scan_id)
                if not self._stopping.is_set():
                    self.store.set_state(scan_id, st.FAILED, "internal error", reason="internal error (see server log)")
                    self.metrics.scans.labels(row.task, "failed").inc()
                    self._publish_final(scan_id)
            finally:
                self._refresh_gauges()

    def _run_scan(self, row: st.Row) -> None:
        scan_id, task = row.scan_id, row.task
        job_dir = self.store.dir / "jobs" / scan_id
        shutil.rmtree(job_dir, ignore_errors=True)
        job_dir.mkdir(parents=True)
        refs = []
        for rn, rv in json.loads(row.refs):
            r = self.store.admitted(rn, rv)
            if r is not None:
                refs.append(str(self.store.blobs.path(r.sha256)))
        job = {"model_path": str(self.store.blobs.path(row.sha256)),
               "benign_path": str(self.store.blobs.path(row.benign_id)), "benign_sha256": row.benign_id,
               "reference_paths": refs, "task": task, "profile": row.profile, "device": self.device,
               "allow_mitigated": self.settings.allow_mitigated, "tolerance": self.settings.tolerance,
               "mitigate_max_probe_ratio": self.settings.mitigate_max_probe_ratio,
               "mitigate_unmasked_above": self.settings.mitigate_unmasked_above,
               "mitigate_unmasked_check": self.settings.mitigate_unmasked_check,
               "mitigate_extra_seeds": self.settings.mitigate_extra_seeds,
               "mitigate_require_fit": self.settings.mitigate_require_fit,
               "mitigate_max_rescan_score": self.settings.mitigate_max_rescan_score,
               "holdout_fraction": self.settings.holdout_fraction, "cv_folds": self.settings.mitigate_cv_folds,
               "parallel": self.settings.scan_parallel, "scan_workers": self.settings.resolved_workers,
               "out_dir": str(job_dir),
               "threads": self.settings.scan_threads}
        (job_dir / "job.json").write_text(json.dumps(job))
        self.store.set_state(scan_id, st.SCANNING, "scan started")
        self._publish_state(scan_id, st.SCANNING, "scan started")
        env = dict(os.environ)
        # the worker asks the kernel to kill it when this server dies (worker.die_with_parent); that is done after
        # exec, in the worker: a preexec_fn would run Python (ctypes' dlopen) in a fork of this multi-threaded
        # process, which crashed scan processes with SIGSEGV
        env["DRMGUARD_PARENT_PID"] = str(os.getpid())
        if self.settings.scan_threads:
            env["OMP_NUM_THREADS"] = str(self.settings.scan_threads)
        with open(job_dir / "worker.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "guard_server.worker", str(job_dir / "job.json")],
                                    stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                    cwd=str(job_dir))
        with self._lock:
            self._procs[scan_id] = proc
        self.metrics.scans_in_progress.inc()
        t_scan = time.monotonic()
        state = st.SCANNING
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        mitig: dict[str, Any] = {}
        rescan: dict[str, Any] = {}
        verdict, scan_report = "", {}
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                kind = ev.get("ev")
                if kind == "progress":
                    self.hub.publish(scan_id, {"state": state, "phase": ev.get("phase", ""), "step": ev.get("step", 0),
                                               "total": ev.get("total", 0), "losses": ev.get("losses") or {},
                                               "perturbation_ratio": ev.get("perturbation_ratio"),
                                               "message": ev.get("message", ""),
                                               "stage": ev.get("stage", "")})
                elif kind == "state" and ev.get("state") == st.MITIGATING and state != st.MITIGATING:
                    state = st.MITIGATING
                    t_mit = time.monotonic()
                    self.store.set_state(scan_id, st.MITIGATING, "backdoor found; mitigating")
                    self._publish_state(scan_id, st.MITIGATING, "backdoor found; mitigating", verdict="backdoored")
                elif kind == "scan_done":
                    verdict = _verdict_str(ev.get("verdict"))
                    scan_report = ev.get("report") or {}
                    pr = ev.get("perturbation_ratio")
                    self.store.set_state(scan_id, state, f"scan finished: {verdict}", verdict=verdict,
                                         perturbation_ratio=pr, report=json.dumps(scan_report))
                    self.metrics.scans.labels(task, verdict).inc()
                    self.metrics.scan_duration.labels(task).observe(time.monotonic() - t_scan)
                    if pr is not None:
                        self.metrics.last_perturbation_ratio.labels(task).set(pr)
                    if verdict == "backdoored":
                        self.metrics.backdoors_detected.labels(task).inc()
                    self._publish_state(scan_id, state, f"scan finished: {verdict}", verdict=verdict,
                                        perturbation_ratio=pr)
                elif kind == "mitigation_done":
                    mitig = ev
                elif kind == "rescan_done":
                    rescan = ev
                elif kind == "result":
                    result = ev
                elif kind == "error":
                    error = ev
            proc.wait()
        finally:
            with self._lock:
                self._procs.pop(scan_id, None)
                cancelled = scan_id in self._cancelled
                self._cancelled.discard(scan_id)
            self.metrics.scans_in_progress.dec()
        if self._stopping.is_set() and result is None:
            return  # shutting down: the row keeps its state and the scan is re-queued at the next start
        if state == st.MITIGATING and (mitig or result is not None or error is not None):
            self.metrics.mitigation_duration.labels(task).observe(time.monotonic() - t_mit)
        if cancelled or (error and error.get("kind") == "cancelled"):
            self._fail(row, "cancelled by request", counted=bool(verdict))
            return
        if error is not None or result is None:
            msg = (error or {}).get("message") or f"scan process exited with code {proc.returncode} (see {job_dir}/worker.log)"
            self._fail(row, msg, counted=bool(verdict))
            if state == st.MITIGATING:
                self.metrics.mitigations.labels(task, "failed").inc()
            return
        self._finish(row, result, mitig, rescan, verdict, scan_report)
        shutil.rmtree(job_dir, ignore_errors=True)

    def _fail(self, row: st.Row, reason: str, *, counted: bool) -> None:
        self.store.set_state(row.scan_id, st.FAILED, reason, reason=reason)
        if not counted:
            self.metrics.scans.labels(row.task, "failed").inc()
        logger.warning("scan %s (%s:%s) failed: %s", row.scan_id, row.name, row.version, reason)
        self._publish_final(row.scan_id)

    def _finish(self, row: st.Row, result: dict[str, Any], mitig: dict[str, Any], rescan: dict[str, Any],
                verdict: str, scan_report: dict[str, Any]) -> None:
        outcome, reason, task = result.get("outcome"), str(result.get("reason", "")), row.task
        extra: dict[str, Any] = {}
        if mitig:
            extra = dict(mitigation_report=json.dumps(mitig.get("report") or {}),
                         rescan_report=json.dumps(rescan.get("report") or {}),
                         clean_error_before=mitig.get("clean_error_before"),
                         clean_error_after=mitig.get("clean_error_after"))
        if outcome == "benign":
            admitted = self.store.admit(row.scan_id, verdict="benign", reason=reason)
        elif outcome == "mitigated":
            before, after = float(mitig["clean_error_before"]), float(mitig["clean_error_after"])
            data = Path(mitig["mitigated_path"]).read_bytes()
            # Policy is re-checked here, on the bytes that will be served, not only trusted from the job.
            survived = survived_unlearning(scan_report, rescan.get("unmasked_after"),
                                           float(rescan.get("unmasked_max_ratio") or 0.01))
            rescan_score = float((rescan.get("report") or {}).get("score", float("nan")))
            ok = (scan_outcome(scan_report, allow_mitigated=self.settings.allow_mitigated,
                               max_probe_ratio=self.settings.mitigate_max_probe_ratio,
                               require_fit=self.settings.mitigate_require_fit) is None
                  and mitigation_outcome(str(rescan.get("verdict")), survived, before, after, self.settings.tolerance,
                                         rescan_score=rescan_score,
                                         max_rescan_score=self.settings.mitigate_max_rescan_score)[0] == "mitigated"
                  and hashlib.sha256(data).hexdigest() == mitig.get("mitigated_sha256"))
            if not ok:
                outcome, reason = "rejected", reason + " (refused by the server's policy check)"
            else:
                info = inspect_onnx(data, task)
                sha = self.store.blobs.put(data)
                mname = self._mitigated_name(row.name, row.version)
                meta = {"input_name": info.input_name, "output_name": info.output_name,
                        "input_shape": list(info.input_shape), "output_dim": info.output_dim}
                admitted = self.store.admit(row.scan_id, verdict="backdoored", reason=reason, mitigated_version=mname,
                                            mitigated_sha=sha, mitigated_meta=meta, **extra)
                self.metrics.mitigations.labels(task, "admitted").inc()
                rep = mitig.get("report") or {}
                if rep.get("target_error_after") is not None:
                    self.metrics.mitigation_attack_error.labels(row.name, mname).set(float(rep["target_error_after"]))
                if rep.get("reversed_error_after") is not None:
                    self.metrics.mitigation_defending_error.labels(row.name, mname).set(
                        float(rep["reversed_error_after"]))
        if outcome == "rejected":
            if mitig:
                self.metrics.mitigations.labels(task, "rejected").inc()
            self.store.set_state(row.scan_id, st.REJECTED, reason, verdict=verdict or "backdoored", reason=reason,
                                 **extra)
            logger.info("scan %s: %s:%s REJECTED: %s", row.scan_id, row.name, row.version, reason)
            self._publish_final(row.scan_id)
            return
        logger.info("scan %s: admitted %s:%s (%s)", row.scan_id, row.name, admitted, reason)
        self._try_activate(row.name, admitted)
        self._publish_final(row.scan_id)

    def _mitigated_name(self, name: str, version: str) -> str:
        base = f"{version}-mitigated"[:64]
        cand, i = base, 2
        while self.store.version(name, cand) is not None:
            cand, i = f"{base[:60]}-{i}", i + 1
        return cand

    # ------------------------------------------------------------------------------------ events
    def _publish_state(self, scan_id: str, state: str, message: str, **kw: Any) -> None:
        self.hub.publish(scan_id, {"state": state, "message": message, **kw})

    def _publish_final(self, scan_id: str) -> None:
        row = self.store.scan(scan_id)
        if row is None:
            return
        self.hub.publish(scan_id, {"state": row.state, "message": row.reason, "verdict": row.verdict,
                                   "perturbation_ratio": row.perturbation_ratio, "final": True,
                                   "admitted_version": row.admitted_version, "mitigated": bool(row.mitigated)})
        timer = threading.Timer(120.0, self.hub.forget, args=(scan_id,))
        timer.daemon = True  # must not keep a stopping server alive
        timer.start()

    # ------------------------------------------------------------------------------------ serving
    def _try_activate(self, name: str, version: str) -> None:
        m = self.store.model(name)
        if m is not None and m.pinned and m.served_version:
            logger.info("%s:%s admitted; %s stays served (pinned)", name, version, m.served_version)
            self._refresh_gauges()
            return
        try:
            self._activate(name, version, pin=None)
        except Exception as exc:  # noqa: BLE001
            logger.exception("admitted %s:%s could not be loaded; the previous version keeps serving", name, version)
            self.metrics.model_load_failures.labels(type(exc).__name__).inc()

    def _load(self, name: str, version: str) -> LoadedModel:
        """A session for an ADMITTED version (cached, bounded). Anything else is refused: fail closed."""
        key = (name, version)
        with self._lock:
            lm = self._loaded.get(key)
            if lm is not None:
                self._loaded.move_to_end(key)
                return lm
        row = self.store.admitted(name, version)
        if row is None:
            raise ModelNotFoundError(f"{name}:{version} is not an admitted version")
        data = self.store.blobs.get(row.sha256)
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise UnavailableError(f"{name}:{version}: stored bytes do not match their sha256; re-vet the model")
        lm = load_session(name, version, row.sha256, data, providers=self.providers,
                          cache_dir=self.store.dir / "trt-cache", intra_threads=self.settings.inference_threads,
                          spinning=self.settings.inference_spinning)
        if self.settings.require_gpu and lm.provider == "CPUExecutionProvider":
            raise UnavailableError(f"{name}:{version} would run on the CPU and require_gpu is set")
        logger.info("loaded %s:%s on %s", name, version, lm.provider)
        with self._lock:
            self._loaded[key] = lm
            served = {(m.name, m.version) for m in self._served.values()}
            while len(self._loaded) > self.settings.max_served_models + 8:
                old = next((k for k in self._loaded if k not in served), None)
                if old is None:
                    break
                self._loaded.pop(old)
        return lm

    def _activate(self, name: str, version: str, *, pin: bool | None, force: bool = False) -> str:
        """Loads + warms up `version`, then switches the served pointer (DB, then memory). Returns the previous."""
        with self._swap_lock:
            if not force:
                with self._lock:
                    if name not in self._served and len(self._served) >= self.settings.max_served_models:
                        raise PreconditionError(f"the server already serves {len(self._served)} models "
                                                "(max_served_models)")
            lm = self._load(name, version)  # raises before anything changes
            prev = self.store.set_served(name, version, pinned=pin) if not force else version
            with self._lock:
                old = self._served.get(name)
                self._served[name] = lm  # the atomic switch: one dict assignment
            if old is None or old.version != version:
                if old is not None:
                    self.metrics.served_model.remove(name, old.version, old.provider)
                    self.metrics.version_changes.labels(name).inc()
                self.metrics.served_model.labels(name, version, lm.provider).set(1)
                self.metrics.execution_provider.labels(lm.provider).set(1)
            self._refresh_gauges()
            return prev if not force else ""

    def served_model(self, name: str, version: str = "") -> LoadedModel:
        """The session answering for name (served) or name:version (any ADMITTED version)."""
        if self.stopping:
            raise UnavailableError("the server is shutting down")
        if not version:
            lm = self._served.get(name)
            if lm is None:
                if self.store.model(name) is None:
                    raise ModelNotFoundError(f"model {name!r} not found")
                raise ModelNotFoundError(f"model {name!r} has no admitted, served version yet")
            return lm
        with self._lock:
            lm = self._loaded.get((name, version))
        return lm if lm is not None else self._load(name, version)

    def is_served(self, name: str) -> bool:
        return name in self._served

    def pin(self, name: str, version: str) -> tuple[str, str, bool]:
        m = self.store.model(name)
        if m is None:
            raise ModelNotFoundError(f"model {name!r} not found")
        if not version:
            self.store.set_pinned(name, False)
            return m.served_version, m.served_version, False
        if self.store.admitted(name, version) is None:
            v = self.store.version(name, version)
            if v is None:
                raise ModelNotFoundError(f"{name}:{version} not found")
            raise PreconditionError(f"{name}:{version} is {v.state}; only ADMITTED versions can be served")
        prev = self._activate(name, version, pin=True)
        return version, prev, True

    def rollback(self, name: str) -> tuple[str, str]:
        m = self.store.model(name)
        if m is None:
            raise ModelNotFoundError(f"model {name!r} not found")
        current = m.served_version
        history = [v for v in self.store.served_history(name) if self.store.admitted(name, v) is not None]
        # The most recent served version before the current one that is not the current one.
        target = next((v for v in reversed(history) if v != current), "")
        if not target:
            raise PreconditionError(f"model {name!r} has no earlier admitted version to roll back to")
        self._activate(name, target, pin=True)
        return target, current

    def _refresh_gauges(self) -> None:
        try:
            self.metrics.queue_depth.set(self._queue.qsize())
            with self._lock:
                names = list(self._served)
            for n in names:
                self.metrics.admitted_versions.labels(n).set(len(self.store.admitted_versions(n)))
        except Exception:  # noqa: BLE001 - gauges are best effort (e.g. store closing)
            pass

    # ------------------------------------------------------------------------------------ inference
    def predict(self, name: str, version: str, images: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        """Runs (N, C, H, W) float32 images through an admitted version; returns (model, outputs).

        A channels-last model (input (N, H, W, C), as TensorFlow exports keep it) takes either its own layout or
        (N, C, H, W), which is transposed for it."""
        lm = self.served_model(name, version)
        chw = lm.input_chw
        if lm.channels_last and len(chw) == 3 and tuple(images.shape[1:]) == (chw[2], chw[0], chw[1]):
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        if tuple(images.shape[1:]) != tuple(chw) and all(d > 0 for d in chw):
            raise InvalidRequestError(f"input shape {tuple(images.shape)} does not match the model's (N, "
                                      f"{', '.join(map(str, chw))})")
        out = lm.run({lm.inputs[0].name: images})
        return lm, out[0]


def _terminate(proc: subprocess.Popen[str], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
