"""The guard server end to end on 127.0.0.1:0: real gRPC, SQLite, scan subprocesses and ONNX Runtime."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import SIZE, benign_npz, predict, status_code, tiny_onnx, vet_requests, wait_final

from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def _metric(server: object, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_vet_admit_predict_and_metrics(server, stub, gaze_model, gaze_benign) -> None:
    before_grpc = _metric(server, "drmguard_grpc_requests_total", method="drmguard.v1.Guard/VetModel", code="OK")
    r = stub.VetModel(vet_requests("cabin-gaze", "1", gaze_model, gaze_benign))
    assert r.scan_id and r.state == pb.STATE_QUEUED and not r.reused
    events = list(stub.WatchScan(pb.WatchScanRequest(scan_id=r.scan_id), timeout=120))
    assert events[-1].final and events[-1].state == pb.STATE_ADMITTED
    assert any(e.step > 0 and e.losses for e in events), "progress events carry steps and loss terms"
    scan = wait_final(stub, r.scan_id)
    assert scan.verdict == pb.VERDICT_BENIGN and scan.admitted_version == "1" and not scan.mitigated
    report = json.loads(scan.report_json)
    assert report["verdict"] == "benign" and "perturbation_ratio" in report
    # the fixture's labels are random numbers the untrained model cannot fit: the reason says so, the verdict stands
    assert report["benign_fit"]["ratio"] >= 0.75
    assert scan.reason.startswith("scan found no backdoor; WARNING: the model does not fit the benign set"), scan.reason

    models = stub.ListModels(pb.ListModelsRequest()).models
    (m,) = [m for m in models if m.name == "cabin-gaze"]
    assert m.served_version == "1" and m.provider == "CPUExecutionProvider"
    assert m.versions[0].sha256 == hashlib.sha256(gaze_model).hexdigest() and m.versions[0].served

    # Predict equals a bare ONNX Runtime session on the same bytes; uint8 input is divided by 255.
    x = _images(5)
    bare = ort.InferenceSession(gaze_model, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(predict(stub, "cabin-gaze", x), bare.run(None, {"input": x})[0], atol=1e-4)
    xu = (x * 255).astype(np.uint8)
    ru = stub.Predict(pb.PredictRequest(name="cabin-gaze", version="1", input=pb.Tensor(
        dtype=pb.DATA_TYPE_UINT8, shape=list(xu.shape), data=xu.tobytes())))
    np.testing.assert_allclose(np.frombuffer(ru.output.data, "<f4").reshape(5, 2),
                               bare.run(None, {"input": xu.astype(np.float32) / 255})[0], atol=1e-4)

    # Identical bytes are answered from the record, under the same or another version.
    again = stub.VetModel(vet_requests("cabin-gaze", "1", gaze_model, gaze_benign))
    assert again.reused and again.scan_id == r.scan_id
    other = stub.VetModel(vet_requests("cabin-gaze", "2", gaze_model, gaze_benign))
    assert other.reused and other.state == pb.STATE_ADMITTED and other.scan_id != r.scan_id
    assert status_code(stub.VetModel, vet_requests("cabin-gaze", "1", tiny_onnx("gaze", seed=9), gaze_benign)) \
        == grpc.StatusCode.ALREADY_EXISTS

    # Metrics moved.
    assert _metric(server, "drmguard_scans_total", task="gaze", verdict="benign") == 1
    assert _metric(server, "drmguard_predict_requests_total", model="cabin-gaze", code="OK") >= 2
    assert _metric(server, "drmguard_predict_latency_seconds_count", model="cabin-gaze") >= 2
    assert _metric(server, "drmguard_served_model_info", model="cabin-gaze", provider="CPUExecutionProvider") == 1
    assert _metric(server, "drmguard_grpc_requests_total", method="drmguard.v1.Guard/VetModel", code="OK") \
        == before_grpc + 3
    assert _metric(server, "drmguard_grpc_requests_total", method="drmguard.v1.Guard/VetModel",
                   code="ALREADY_EXISTS") == 1
    assert _metric(server, "drmguard_build_info") == 1

    # Pin and roll back between the two admitted versions.
    assert stub.PinVersion(pb.PinVersionRequest(name="cabin-gaze", version="1")).served_version == "1"
    rb = stub.Rollback(pb.RollbackRequest(name="cabin-gaze"))
    assert rb.served_version == "2" and rb.previous_version == "1"
    assert predict(stub, "cabin-gaze", x).shape == (5, 2)


def test_a_relative_data_dir_works(make_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gaze_model,
                                   gaze_benign) -> None:
    # the README's own example (--data-dir ./guard-data, also the default): the scan worker runs in its job folder,
    # so every path it is given must hold from there
    monkeypatch.chdir(tmp_path)
    srv = make_server(data_dir=Path("rel-data"))
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    r = stub.VetModel(vet_requests("cabin", "1", gaze_model, gaze_benign))
    s = wait_final(stub, r.scan_id, timeout=120)
    assert s.state == pb.STATE_ADMITTED, (s.state, s.reason)
    assert (tmp_path / "rel-data" / "guard.sqlite3").is_file()  # the data lands where it was asked to
    assert predict(stub, "cabin", _images(2)).shape == (2, 2)


def test_bad_inputs_get_their_status_codes(server, stub, gaze_model, gaze_benign) -> None:
    INV, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, gaze_benign, sha256="0" * 64)) == INV
    assert status_code(stub.VetModel, vet_requests("bad name!", "1", gaze_model, gaze_benign)) == INV
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, gaze_benign, task=pb.TASK_UNSPECIFIED)) == INV
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, gaze_benign, profile="nope")) == INV
    assert status_code(stub.VetModel, vet_requests("m", "1", b"not an onnx file", gaze_benign)) == INV
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, None)) == INV  # no benign data
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, None, benign_set_id="f" * 64)) == NF
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, benign_npz("headpose"))) == INV  # 3 label cols
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, benign_npz(size=24))) == INV  # wrong size
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, gaze_benign, task=pb.TASK_HEADPOSE)) == INV
    assert status_code(stub.VetModel, iter([pb.VetModelRequest(model_chunk=b"x")])) == INV  # no header
    # A pickle posing as a benign set is refused, never loaded.
    import pickle  # noqa: S403 - building hostile input only

    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, pickle.dumps({"images": 1}))) == INV

    # Predict: unknown model, not admitted, bad shape/dtype/range, batch cap.
    x = _images(2)
    assert status_code(predict, stub, "nobody", x) == NF
    ok = stub.VetModel(vet_requests("m", "1", gaze_model, gaze_benign))
    wait_final(stub, ok.scan_id)
    assert status_code(predict, stub, "m", x, version="7") == NF
    assert status_code(predict, stub, "m", _images(2)[:, :, :8, :8]) == INV
    assert status_code(predict, stub, "m", x * 3) == INV
    assert status_code(predict, stub, "m", np.full_like(x, np.nan)) == INV
    assert status_code(predict, stub, "m", _images(300)) == RE
    bad = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3, SIZE, SIZE], data=b"\0" * 10)
    assert status_code(stub.Predict, pb.PredictRequest(name="m", input=bad)) == INV
    assert status_code(stub.GetScan, pb.GetScanRequest(scan_id="nope")) == NF
    assert status_code(stub.WatchScan, pb.WatchScanRequest(scan_id="nope")) == NF
    assert status_code(stub.PinVersion, pb.PinVersionRequest(name="m", version="9")) == NF
    assert status_code(stub.Rollback, pb.RollbackRequest(name="m")) == grpc.StatusCode.FAILED_PRECONDITION
    assert _metric(server, "drmguard_predict_requests_total", model="_unknown", code="NOT_FOUND") == 1


def test_upload_caps_and_benign_set_reuse(make_server, gaze_model, gaze_benign) -> None:
    srv = make_server(max_model_bytes=len(gaze_model) - 1)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    assert status_code(stub.VetModel, vet_requests("m", "1", gaze_model, gaze_benign)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    up = stub.UploadBenignSet(iter([pb.UploadBenignSetRequest(header=pb.UploadBenignSetHeader(task=pb.TASK_GAZE)),
                                    pb.UploadBenignSetRequest(chunk=gaze_benign)]))
    assert up.benign_set_id == hashlib.sha256(gaze_benign).hexdigest() and up.num_images == 40 and up.has_labels
    assert list(up.image_shape) == [3, SIZE, SIZE]


def test_queue_full_and_cancel(make_server, gaze_benign) -> None:
    srv = make_server(queue_size=1, workers=1)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    ids = []
    codes = []
    for i in range(4):
        try:
            ids.append(stub.VetModel(vet_requests("q", str(i), tiny_onnx("gaze", seed=20 + i), gaze_benign)).scan_id)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    for sid in ids:
        stub.CancelScan(pb.CancelScanRequest(scan_id=sid))
    for sid in ids:
        s = wait_final(stub, sid, timeout=60)
        assert s.state == pb.STATE_FAILED and "cancel" in s.reason
    assert not [m for m in stub.ListModels(pb.ListModelsRequest()).models if m.served_version]


def test_restart_mid_scan_loses_nothing_and_serves_nothing_unvetted(make_server, tmp_path: Path, gaze_model,
                                                                    gaze_benign) -> None:
    data = tmp_path / "restart"
    srv = make_server(data_dir=data)
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))
    r = stub.VetModel(vet_requests("r", "1", gaze_model, gaze_benign))
    for ev in stub.WatchScan(pb.WatchScanRequest(scan_id=r.scan_id), timeout=60):
        if ev.state == pb.STATE_SCANNING and ev.step > 0:
            break  # the scan process is running
    srv.stop(grace=0.5)
    srv2 = make_server(data_dir=data)
    stub2 = pb_grpc.GuardStub(grpc.insecure_channel(srv2.address))
    s = stub2.GetScan(pb.GetScanRequest(scan_id=r.scan_id)).scan
    assert s.state in (pb.STATE_QUEUED, pb.STATE_SCANNING)  # re-queued, not lost, not admitted
    assert status_code(predict, stub2, "r", _images(1)) == grpc.StatusCode.NOT_FOUND
    s = wait_final(stub2, r.scan_id)
    assert s.state == pb.STATE_ADMITTED
    np.testing.assert_allclose(predict(stub2, "r", _images(2)).shape, (2, 2))
    srv2.stop(grace=0.5)
    srv3 = make_server(data_dir=data)  # admitted versions come back served after a restart
    assert predict(pb_grpc.GuardStub(grpc.insecure_channel(srv3.address)), "r", _images(1)).shape == (1, 2)


def test_channels_last_model_is_vetted_and_served_in_either_layout(server, stub, gaze_benign) -> None:
    """A TensorFlow-style (N,H,W,C) model: scanned on the channels-first benign set, served to Predict in its own
    layout and in (N,C,H,W)."""
    import io

    import torch

    from drmguard_engine.models import build_model

    class ChannelsLast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model("tiny", "gaze", input_size=SIZE, seed=3).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2))

    buf = io.BytesIO()
    torch.onnx.export(ChannelsLast(), (torch.rand(2, SIZE, SIZE, 3),), buf, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      opset_version=17, dynamo=False)
    data = buf.getvalue()
    s = wait_final(stub, stub.VetModel(vet_requests("cabin-nhwc", "1", data, gaze_benign)).scan_id)
    assert s.state == pb.STATE_ADMITTED, s.reason
    x = _images(4)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    bare = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": nhwc})[0]
    np.testing.assert_allclose(predict(stub, "cabin-nhwc", nhwc), bare, atol=1e-4)
    np.testing.assert_allclose(predict(stub, "cabin-nhwc", x), bare, atol=1e-4)
    wrong = np.zeros((2, 3, SIZE, SIZE + 1), np.float32)
    assert status_code(predict, stub, "cabin-nhwc", wrong) == grpc.StatusCode.INVALID_ARGUMENT


def test_fixed_batch_model_is_vetted_and_served_at_any_multiple_of_its_batch(server, stub, gaze_benign):
    """torch's default export fixes the batch (here 2) and bakes it into the flatten's Reshape: the scan
    reads it as the batch, and Predict runs a multiple of it in chunks; another batch is refused with how."""
    import io

    import torch

    from drmguard_engine.models import build_model

    class ViewFlatten(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model("tiny", "gaze", input_size=SIZE, seed=4).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.net.features(x)
            return self.net.head(f.view(f.shape[0], -1))

    buf = io.BytesIO()
    torch.onnx.export(ViewFlatten(), (torch.rand(2, 3, SIZE, SIZE),), buf, input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False)  # no dynamic axes
    data = buf.getvalue()
    s = wait_final(stub, stub.VetModel(vet_requests("cabin-fixed", "1", data, gaze_benign)).scan_id)
    assert s.state == pb.STATE_ADMITTED, s.reason
    x = _images(6)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    bare = np.concatenate([sess.run(None, {"input": x[i:i + 2]})[0] for i in range(0, 6, 2)])
    np.testing.assert_allclose(predict(stub, "cabin-fixed", x), bare, atol=1e-4)
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, "cabin-fixed", x[:3])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "multiple of 2" in err.value.details()


def test_a_registry_can_ask_for_the_thorough_profile(server, stub, gaze_model, gaze_benign) -> None:
    """``profile: "thorough"`` in VetModel's header runs ``default`` with the square search unscreened."""
    s = wait_final(stub, stub.VetModel(vet_requests("cabin-thorough", "1", gaze_model, gaze_benign,
                                                    profile="thorough")).scan_id, timeout=170)
    assert s.state in (pb.STATE_ADMITTED, pb.STATE_REJECTED), s.reason
    assert s.profile == "thorough"
    report = json.loads(s.report_json)
    assert report["profile"] == "thorough"
    assert report["config"]["probes"]["patch_grid"] is True and report["config"]["probes"]["patch_grid_screen"] == 0
    assert "patch" in {p["family"] for p in report["probes"]}
