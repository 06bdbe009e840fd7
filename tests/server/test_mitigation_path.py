"""A really backdoored model through the service: rejected, or mitigated, re-scanned clean and only then served.

The model pair is the engine's end-to-end fixture (``tests/tiny_models.py``: ResNet18 x0.25 at 32 px, really trained,
one with a BadNets backdoor), trained once per test run and shared with the engine tests. The servers are real
(loopback gRPC, SQLite, scan subprocesses, ONNX Runtime); the scans use the ``fast`` profile.

The three vettings are independent (three servers, three stores), so the module submits them all at once and each
test then waits for its own. Measured on the 2-core machine: 617 s for the module with the 64 px pair (CI,
2026-11-26); with the 32 px pair about 300 s, beside test_scan_e2e.py in the suite's other xdist worker
(2026-11-27).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import predict, start_server, status_code, vet_requests, wait_final

from drmguard_engine.tasks import regression_error
from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc
from guard_server.policy import scan_outcome
from tests.tiny_models import SIZE, EyeGate, tiny_pair

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.heavy(300)]


def _predict_code(stub: pb_grpc.GuardStub, name: str, x: np.ndarray, version: str = "") -> grpc.StatusCode:
    return status_code(predict, stub, name, x, version)


def _ae(out: np.ndarray, target: object) -> float:
    import torch

    return regression_error("gaze", torch.from_numpy(np.array(out)), target.view(1, -1))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pair():  # type: ignore[no-untyped-def]
    p = tiny_pair("gaze")
    assert p.backdoored_metrics["ae"] < 0.5 * p.backdoored_metrics["re"], "the fixture's backdoor is in"
    return p


@dataclass
class Run:
    """One vetting in flight: its server, a stub on it, the scan id and the submitted bytes."""

    server: Any
    stub: pb_grpc.GuardStub
    scan_id: str
    model: bytes
    states: list[int] = field(default_factory=list)  # what WatchScan reported, in order (the "on" run only)
    served_while_mitigating: list[grpc.StatusCode] = field(default_factory=list)
    watch_error: BaseException | None = None


def _watch(run: Run, x: np.ndarray) -> None:
    """Follows a scan through WatchScan; while it is MITIGATING (found backdoored, not yet re-scanned), Predict must
    find nothing to serve."""
    try:
        for ev in run.stub.WatchScan(pb.WatchScanRequest(scan_id=run.scan_id), timeout=900):
            if ev.state not in run.states:
                run.states.append(ev.state)
                if ev.state == pb.STATE_MITIGATING:
                    run.served_while_mitigating.append(_predict_code(run.stub, "cabin", x[:2]))
    except BaseException as e:  # noqa: BLE001 - reported by the test that reads it
        run.watch_error = e


@pytest.fixture(scope="module")
def runs(pair, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The module's three vettings, submitted together (see the module docstring):

    - ``off``: mitigation is not allowed;
    - ``on``: every detection may be repaired, with the default 10% clean-error tolerance and 2-fold
      cross-validation;
    - ``gate``: the same, for the backdoored model with a second, unlearnable backdoor (EyeGate), with the probes
      fitted without the eye-region exclusion only by the check after the first repair (``mitigate_unmasked_above``
      raised to 0.5, so the scan's ratio can never start with them) and the single hold-out split
      (``mitigate_cv_folds=0``), so those paths run in the suite too.
    """
    from drmguard_engine.onnx_io import export_onnx

    root = tmp_path_factory.mktemp("mitigation")
    bd = pair.onnx("backdoored")
    gated = export_onnx(EyeGate(pair.backdoored, pair.benign.images).eval(), None, input_shape=(3, SIZE, SIZE))
    specs = {
        # the default 10% tolerance: on the 32 px pair, 2-fold cross-validation with the worker's folds read +1.8%
        # (95% interval -1.6% to +5.5%; measured 2026-11-27 with drmguard_engine.clean_cost). The 64 px pair needed
        # 30% (+17%, interval +10% to +25%)
        "on": (bd, dict(mitigate_max_probe_ratio=1.0, mitigate_cv_folds=2)),
        "gate": (gated, dict(mitigate_max_probe_ratio=1.0, mitigate_unmasked_above=0.5, mitigate_cv_folds=0)),
        "off": (bd, dict(allow_mitigated=False)),
    }
    started: dict[str, Run] = {}
    watcher = None
    try:
        for name, (model, settings) in specs.items():
            # start_server's one scan thread each: the suite's other xdist worker keeps the second core busy, and
            # OpenMP threads spin against each other on a loaded machine (tests/conftest.py)
            srv = start_server(root / name, **settings)
            stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))  # type: ignore[attr-defined]
            started[name] = run = Run(srv, stub, "", model)
            run.scan_id = stub.VetModel(vet_requests("cabin", "1", model, pair.benign_npz())).scan_id
            if name == "on":
                watcher = threading.Thread(target=_watch, args=(run, pair.test.images.numpy()), daemon=True)
                watcher.start()
        yield started
    finally:
        for run in started.values():
            run.server.stop(grace=1.0)
        if watcher is not None:
            watcher.join(timeout=10)


