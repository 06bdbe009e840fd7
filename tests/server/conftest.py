"""Fixtures for server tests: a real GuardServer on 127.0.0.1:0 with a real SQLite store and ONNX Runtime.

ONNX fixtures are tiny engine models (``build_model("tiny", ...)`` + ``export_onnx``), 16 px, and a small
synthetic benign set; scans use the engine's small-budget profile ``TEST_PROFILE``.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc

TEST_PROFILE = "fast"  # the engine's small-budget profile (drmguard_engine.scan.list_profiles())
SIZE = 16


def tiny_onnx(task: str = "gaze", seed: int = 0, *, input_name: str = "input", output_name: str = "output") -> bytes:
    from drmguard_engine.models import build_model
    from drmguard_engine.onnx_io import export_onnx

    model = build_model("tiny", task, input_size=SIZE, seed=seed).eval()
    return export_onnx(model, input_shape=(3, SIZE, SIZE), input_name=input_name, output_name=output_name)


def benign_npz(task: str = "gaze", n: int = 40, seed: int = 0, size: int = SIZE) -> bytes:
    rng = np.random.default_rng(seed)
    d = 2 if task == "gaze" else 3
    images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    labels = rng.uniform(-20, 20, size=(n, d)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels)
    return buf.getvalue()


def vet_requests(name: str, version: str, model: bytes, benign: bytes | None = None, *, task: int = pb.TASK_GAZE,
                 benign_set_id: str = "", sha256: str | None = None, profile: str = TEST_PROFILE,
                 chunk: int = 64 * 1024) -> Iterator[pb.VetModelRequest]:
    yield pb.VetModelRequest(header=pb.VetModelHeader(
        name=name, version=version, task=task, sha256=sha256 if sha256 is not None else hashlib.sha256(model).hexdigest(),
        profile=profile, benign_set_id=benign_set_id, model_size=len(model)))
    for i in range(0, len(model), chunk):
        yield pb.VetModelRequest(model_chunk=model[i:i + chunk])
    if benign:
        for i in range(0, len(benign), chunk):
            yield pb.VetModelRequest(benign_chunk=benign[i:i + chunk])


def wait_final(stub: pb_grpc.GuardStub, scan_id: str, timeout: float = 120.0) -> pb.Scan:
    """The scan's final record. An ADMITTED row is written before its session is loaded and warmed up (serving needs
    both), so for an admitted, unpinned version this also waits until it is the served one, as
    ``GuardClient.wait_admission`` does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stub.GetScan(pb.GetScanRequest(scan_id=scan_id)).scan
        if s.state in (pb.STATE_REJECTED, pb.STATE_FAILED):
            return s
        if s.state == pb.STATE_ADMITTED:
            (m,) = stub.ListModels(pb.ListModelsRequest(name=s.name)).models
            if m.served_version == s.admitted_version or m.pinned or not s.admitted_version:
                return s
        time.sleep(0.2)
    raise AssertionError(f"scan {scan_id} did not finish (and serve) in {timeout}s")


def predict(stub: pb_grpc.GuardStub, name: str, x: np.ndarray, version: str = "", **kw: object) -> np.ndarray:
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(x.shape), data=np.ascontiguousarray(x, "<f4").tobytes())
    r = stub.Predict(pb.PredictRequest(name=name, version=version, input=t), **kw)
    return np.frombuffer(r.output.data, "<f4").reshape(tuple(r.output.shape))


def status_code(fn: object, *a: object, **kw: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        r = fn(*a, **kw)  # type: ignore[operator]
        if hasattr(r, "__iter__") and not hasattr(r, "ByteSize"):
            list(r)
    return ei.value.code()


@pytest.fixture(scope="session")
def gaze_model() -> bytes:
    return tiny_onnx("gaze", seed=1)


@pytest.fixture(scope="session")
def gaze_benign() -> bytes:
    return benign_npz("gaze")


def start_server(data_dir: Path, **kw: object) -> object:
    """A started GuardServer on a free loopback port with its store in ``data_dir``; ``kw`` override settings."""
    from guard_server.server import GuardServer
    from guard_server.settings import ServerSettings

    base = dict(listen="127.0.0.1:0", metrics_port=0, data_dir=str(data_dir), device="cpu",
                workers=1, scan_threads=1, default_profile=TEST_PROFILE, shutdown_grace=2.0)
    base.update(kw)
    return GuardServer(ServerSettings(**base)).start()  # type: ignore[arg-type]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., object]]:
    started: list[object] = []

    def make(data_dir: Path | None = None, **kw: object) -> object:
        srv = start_server(data_dir or tmp_path / "data", **kw)
        started.append(srv)
        return srv

    yield make
    for s in started:
        s.stop(grace=1.0)  # type: ignore[attr-defined]


@pytest.fixture
def server(make_server: Callable[..., object]) -> object:
    return make_server()


@pytest.fixture
def channel(server: object) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(server.address)  # type: ignore[attr-defined]
    yield ch
    ch.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.GuardStub:
    return pb_grpc.GuardStub(channel)
