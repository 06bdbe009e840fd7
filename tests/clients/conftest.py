"""Fixtures for client tests: a real ``GuardServer`` in-process on 127.0.0.1:0 and tiny ONNX models.

The server is the real one (gRPC, SQLite store, scan worker subprocess, ONNX Runtime); models are the
engine's ``tiny`` net at 16 px, scanned with the engine's small-budget ``fast`` profile.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SIZE = 16
PROFILE = "fast"


def tiny_onnx(task: str = "gaze", seed: int = 1) -> bytes:
    from drmguard_engine.models import build_model
    from drmguard_engine.onnx_io import export_onnx

    model = build_model("tiny", task, input_size=SIZE, seed=seed).eval()
    return export_onnx(model, input_shape=(3, SIZE, SIZE))


def benign_npz(task: str = "gaze", n: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    d = 2 if task == "gaze" else 3
    buf = io.BytesIO()
    np.savez(buf, images=rng.integers(0, 256, size=(n, 3, SIZE, SIZE), dtype=np.uint8),
             labels=rng.uniform(-20, 20, size=(n, d)).astype(np.float32))
    return buf.getvalue()


def start_server(data_dir: Path, **kw: Any) -> Any:
    from guard_server.server import GuardServer
    from guard_server.settings import ServerSettings

    base: dict[str, Any] = dict(listen="127.0.0.1:0", metrics_port=0, data_dir=str(data_dir), device="cpu",
                                workers=1, scan_threads=1, default_profile=PROFILE, shutdown_grace=2.0)
    base.update(kw)
    return GuardServer(ServerSettings(**base)).start()


@pytest.fixture(scope="session")
def make_onnx() -> Any:
    """``make_onnx(task, seed)`` -> bytes of a tiny engine model exported to ONNX."""
    return tiny_onnx


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("client-files")
    paths = {"model": d / "gaze.onnx", "benign": d / "benign.npz", "input": d / "input.npz",
             "bad_model": d / "bad.onnx"}
    paths["model"].write_bytes(tiny_onnx("gaze", seed=1))
    paths["benign"].write_bytes(benign_npz("gaze"))
    rng = np.random.default_rng(7)
    np.savez(paths["input"], images=rng.integers(0, 256, (5, 3, SIZE, SIZE), dtype=np.uint8))
    paths["bad_model"].write_bytes(b"this is not an onnx model")
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    srv = start_server(tmp_path_factory.mktemp("guard-data"))
    yield srv
    srv.stop(grace=1.0)


@pytest.fixture(scope="module")
def tokens_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("guard-auth")
    tokens = d / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [
        {"token": "registry-token-0123456789", "role": "registry"},
        {"token": "vehicle-token-0123456789", "role": "vehicle"},
        {"token": "admin-token-0123456789abc", "role": "admin"},
    ]}))
    srv = start_server(d / "data", tokens_file=str(tokens))
    yield srv
    srv.stop(grace=1.0)