def test_backdoored_model_is_rejected_when_mitigation_is_off(runs, pair) -> None:
    stub = runs["off"].stub
    s = wait_final(stub, runs["off"].scan_id, timeout=500)
    assert s.state == pb.STATE_REJECTED and s.verdict == pb.VERDICT_BACKDOORED, s.reason
    assert not s.mitigated and s.admitted_version == ""
    x = pair.test.images[:4].numpy()
    assert _predict_code(stub, "cabin", x) == grpc.StatusCode.NOT_FOUND
    assert _predict_code(stub, "cabin", x, version="1") == grpc.StatusCode.NOT_FOUND
    (m,) = stub.ListModels(pb.ListModelsRequest(name="cabin")).models
    assert m.served_version == "" and not any(v.served for v in m.versions)


def test_backdoored_model_is_rejected_when_its_probe_found_the_trigger_only_approximately(runs) -> None:
    # the policy (guard_server/policy.py) repairs a probe-decided backdoor only when the probe collapsed the outputs
    # to at most mitigate_max_probe_ratio of their variance. Judged on the real report the "off" server recorded (the
    # same bytes and profile as "on"), with the function the worker and the server's own re-check both call, at a
    # setting below the fixture's ratio (measured 0.0086, under the 0.01 default; "on" runs at 1.0 so that a CPU
    # whose float sums land above 0.01 still mitigates)
    s = wait_final(runs["off"].stub, runs["off"].scan_id, timeout=500)
    report = json.loads(s.report_json)
    family = report["decision"].split(" ", 1)[0]
    assert family in ("patch", "blend", "warp", "smooth"), report["decision"]  # the fixture is probe-decided
    ratio = next(p["variance_ratio"] for p in report["probes"] if p["family"] == family)
    assert 0.0 < ratio < 0.05, report["decision"]
    outcome, reason = scan_outcome(report, allow_mitigated=True, max_probe_ratio=ratio / 2)  # type: ignore[misc]
    assert outcome == "rejected" and f"the {family} probe found the backdoor only approximately" in reason, reason
    assert scan_outcome(report, allow_mitigated=True, max_probe_ratio=1.0) is None  # "on": mitigation proceeds
    assert scan_outcome(report, allow_mitigated=True, max_probe_ratio=ratio) is None  # at most the ratio: repaired
    off = scan_outcome(report, allow_mitigated=False, max_probe_ratio=1.0)  # what the "off" server said, from it
    assert off is not None and off[0] == "rejected" and s.reason.startswith(off[1]), (off, s.reason)


