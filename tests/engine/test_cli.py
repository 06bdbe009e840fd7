from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drmguard_engine import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drmguard-engine: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def gaze_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    assert (
        cli.main(
            [
                "make-data",
                "--task",
                "gaze",
                "--n",
                "60",
                "--size",
                "32",
                "--out",
                str(d / "g.npz"),
                "--split",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    return d


def test_make_data_json_and_split(
    gaze_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(
        capsys,
        "make-data",
        "--task",
        "headpose",
        "--n",
        "20",
        "--size",
        "24",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "h.npz"),
        "--split",
        "--json",
        "--quiet",
    )
    assert code == 0
    res = json.loads(out)  # exactly one JSON object on stdout
    assert res["n"] == 20 and set(res["files"]) == {"all", "train", "benign", "test"}
    with np.load(res["files"]["all"]) as z:
        assert z["images"].shape == (20, 3, 24, 24) and z["labels"].shape == (20, 3)
    sizes = []
    for k in ("train", "benign", "test"):
        with np.load(res["files"][k]) as z:
            sizes.append(len(z["labels"]))
    assert sizes == [16, 2, 2]


def test_train_writes_onnx_and_sidecar(
    gaze_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    out_model = tmp_path / "m.onnx"
    code, out, err = run(
        capsys,
        "train",
        "--task",
        "gaze",
        "--data",
        str(gaze_data / "g.train.npz"),
        "--test-data",
        str(gaze_data / "g.test.npz"),
        "--arch",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        str(out_model),
        "--json",
        "--quiet",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["files"]["model"] == str(out_model)
    assert res["test_metrics"]["re"] > 0
    proto = onnx.load(str(out_model))
    assert [i.name for i in proto.graph.input] == ["input"]
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["arch"] == "tiny" and meta["task"] == "gaze" and meta["input_size"] == 32
    assert meta["schedule"]["steps"] == 3 and meta["attack"] is None


def test_evaluate_reports_re(gaze_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("drmguard_engine.onnx_io")
    model = tmp_path / "m.onnx"
    assert (
        cli.main(
            [
                "train",
                "--task",
                "gaze",
                "--data",
                str(gaze_data / "g.train.npz"),
                "--arch",
                "tiny",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--device",
                "cpu",
                "--out",
                str(model),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(gaze_data / "g.test.npz"),
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == {"re", "n"} and res["n"] == 6 and res["re"] > 0
    # The task comes from the sidecar; without it, --task is required.
    (tmp_path / "m.json").unlink()
    assert_one_line_error(
        *run(capsys, "evaluate", "--model", str(model), "--data", str(gaze_data / "g.test.npz")), "--task"
    )
    # A truncated ONNX file is bad input, not a crash.
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(model.read_bytes()[:100])
    assert_one_line_error(
        *run(
            capsys, "evaluate", "--model", str(bad), "--data", str(gaze_data / "g.test.npz"), "--task", "gaze"
        )
    )


def test_bad_inputs_exit_2_with_one_line(
    gaze_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    train = [
        "train",
        "--task",
        "gaze",
        "--arch",
        "tiny",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "m.onnx"),
    ]
    assert_one_line_error(
        *run(capsys, *train, "--data", str(tmp_path / "missing.npz")), "missing.npz", "does not exist"
    )
    x = np.zeros((4, 3, 16, 16), np.uint8)
    np.savez(tmp_path / "nan.npz", images=x, labels=np.full((4, 2), np.nan, np.float32))
    assert_one_line_error(*run(capsys, *train, "--data", str(tmp_path / "nan.npz")), "NaN")
    np.savez(
        tmp_path / "shape.npz", images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.zeros((4, 2), np.float32)
    )
    assert_one_line_error(*run(capsys, *train, "--data", str(tmp_path / "shape.npz")), "(N, C, H, W)")
    np.savez(tmp_path / "dim.npz", images=x, labels=np.zeros((4, 3), np.float32))
    assert_one_line_error(*run(capsys, *train, "--data", str(tmp_path / "dim.npz")), "label columns")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04garbage")
    assert_one_line_error(*run(capsys, *train, "--data", str(tmp_path / "trunc.npz")), "npz")
    assert_one_line_error(
        *run(capsys, *train, "--data", str(gaze_data / "g.train.npz"), "--size", "64"), "--size"
    )
    assert_one_line_error(
        *run(capsys, *train, "--data", str(gaze_data / "g.train.npz"), "--target", "1,2"), "--attack"
    )
    assert_one_line_error(*run(capsys, *train, "--data", str(gaze_data / "g.train.npz"), "--lr", "5"), "lr")
    assert_one_line_error(*run(capsys, *train, "--data", "x.npz", "--bogus"), "unrecognized")
    assert_one_line_error(
        *run(capsys, "make-data", "--task", "gaze", "--n", "0", "--out", str(tmp_path / "x.npz")), "n must"
    )
    assert_one_line_error(
        *run(capsys, "make-data", "--task", "gaze", "--out", str(tmp_path / "no/dir/x.npz")), "folder"
    )
    assert_one_line_error(
        *run(capsys, "evaluate", "--model", str(tmp_path / "nope.onnx"), "--data", "x.npz"), "nope.onnx"
    )


def test_every_option_has_help() -> None:
    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    assert {"make-data", "train", "evaluate"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), (name, action.dest)


def test_module_entry_point_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "drmguard_engine", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--attack-opt" in proc.stdout


def test_train_with_attack_saves_it_and_evaluate_uses_it(
    gaze_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("drmguard_engine.onnx_io")
    attacks = pytest.importorskip("drmguard_engine.attacks")
    if "badnets" not in attacks.list_attacks():
        pytest.skip("no badnets attack registered")
    model = tmp_path / "bd.onnx"
    code, out, err = run(
        capsys,
        "train",
        "--task",
        "gaze",
        "--data",
        str(gaze_data / "g.train.npz"),
        "--arch",
        "tiny",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--attack",
        "badnets",
        "--target",
        "10,-15",
        "--out",
        str(model),
        "--json",
        "--quiet",
    )
    assert code == 0, err
    res = json.loads(out)
    assert Path(res["files"]["attack"]).is_file()
    assert {"ae", "dae", "rnv", "rav"} <= set(res["train_metrics"])
    assert json.loads((tmp_path / "bd.json").read_text())["attack"]["target"] == [10.0, -15.0]
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(gaze_data / "g.test.npz"),
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    assert {"re", "ae", "dae", "rnv", "rav", "n"} == set(json.loads(out))
    code, out, _ = run(
        capsys,
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(gaze_data / "g.test.npz"),
        "--device",
        "cpu",
        "--json",
        "--quiet",
        "--no-attack",
    )
    assert set(json.loads(out)) == {"re", "n"}
    assert_one_line_error(
        *run(
            capsys,
            "train",
            "--task",
            "gaze",
            "--data",
            str(gaze_data / "g.train.npz"),
            "--out",
            str(tmp_path / "x.onnx"),
            "--attack",
            "badnets",
            "--target",
            "1,2,3",
        ),
        "--target",
    )
