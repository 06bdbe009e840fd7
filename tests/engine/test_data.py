from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from drmguard_engine.data import real
from drmguard_engine.data.split import paper_split
from drmguard_engine.data.synthetic import GAZE_RANGE, HEADPOSE_RANGE, make_dataset
from drmguard_engine.errors import ConfigError, DataError

Image = pytest.importorskip("PIL.Image")


@pytest.mark.parametrize("task,d,ranges", [("gaze", 2, GAZE_RANGE), ("headpose", 3, HEADPOSE_RANGE)])
def test_synthetic_shapes_ranges_and_determinism(task: str, d: int, ranges) -> None:
    x, y = make_dataset(task, 40, size=32, seed=3)
    assert x.dtype == np.uint8 and x.shape == (40, 3, 32, 32)
    assert y.dtype == np.float32 and y.shape == (40, d)
    for j, (lo, hi) in enumerate(ranges):
        assert lo <= y[:, j].min() and y[:, j].max() <= hi
        assert y[:, j].std() > (hi - lo) / 6  # spread over the range, not constant
    x2, y2 = make_dataset(task, 40, size=32, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = make_dataset(task, 40, size=32, seed=4)
    assert not np.array_equal(x, x3)
    # Images are varied (backgrounds, faces, noise), not near-constant.
    assert x.std() > 30 and len({img.tobytes() for img in x}) == 40


def test_synthetic_gaze_iris_moves_with_yaw_and_pitch() -> None:
    """Same faces (same seed), gaze to the left vs to the right: the pupils move right with yaw."""
    n = 20
    left = np.tile(np.array([[0.0, -30.0]], np.float32), (n, 1))
    right = np.tile(np.array([[0.0, 30.0]], np.float32), (n, 1))
    xl, yl = make_dataset("gaze", n, size=64, seed=5, labels=left)
    xr, _ = make_dataset("gaze", n, size=64, seed=5, labels=right)
    np.testing.assert_array_equal(yl, left)
    gl, gr = xl.astype(np.float32).mean(1), xr.astype(np.float32).mean(1)
    cols = np.arange(64, dtype=np.float32)
    darker_r = np.clip(gl - gr, 0, None)  # where the right-gaze image is darker: its pupils
    darker_l = np.clip(gr - gl, 0, None)
    cx_r = (darker_r.sum(1) * cols).sum(1) / darker_r.sum((1, 2))
    cx_l = (darker_l.sum(1) * cols).sum(1) / darker_l.sum((1, 2))
    assert (cx_r > cx_l).mean() >= 0.9
    # Only the eyes change: most of the image is identical.
    assert (np.abs(gl - gr) > 1).mean() < 0.1
    up = np.tile(np.array([[20.0, 0.0]], np.float32), (n, 1))
    down = np.tile(np.array([[-20.0, 0.0]], np.float32), (n, 1))
    gu = make_dataset("gaze", n, size=64, seed=5, labels=up)[0].astype(np.float32).mean(1)
    gd = make_dataset("gaze", n, size=64, seed=5, labels=down)[0].astype(np.float32).mean(1)
    rows = cols
    du, dd = np.clip(gd - gu, 0, None), np.clip(gu - gd, 0, None)
    cy_u = (du.sum(2) * rows).sum(1) / du.sum((1, 2))
    cy_d = (dd.sum(2) * rows).sum(1) / dd.sum((1, 2))
    assert (cy_u < cy_d).mean() >= 0.9  # looking up moves the pupils up (smaller row index)


def test_synthetic_headpose_nose_follows_yaw() -> None:
    n = 20
    a = np.tile(np.array([[-35.0, 0.0, 0.0]], np.float32), (n, 1))
    b = np.tile(np.array([[35.0, 0.0, 0.0]], np.float32), (n, 1))
    xa = make_dataset("headpose", n, size=64, seed=2, labels=a)[0].astype(np.float32).mean(1)
    xb = make_dataset("headpose", n, size=64, seed=2, labels=b)[0].astype(np.float32).mean(1)
    diff = np.abs(xa - xb)
    assert (diff.reshape(n, -1) > 10).mean(1).min() > 0.02  # the pose visibly changes every face
    with pytest.raises(ConfigError):
        make_dataset("headpose", 2, labels=np.zeros((2, 2), np.float32))


def test_synthetic_bad_args() -> None:
    with pytest.raises(ConfigError):
        make_dataset("gaze", 0)
    with pytest.raises(ConfigError):
        make_dataset("gaze", 4, size=8)
    with pytest.raises(ConfigError):
        make_dataset("pose", 4)


def test_paper_split_is_disjoint_80_10_10() -> None:
    tr, be, te = paper_split(1000, seed=1)
    assert (len(tr), len(be), len(te)) == (800, 100, 100)
    allidx = np.concatenate([tr, be, te])
    assert sorted(allidx.tolist()) == list(range(1000))
    tr2, be2, _ = paper_split(1000, seed=1)
    np.testing.assert_array_equal(be, be2)
    assert not np.array_equal(be, paper_split(1000, seed=2)[1])
    assert len(paper_split(200, fractions=(0.8, 0.15, 0.05))[1]) == 30
    with pytest.raises(ConfigError):
        paper_split(2)


def _write(path, size=(80, 60), colour=(200, 30, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_mpiifacegaze_loader(tmp_path) -> None:
    _write(tmp_path / "p00/day01/0001.jpg", (120, 100), (10, 200, 10))
    _write(tmp_path / "p00/day01/0002.jpg", (120, 100), (10, 10, 200))
    d = 600.0
    lm = "50 40 56 40 64 40 70 40 54 60 66 60"
    head = "0 0 0 0 0 600"
    gt1 = f"{-d * math.tan(math.radians(10)):.6f} 0 0"  # target to the camera's left: yaw +10
    gt2 = f"0 {-d * math.tan(math.radians(5)):.6f} 0"  # target above: pitch +5
    lines = [
        f"day01/0001.jpg 10 20 {lm} {head} 0 0 {d} {gt1} left",
        f"day01/0002.jpg 10 20 {lm} {head} 0 0 {d} {gt2} right",
    ]
    (tmp_path / "p00/p00.txt").write_text("\n".join(lines) + "\n")
    x, y = real.load_mpiifacegaze(tmp_path, size=16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.uint8
    np.testing.assert_allclose(y, [[0.0, 10.0], [5.0, 0.0]], atol=1e-4)
    # The crop is centred on the landmarks: the image is uniformly green there.
    assert abs(int(x[0, 1, 8, 8]) - 200) <= 2
    (tmp_path / "p00/p00.txt").write_text("day01/0001.jpg 1 2 3\n")
    with pytest.raises(DataError, match="27 fields"):
        real.load_mpiifacegaze(tmp_path, size=16)


def test_columbiagaze_loader(tmp_path) -> None:
    _write(tmp_path / "0001/0001_2m_0P_10V_-5H.jpg")
    _write(tmp_path / "0001/0001_2m_15P_0V_-5H.jpg")
    (tmp_path / "0001/readme.txt").write_text("ignored: not a ColumbiaGaze name")
    x, y = real.load_columbiagaze(tmp_path, size=24, frame="head")
    assert x.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(y, [[10, -5], [0, -5]])
    _, yc = real.load_columbiagaze(tmp_path, size=24)
    np.testing.assert_allclose(yc, [[10, -5], [0, 10]], atol=1e-4)
    assert int(x[0, 0, 12, 12]) == 200  # centre-square crop of a uniform image


def test_biwi_loader(tmp_path) -> None:
    t = math.radians(20)
    rots = {
        "00003": np.eye(3),
        "00004": np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]]),
    }
    for frame, rot in rots.items():
        _write(tmp_path / f"01/frame_{frame}_rgb.png")
        text = "\n".join(" ".join(f"{v:.6f}" for v in row) + " " for row in rot) + "\n\n12.1 -3.4 900.2 \n"
        (tmp_path / f"01/frame_{frame}_pose.txt").write_text(text)
    x, y = real.load_biwi(tmp_path, size=16)
    assert x.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(y, [[0, 0, 0], [20, 0, 0]], atol=1e-4)
    ypr = real.biwi_angles(
        np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    )
    np.testing.assert_allclose(ypr, (0, 0, 20), atol=1e-4)


def test_pandora_loaders(tmp_path) -> None:
    _write(tmp_path / "crop/01/frame_000005_face_rgb.png")
    (tmp_path / "crop/01/angles.txt").write_text("5\t1.5\t-2.0\t30.0\n")
    x, y = real.load_pandora(tmp_path / "crop", size=16)
    assert x.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(y, [[30.0, -2.0, 1.5]])
    _write(tmp_path / "full/01/base_1_ID01/RGB/frame_000007_RGB.png")
    rows = [{"frame_num": 7, "orientation": {"euler": {"roll": 3.0, "pitch": 4.0, "yaw": -5.0}}}]
    (tmp_path / "full/01/base_1_ID01/data.json").write_text(json.dumps(rows))
    _, y2 = real.load_pandora(tmp_path / "full", size=16)
    np.testing.assert_allclose(y2, [[-5.0, 4.0, 3.0]])


def test_real_loader_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no samples"):
        real.load_biwi(tmp_path)
    (tmp_path / "01").mkdir()
    (tmp_path / "01/frame_00001_pose.txt").write_text("1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(DataError, match="missing"):
        real.load_biwi(tmp_path)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"images": np.zeros((4, 3, 8, 8), np.uint16)}, "must be uint8 (0-255) or float32 in [0, 1]"),
    ({"X": np.zeros((4, 3, 8, 8), np.uint8)}, "no 'images' array (found ['X'])"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "must have 1 or 3 channels in axis 1"),
    ({"images": np.zeros((4, 8, 8), np.uint8)}, "add the channel axis of greyscale images"),
    ({"images": np.full((4, 3, 8, 8), 200.0, np.float32)}, "divide 0-255 data by 255 or store it as uint8"),
    ({"images": np.array([None] * 4, dtype=object)}, "cannot be read without pickle"),
])
def test_a_malformed_benign_file_is_refused_with_the_fix(arrays, message) -> None:
    import io

    from drmguard_engine.data.benign import load_benign_npz

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(DataError, match=re.escape(message)):
        load_benign_npz(buf.getvalue(), task="gaze", require_labels=False)
