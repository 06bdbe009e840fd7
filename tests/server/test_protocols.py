"""OIP (tritonclient), health, reflection, auth roles, TLS, and the drmguard-server command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import SIZE, tiny_onnx, vet_requests, wait_final
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_tritonclient_infer_equals_bare_onnxruntime(server, stub, gaze_benign) -> None:
    import tritonclient.grpc as tc

    model = tiny_onnx("gaze", seed=3, input_name="face", output_name="gaze_deg")
    s = wait_final(stub, stub.VetModel(vet_requests("oip", "1", model, gaze_benign)).scan_id)
    assert s.state == pb.STATE_ADMITTED, (s.state, s.verdict, s.reason)
    client = tc.InferenceServerClient(url=server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("oip") and not client.is_model_ready("absent")
    md = client.get_model_metadata("oip")
    assert md.platform == "onnxruntime_onnx" and list(md.versions) == ["1"]
    assert (md.inputs[0].name, md.inputs[0].datatype, list(md.inputs[0].shape)) == ("face", "FP32", [-1, 3, SIZE, SIZE])
    assert (md.outputs[0].name, md.outputs[0].datatype, list(md.outputs[0].shape)) == ("gaze_deg", "FP32", [-1, 2])
    x = np.random.default_rng(1).random((7, 3, SIZE, SIZE), dtype=np.float32)
    inp = tc.InferInput("face", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("oip", [inp], outputs=[tc.InferRequestedOutput("gaze_deg")])
    bare = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"face": x})[0]
    np.testing.assert_allclose(res.as_numpy("gaze_deg"), bare, atol=1e-3)
    assert res.get_response().model_version == "1"
    with pytest.raises(tc.InferenceServerException, match="FP32"):
        bad = tc.InferInput("face", list(x.shape), "FP64")
        bad.set_data_from_numpy(x.astype(np.float64))
        client.infer("oip", [bad])
    with pytest.raises(tc.InferenceServerException, match="not found"):
        client.infer("absent", [inp])


def test_health_and_reflection(server, channel) -> None:
    h = health_pb2_grpc.HealthStub(channel)
    for svc in ("", "drmguard.v1.Guard", "inference.GRPCInferenceService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"drmguard.v1.Guard", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_auth_roles(make_server, tmp_path: Path) -> None:
    tokens = {"registry": "r" * 20, "vehicle": "v" * 20, "admin": "a" * 20}
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({"tokens": [{"token": t, "role": r} for r, t in tokens.items()]}))
    srv = make_server(tokens_file=str(f))
    stub = pb_grpc.GuardStub(grpc.insecure_channel(srv.address))

    def md(role: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {tokens[role]}")]

    def code(fn, req, role: str | None) -> grpc.StatusCode:
        try:
            fn(req, metadata=md(role) if role else None)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    list_req, pin_req = pb.ListModelsRequest(), pb.RollbackRequest(name="x")
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    pred = pb.PredictRequest(name="x", input=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes()))
    assert code(stub.ListModels, list_req, None) == grpc.StatusCode.UNAUTHENTICATED
    assert code(stub.ListModels, list_req, "registry") == grpc.StatusCode.OK
    assert code(stub.ListModels, list_req, "vehicle") == grpc.StatusCode.PERMISSION_DENIED
    assert code(stub.ListModels, list_req, "admin") == grpc.StatusCode.OK
    assert code(stub.Predict, pred, "registry") == grpc.StatusCode.PERMISSION_DENIED
    assert code(stub.Predict, pred, "vehicle") == grpc.StatusCode.NOT_FOUND  # allowed; no such model
    assert code(stub.Rollback, pin_req, "vehicle") == grpc.StatusCode.PERMISSION_DENIED
    assert code(stub.Rollback, pin_req, "registry") == grpc.StatusCode.PERMISSION_DENIED
    assert code(stub.Rollback, pin_req, "admin") == grpc.StatusCode.NOT_FOUND
    assert code(lambda r, metadata: stub.ListModels(r, metadata=[("authorization", "Bearer " + "z" * 20)]),
                list_req, "admin") == grpc.StatusCode.UNAUTHENTICATED
    # Health stays open for probes.
    h = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))
    assert h.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_no_auth_binds_loopback_only(make_server) -> None:
    srv = make_server(listen="0.0.0.0:0")
    assert srv.host == "127.0.0.1"


def _make_cert(tmp: Path) -> tuple[Path, Path]:
    key, crt = tmp / "server.key", tmp / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, crt


def test_tls(make_server, tmp_path: Path) -> None:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("openssl not installed")
    key, crt = _make_cert(tmp_path)
    srv = make_server(tls_cert=str(crt), tls_key=str(key))
    creds = grpc.ssl_channel_credentials(root_certificates=crt.read_bytes())
    ch = grpc.secure_channel(f"localhost:{srv.port}", creds)
    assert pb_grpc.GuardStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models == []
    with pytest.raises(grpc.RpcError):  # a plaintext client cannot talk to a TLS port
        pb_grpc.GuardStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}")).ListModels(pb.ListModelsRequest(), timeout=3)


def test_cli_starts_answers_health_and_drains_on_sigterm(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GUARD_DEVICE="cpu")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "guard_server", "--listen", f"127.0.0.1:{port}", "--metrics-port",
                             "0", "--data-dir", str(tmp_path / "d")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        h = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while True:
            try:
                if h.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() - t0 < 30, "no SERVING health within 30 s"
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "server stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
