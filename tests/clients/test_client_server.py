"""The client library and the ``drmguard`` CLI against a real drmguard-server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from guard_client import GuardClient, GuardError
from guard_client.cli import main

pytestmark = pytest.mark.integration

VET_KEYS = {"scan_id", "state", "verdict", "perturbation_ratio", "mitigated", "version", "admitted_version",
            "submitted_version", "serving", "reason", "reused", "name"}
MODEL_KEYS = {"name", "version", "task", "state", "verdict", "reason", "sha256", "served", "pinned", "mitigated",
              "parent", "scan_id", "provider", "input_shape", "output_dim"}


def cli(capsys: pytest.CaptureFixture[str], server: Any, *args: str) -> tuple[int, str, str]:
    rc = main(["--server", server.address, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_json(stdout: str) -> dict[str, Any]:
    """stdout with --json must be exactly one JSON object."""
    obj = json.loads(stdout)
    assert isinstance(obj, dict) and stdout.strip().count("\n") == 0
    return obj


def test_vet_wait_predict_models_via_cli(server: Any, files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, server, "vet", "--model", str(files["model"]), "--benign", str(files["benign"]),
                       "--name", "cli-gaze", "--version", "1", "--task", "gaze", "--wait", "--json")
    assert rc == 0, err
    res = one_json(out)
    assert VET_KEYS <= res.keys()
    assert res["state"] == "ADMITTED" and res["verdict"] == "benign" and res["mitigated"] is False
    assert res["admitted_version"] == "1" and res["version"] == "1" and res["serving"] is True
    assert isinstance(res["perturbation_ratio"], float)
    assert "[ADMITTED]" in err, "the progress line goes to stderr"

    # predict --json equals a bare ONNX Runtime session on the same bytes (uint8 input / 255).
    rc, out, err = cli(capsys, server, "predict", "--name", "cli-gaze", "--input", str(files["input"]), "--json")
    assert rc == 0, err
    outputs = np.asarray(one_json(out)["outputs"], dtype=np.float32)
    with np.load(files["input"]) as z:
        x = z["images"].astype(np.float32) / 255.0
    bare = ort.InferenceSession(files["model"].read_bytes(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(outputs, bare.run(None, {"input": x})[0], atol=1e-4)
    assert outputs.shape == (5, 2)

    rc, out, _ = cli(capsys, server, "models", "--json", "--name", "cli-gaze")
    models = one_json(out)["models"]
    assert len(models) == 1 and MODEL_KEYS <= models[0].keys()
    v = models[0]
    assert v["served"] and v["mitigated"] is False and v["parent"] is None and v["state"] == "ADMITTED"
    assert v["input_shape"] == [3, 16, 16] and v["output_dim"] == 2

    # The same bytes again: answered from the record, at once, still exit 0.
    rc, out, err = cli(capsys, server, "vet", "--model", str(files["model"]), "--benign", str(files["benign"]),
                       "--name", "cli-gaze", "--version", "1", "--task", "gaze", "--json")
    assert rc == 0 and one_json(out)["reused"] is True and one_json(out)["scan_id"] == res["scan_id"]

    rc, out, _ = cli(capsys, server, "watch", res["scan_id"], "--json")
    w = one_json(out)
    assert rc == 0 and w["state"] == "ADMITTED" and w["last_event"]["final"] is True
    assert w["report"]["verdict"] == "benign"

    rc, out, _ = cli(capsys, server, "pin", "--name", "cli-gaze", "--version", "1", "--json")
    assert rc == 0 and one_json(out) == {"name": "cli-gaze", "version": "1"}
    rc, out, _ = cli(capsys, server, "health", "--json")
    assert rc == 0 and one_json(out)["status"] == "SERVING"


def test_library_roundtrip_and_errors(server: Any, files: dict[str, Path], make_onnx: Any) -> None:
    with GuardClient(server.address, timeout=30) as c:
        set_id = c.upload_benign(files["benign"], task="gaze")
        model = make_onnx("gaze", seed=2)
        ticket = c.submit(model, benign_set_id=set_id, name="lib-gaze", version="a", task="gaze")
        assert ticket.state in ("RECEIVED", "QUEUED", "SCANNING") and not ticket.reused
        events = list(c.watch(ticket.scan_id))
        assert events[-1].final and events[-1].state in ("ADMITTED", "REJECTED")
        assert any(e.total > 0 and e.losses for e in events), "progress carries steps and loss terms"
        info = c.get_scan(ticket.scan_id)
        assert info.benign_set_id == set_id and info.task == "gaze" and info.verdict in ("benign", "backdoored")
        if info.state == "ADMITTED":
            x = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)
            y = c.predict("lib-gaze", x)
            bare = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            np.testing.assert_allclose(y, bare, atol=1e-4)

        with pytest.raises(GuardError) as ei:
            c.predict("no-such-model", np.zeros((1, 3, 16, 16), np.float32))
        assert ei.value.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in ei.value.message
        with pytest.raises(GuardError) as ei:
            c.vet(b"not onnx", files["benign"], name="junk", version="1", task="gaze")
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GuardError) as ei:
            c.get_scan("no-such-scan")
        assert ei.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(GuardError) as ei:  # checked locally before sending
            c.predict("lib-gaze", np.full((1, 3, 16, 16), 7.0, np.float32))
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "[0, 1]" in ei.value.message


def test_cli_errors_are_one_line_without_traceback(server: Any, files: dict[str, Path]) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "guard_client.cli", "--server", server.address, *args],
                              capture_output=True, text=True, timeout=60)

    for args, code in [
        (("predict", "--name", "nope", "--input", str(files["input"]), "--json"), "NOT_FOUND"),
        (("vet", "--model", str(files["bad_model"]), "--benign", str(files["benign"]), "--name", "junk",
          "--version", "1", "--task", "gaze", "--wait", "--json"), "INVALID_ARGUMENT"),
        (("vet", "--model", "/no/such/file.onnx", "--benign", str(files["benign"]), "--name", "junk",
          "--version", "1", "--task", "gaze"), "INVALID_ARGUMENT"),
        (("rollback", "--name", "nope"), None),
    ]:
        r = run(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stdout == "" and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"drmguard {args[0]}: ")
        if code:
            assert f": {code}: " in lines[0]


def test_token_roles_from_flag_and_environment(tokens_server: Any, files: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.zeros((1, 3, 16, 16), np.float32)
    with GuardClient(tokens_server.address) as anon, pytest.raises(GuardError) as ei:
        anon.list_models()
    assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
    with GuardClient(tokens_server.address, token="vehicle-token-0123456789") as vehicle:
        with pytest.raises(GuardError) as ei:
            vehicle.list_models()
        assert ei.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(GuardError) as ei:  # role accepted; nothing admitted under that name
            vehicle.predict("none", x)
        assert ei.value.code == grpc.StatusCode.NOT_FOUND
    rc = main(["--server", tokens_server.address, "--token", "registry-token-0123456789", "models", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and one_json(out) == {"models": []}
    monkeypatch.setenv("DRMGUARD_TOKEN", "registry-token-0123456789")
    assert main(["--server", tokens_server.address, "models", "--json"]) == 0
    monkeypatch.setenv("DRMGUARD_TOKEN", "vehicle-token-0123456789")
    assert main(["--server", tokens_server.address, "pin", "--name", "x", "--version", "1"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
