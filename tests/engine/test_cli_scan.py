"""`drmguard-engine scan` and `mitigate` as a user runs them: real subprocess, real files, small budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drmguard_engine.data.synthetic import make_dataset
from drmguard_engine.models import build_model
from drmguard_engine.onnx_io import export_onnx

SMALL = ["--profile", "fast", "--set", "steps=5", "--set", "probe_steps=5"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "drmguard_engine", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_scan")
    model = build_model("tiny", "gaze", input_size=16, seed=0).eval()
    export_onnx(model, d / "m.onnx", input_shape=(3, 16, 16))
    x, y = make_dataset("gaze", 40, size=16, seed=1)
    np.savez(d / "b.npz", images=x, labels=y)
    (d / "bad.onnx").write_bytes((d / "m.onnx").read_bytes()[:200])
    return {"dir": d, "model": d / "m.onnx", "benign": d / "b.npz", "bad": d / "bad.onnx"}


def test_scan_json_report_and_plots(files: dict[str, Path]) -> None:
    rep, plots = files["dir"] / "r.json", files["dir"] / "plots"
    r = _run("scan", "--model", str(files["model"]), "--benign", str(files["benign"]), "--task", "gaze",
             "--report", str(rep), "--plots", str(plots), "--json", "--device", "cpu", *SMALL)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert out["verdict"] in ("benign", "backdoored")
    assert (out["verdict"] == "backdoored") == (out["score"] >= out["score_threshold"])
    full = json.loads(rep.read_text())
    for key in ("verdict", "perturbation_ratio", "threshold", "score", "score_threshold", "decision",
                "estimated_target", "steps", "seconds", "probes", "loss_history"):
        assert key in full, key
    assert len(full["estimated_target"]) == 2 and full["threshold"] == 0.03
    assert {p.name for p in plots.iterdir()} >= {"images.png", "target.png", "angles.png", "loss.png"}


def test_scan_bad_model_is_one_line_exit_2(files: dict[str, Path]) -> None:
    r = _run("scan", "--model", str(files["bad"]), "--benign", str(files["benign"]), "--task", "gaze",
             "--report", str(files["dir"] / "x.json"), *SMALL)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("drmguard-engine: error:") and "ONNX" in lines[0]
    assert "Traceback" not in r.stderr


def test_scan_wrong_task_and_unknown_profile(files: dict[str, Path]) -> None:
    base = ["scan", "--model", str(files["model"]), "--benign", str(files["benign"]),
            "--report", str(files["dir"] / "y.json")]
    r = _run(*base, "--task", "headpose")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _run(*base, "--task", "gaze", "--profile", "nope")
    assert r.returncode == 2 and "unknown scan profile" in r.stderr
    r = _run(*base, "--task", "gaze", "--workers", "-1")
    assert r.returncode == 2 and "--workers must be" in r.stderr and "Traceback" not in r.stderr


def test_mitigate_force_writes_a_loadable_model(files: dict[str, Path]) -> None:
    out, rep = files["dir"] / "fixed.onnx", files["dir"] / "m.json"
    r = _run("mitigate", "--model", str(files["model"]), "--benign", str(files["benign"]), "--task", "gaze",
             "--out", str(out), "--report", str(rep), "--force", "--steps", "5", "--cv-folds", "2", "--workers", "2",
             "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["mitigated"] is True and out.is_file()
    # the cross-validated cost covers the whole benign set, the hold-out figures only the held-back fifth
    assert res["clean_cost"]["folds"] == 2 and res["clean_cost"]["n"] == 40 and res["holdout_size"] == 8
    assert json.loads(rep.read_text())["mitigation"]["clean_cost"] == res["clean_cost"]
    import onnxruntime as ort

    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input"
    y = sess.run(None, {"input": np.random.rand(2, 3, 16, 16).astype(np.float32)})[0]
    assert y.shape == (2, 2)
    r = _run("mitigate", "--model", str(files["model"]), "--benign", str(files["benign"]), "--task", "gaze",
             "--out", str(out), "--report", str(rep), "--force", "--steps", "5", "--cv-folds", "1", *SMALL)
    assert r.returncode == 2 and "folds" in r.stderr and "Traceback" not in r.stderr, r.stderr