def test_backdoored_model_is_served_only_as_a_mitigated_rescanned_version(runs, pair) -> None:
    run = runs["on"]
    stub, bd_bytes, x = run.stub, run.model, pair.test.images.numpy()
    s = wait_final(stub, run.scan_id, timeout=560)
    # WatchScan followed it: found backdoored, mitigated, and only then admitted; while it was being mitigated,
    # nothing was served
    assert run.watch_error is None, run.watch_error
    assert run.states and run.states[-1] == pb.STATE_ADMITTED and pb.STATE_MITIGATING in run.states, run.states
    assert run.served_while_mitigating == [grpc.StatusCode.NOT_FOUND], run.served_while_mitigating

    assert s.verdict == pb.VERDICT_BACKDOORED and s.mitigated and s.admitted_version == "1-mitigated", s.reason
    rescan = json.loads(s.rescan_report_json)
    assert rescan["verdict"] == "benign"
    assert s.clean_error_after <= 1.10 * s.clean_error_before + 1e-6  # the default tolerance was applied
    mit = json.loads(s.mitigation_report_json)
    # the served model is fitted on every benign image; its cost was measured by 2-fold cross-validation over all of
    # them, and the reason carries the estimate's interval
    cost = mit["clean_cost"]
    assert mit["train_size"] == len(pair.benign) and cost["n"] == len(pair.benign) and cost["folds"] == 2
    assert (cost["before"], cost["after"]) == pytest.approx((s.clean_error_before, s.clean_error_after))
    assert "2-fold cross-validation over 200 benign images" in s.reason and "95% interval" in s.reason, s.reason
    # every probe trigger unlearned is recorded with its ratio; probes fitted without the eye-region exclusion join
    # only when the deciding probe found the trigger approximately (ratio above 0.01)
    assert set(mit["probe_triggers"]) <= set(mit["triggers"]) and all(
        0 <= t["variance_ratio"] < 0.05 for t in mit["probe_triggers"].values())
    scanned = json.loads(s.report_json)
    deciding = [p["variance_ratio"] for p in scanned["probes"] if scanned["decision"].startswith(p["family"] + " ")]
    if not deciding or deciding[0] <= 0.01:
        assert not [t for t in mit["triggers"] if t.endswith("_unmasked")], mit["triggers"]
    if deciding and deciding[0] <= 0.01:
        # instead they were fitted on the repair (MitigationConfig.unmasked_check), which they no longer collapse
        assert mit["unmasked_check"] and not mit["escalated"], mit

    (m,) = stub.ListModels(pb.ListModelsRequest(name="cabin")).models
    assert m.served_version == "1-mitigated"
    versions = {v.version: v for v in m.versions}
    assert versions["1-mitigated"].mitigated and versions["1-mitigated"].parent_version == "1"
    assert versions["1-mitigated"].served and not versions["1"].served

    # The submitted (backdoored) bytes are never served, not even when asked for by version.
    assert _predict_code(stub, "cabin", x[:2], version="1") in (grpc.StatusCode.NOT_FOUND,
                                                               grpc.StatusCode.FAILED_PRECONDITION)
    # What is served no longer obeys the trigger, and still does the task.
    target = pair.attack.target
    poisoned = pair.attack.apply(pair.test.images).numpy()
    bare = ort.InferenceSession(bd_bytes, providers=["CPUExecutionProvider"])
    ae_before = _ae(bare.run(None, {"input": poisoned})[0], target)
    ae_after = _ae(predict(stub, "cabin", poisoned), target)
    assert ae_after > 3 * ae_before, (ae_before, ae_after)
    import torch

    clean_after = regression_error("gaze", torch.from_numpy(np.array(predict(stub, "cabin", x))), pair.test.labels)
    assert clean_after < 1.3 * pair.backdoored_metrics["re"]


def test_a_backdoor_that_survives_unlearning_is_rejected_after_mitigation(runs, pair) -> None:
    # The fixture's BadNets backdoor, which the scan finds (its blend probe), plus a parameter-free gate read through
    # the eyes (tests/tiny_models.py: EyeGate). The first repair unlearns the scan's triggers; the probes fitted on
    # it without the eye-region exclusion still collapse it (MitigationConfig.unmasked_check), so the submitted model
    # is repaired again with them in D_rp. The gate has nothing to unlearn, so the unmasked probe fitted on the
    # served model still collapses it to one point. The re-scan's own probes cannot see it (it reads benign), and the
    # version is rejected by the post-mitigation check (guard_server/policy.py: survived_unlearning), not served.
    import torch

    gated = EyeGate(pair.backdoored, pair.benign.images).eval()
    x = pair.test.images
    with torch.no_grad():
        assert regression_error("gaze", gated(x), pair.test.labels) < 1.05 * pair.backdoored_metrics["re"]
        assert regression_error("gaze", gated(gated.trigger(x)), gated.head(gated.switched[None])) < 0.1
    # (the "gate" run submitted this model exported to ONNX, with mitigate_cv_folds=0: the single hold-out split)
    stub = runs["gate"].stub
    s = wait_final(stub, runs["gate"].scan_id, timeout=560)
    assert s.state == pb.STATE_REJECTED and s.verdict == pb.VERDICT_BACKDOORED, s.reason
    assert "the backdoor survived unlearning" in s.reason and "probe_blend_unmasked" in s.reason, s.reason
    assert not s.mitigated and s.admitted_version == ""
    mit = json.loads(s.mitigation_report_json)
    assert mit["escalated"] and mit["unmasked_check"]["probe_blend_unmasked"]["variance_ratio"] < 0.01, mit
    assert mit["probe_triggers"]["probe_blend_unmasked"]["variance_ratio"] < 0.01  # it was found and unlearned
    assert json.loads(s.rescan_report_json)["verdict"] == "benign"  # what the re-scan alone would have admitted
    assert _predict_code(stub, "cabin", x[:2].numpy()) == grpc.StatusCode.NOT_FOUND
    (m,) = stub.ListModels(pb.ListModelsRequest(name="cabin")).models
    assert m.served_version == "" and not any(v.served for v in m.versions)
