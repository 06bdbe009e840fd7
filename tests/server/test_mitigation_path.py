"""A really backdoored model through the service: rejected, or mitigated, re-scanned clean and only then served.

The model pair is the engine's end-to-end fixture (``tests/tiny_models.py``: ResNet18 x0.25 at 64 px, really trained,
one with a BadNets backdoor), shared with the engine tests within a pytest session. The servers are real (loopback
gRPC, SQLite, scan subprocesses, ONNX Runtime); the scans use the ``fast`` profile.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import predict, status_code, vet_requests, wait_final

from drmguard_engine.tasks import regression_error
from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc
from tests.tiny_models import EyeGate, tiny_pair

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


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


def test_backdoored_model_is_rejected_when_mitigation_is_off(make_server, pair, tmp_path) -> None:
    srv = make_server(data_dir=tmp_path / "off", allow_mitigated=False, scan_threads=2)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    r = stub.VetModel(vet_requests("cabin", "1", pair.onnx("backdoored"), pair.benign_npz()))
    s = wait_final(stub, r.scan_id, timeout=300)
    assert s.state == pb.STATE_REJECTED and s.verdict == pb.VERDICT_BACKDOORED, s.reason
    assert not s.mitigated and s.admitted_version == ""
    x = pair.test.images[:4].numpy()
    assert _predict_code(stub, "cabin", x) == grpc.StatusCode.NOT_FOUND
    assert _predict_code(stub, "cabin", x, version="1") == grpc.StatusCode.NOT_FOUND
    (m,) = stub.ListModels(pb.ListModelsRequest(name="cabin")).models
    assert m.served_version == "" and not any(v.served for v in m.versions)


def test_backdoored_model_is_rejected_when_its_probe_found_the_trigger_only_approximately(
        make_server, pair, tmp_path) -> None:
    # the policy (guard_server/policy.py) repairs a probe-decided backdoor only when the probe collapsed the outputs
    # to at most mitigate_max_probe_ratio of their variance; at 0 no probe detection qualifies
    srv = make_server(data_dir=tmp_path / "strict", mitigate_max_probe_ratio=0.0, scan_threads=2)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    r = stub.VetModel(vet_requests("cabin", "1", pair.onnx("backdoored"), pair.benign_npz()))
    s = wait_final(stub, r.scan_id, timeout=300)
    report = json.loads(s.report_json)
    family = report["decision"].split(" ", 1)[0]
    assert family in ("patch", "blend", "warp", "smooth"), report["decision"]  # the fixture is probe-decided
    assert s.state == pb.STATE_REJECTED and s.verdict == pb.VERDICT_BACKDOORED, s.reason
    assert f"the {family} probe found the backdoor only approximately" in s.reason, s.reason
    assert not s.mitigated and s.admitted_version == "" and s.mitigation_report_json in ("", "{}")
    assert _predict_code(stub, "cabin", pair.test.images[:2].numpy()) == grpc.StatusCode.NOT_FOUND


def test_backdoored_model_is_served_only_as_a_mitigated_rescanned_version(make_server, pair, tmp_path) -> None:
    # every detection may be repaired here (the fixture's probe ratio is not what this test is about), and the
    # tolerance is 30%: the tiny fixture (800 training steps, 200 benign images) pays more clean error for its repair
    # than the zoo does. Measured 2026-11-26 through the worker: 2-fold cross-validation reads +17% (95% interval
    # +10% to +25%), each fold repaired on 100 images; the old 40-image hold-out read +9.7%. The 10% default is
    # tested on the policy itself (test_policy.py)
    srv = make_server(data_dir=tmp_path / "on", mitigate_max_probe_ratio=1.0, scan_threads=2, mitigate_cv_folds=2,
                      tolerance=0.3)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    bd_bytes = pair.onnx("backdoored")
    r = stub.VetModel(vet_requests("cabin", "1", bd_bytes, pair.benign_npz()))
    x = pair.test.images.numpy()
    states = []
    for ev in stub.WatchScan(pb.WatchScanRequest(scan_id=r.scan_id), timeout=500):
        if ev.state not in states:
            states.append(ev.state)
            if ev.state == pb.STATE_MITIGATING:  # found backdoored, not yet re-scanned: nothing is served
                assert _predict_code(stub, "cabin", x[:2]) == grpc.StatusCode.NOT_FOUND
    assert states[-1] == pb.STATE_ADMITTED and pb.STATE_MITIGATING in states, states

    s = wait_final(stub, r.scan_id)
    assert s.verdict == pb.VERDICT_BACKDOORED and s.mitigated and s.admitted_version == "1-mitigated", s.reason
    rescan = json.loads(s.rescan_report_json)
    assert rescan["verdict"] == "benign"
    assert s.clean_error_after <= 1.30 * s.clean_error_before + 1e-6  # the tolerance was applied
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


def test_a_backdoor_that_survives_unlearning_is_rejected_after_mitigation(make_server, pair, tmp_path) -> None:
    # The fixture's BadNets backdoor, which the scan finds approximately (its blend probe, ratio above 0.01), plus a
    # parameter-free gate read through the eyes (tests/tiny_models.py: EyeGate). Mitigation then fits the probes
    # again without the eye-region exclusion and unlearns what they find; the gate has nothing to unlearn, so the
    # unmasked probe fitted on the mitigated model still collapses it to one point. The re-scan's own probes cannot
    # see it (it reads benign), and the version is rejected by the post-mitigation check (guard_server/policy.py:
    # survived_unlearning), not served.
    import torch

    from drmguard_engine.onnx_io import export_onnx

    gated = EyeGate(pair.backdoored, pair.benign.images).eval()
    x = pair.test.images
    with torch.no_grad():
        assert regression_error("gaze", gated(x), pair.test.labels) < 1.05 * pair.backdoored_metrics["re"]
        assert regression_error("gaze", gated(gated.trigger(x)), gated.head(gated.switched[None])) < 0.1
    # (mitigate_cv_folds=0: the old single hold-out split, so that path runs in the suite too)
    srv = make_server(data_dir=tmp_path / "gate", mitigate_max_probe_ratio=1.0, scan_threads=2, mitigate_cv_folds=0)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    r = stub.VetModel(vet_requests("cabin", "1", export_onnx(gated, None, input_shape=(3, 64, 64)),
                                   pair.benign_npz()))
    s = wait_final(stub, r.scan_id, timeout=500)
    assert s.state == pb.STATE_REJECTED and s.verdict == pb.VERDICT_BACKDOORED, s.reason
    assert "the backdoor survived unlearning" in s.reason and "probe_blend_unmasked" in s.reason, s.reason
    assert not s.mitigated and s.admitted_version == ""
    mit = json.loads(s.mitigation_report_json)
    assert mit["probe_triggers"]["probe_blend_unmasked"]["variance_ratio"] < 0.01  # it was found and unlearned
    assert json.loads(s.rescan_report_json)["verdict"] == "benign"  # what the re-scan alone would have admitted
    assert _predict_code(stub, "cabin", x[:2].numpy()) == grpc.StatusCode.NOT_FOUND
    (m,) = stub.ListModels(pb.ListModelsRequest(name="cabin")).models
    assert m.served_version == "" and not any(v.served for v in m.versions)
