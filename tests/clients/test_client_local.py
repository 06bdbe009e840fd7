"""Client tests that need no guard server: packaging, input checks, CLI usage, health, progress."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest

from guard_client import GuardClient, GuardError, load_images_npz
from guard_client.cli import main
from guard_client.progress import ProgressLine
from guard_client.types import ScanEvent


def test_client_imports_without_torch() -> None:
    code = (
        "import sys, guard_client, guard_api, guard_client.cli\n"
        "from guard_api.drmguard.v1 import guard_pb2, guard_pb2_grpc\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'drmguard_engine', 'guard_server', 'onnxruntime'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the client pulled in {out.stdout.strip()}"


def _npz(**arrays: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


def test_load_images_npz_accepts_benign_format() -> None:
    u8 = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    got = load_images_npz(_npz(images=u8, labels=np.zeros((3, 2), np.float32)))
    assert got.dtype == np.uint8 and np.array_equal(got, u8)
    f32 = (u8 / 255.0).astype(np.float32)
    assert np.allclose(load_images_npz(_npz(images=f32)), f32)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_npz(labels=np.zeros((2, 2))), "no 'images'"),
        (_npz(images=np.zeros((3, 8, 8), np.float32)), "(N, C, H, W)"),
        (_npz(images=np.full((1, 3, 4, 4), 2.0, np.float32)), "[0, 1]"),
        (_npz(images=np.full((1, 3, 4, 4), np.nan, np.float32)), "NaN"),
        (_npz(images=np.zeros((1, 3, 4, 4), np.int32)), "uint8"),
        (_npz(images=np.array([object()] * 4, dtype=object)), "object"),
        (b"not a zip at all", "not an .npz"),
    ],
)
def test_load_images_npz_refuses_bad_input(data: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=None) as ei:
        load_images_npz(data)
    assert words in str(ei.value)


def test_cli_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["--server", "127.0.0.1:1", "vet", "--model", "m.onnx"])
    assert ei.value.code == 2


def test_cli_unreachable_server_is_one_line_no_traceback() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "guard_client.cli", "--server", "127.0.0.1:1", "--timeout", "2", "models", "--json"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "UNAVAILABLE" in lines[0] and "Traceback" not in out.stderr


def test_cli_predict_bad_input_file(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--server", "127.0.0.1:1", "predict", "--name", "m", "--input", str(tmp_path) + "/missing.npz"])
    err = capsys.readouterr().err
    assert rc == 1 and "INVALID_ARGUMENT" in err and "no such file" in err


def test_client_refuses_half_mtls() -> None:
    with pytest.raises(GuardError) as ei:
        GuardClient("127.0.0.1:1", tls_cert="c.pem")
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_health_against_the_standard_health_service() -> None:
    """The client's hand-encoded grpc.health.v1 messages against grpcio-health-checking's servicer."""
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("drmguard.v1.Guard", health_pb2.HealthCheckResponse.NOT_SERVING)
        with GuardClient(f"127.0.0.1:{port}", timeout=5) as c:
            assert c.health() == "SERVING"
            assert c.health("drmguard.v1.Guard") == "NOT_SERVING"
            with pytest.raises(GuardError) as ei:
                c.health("no.such.Service")
            assert ei.value.code == grpc.StatusCode.NOT_FOUND
        assert main(["--server", f"127.0.0.1:{port}", "health"]) == 0
        assert main(["--server", f"127.0.0.1:{port}", "health", "--service", "drmguard.v1.Guard"]) == 3
    finally:
        server.stop(None)


def test_progress_line_plain_output() -> None:
    buf = io.StringIO()
    bar = ProgressLine(buf, log_every=0.0)
    bar.update(ScanEvent(scan_id="s", state="QUEUED"))
    bar.update(ScanEvent(scan_id="s", state="SCANNING", phase="reverse", step=5, total=10,
                         losses={"total": 1.5, "l1": 0.25}, perturbation_ratio=0.0123))
    bar.update(ScanEvent(scan_id="s", state="ADMITTED", verdict="benign", perturbation_ratio=0.01))
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[QUEUED]"
    assert "reverse" in lines[1] and "5/10" in lines[1] and "losses total=1.5 l1=0.25" in lines[1]
    assert "ratio 0.0123" in lines[1]
    assert lines[2].startswith("[ADMITTED]") and "verdict benign" in lines[2]


def test_scan_event_json_roundtrip() -> None:
    ev = ScanEvent(scan_id="s", state="REJECTED", verdict="backdoored")
    assert json.loads(json.dumps(ev.to_dict()))["final"] is True
