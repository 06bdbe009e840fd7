"""Loaders for the paper's four real datasets, from their on-disk formats, into the engine's arrays.

Each loader returns ``(images uint8 (N,3,S,S), labels float32 (N,d))`` in degrees and in the task's order
(gaze: pitch, yaw; head pose: yaw, pitch, roll), like :func:`drmguard_engine.data.synthetic.make_dataset`.
Images are read with Pillow, cropped to a square and resized to ``size`` with bilinear filtering. Nothing is
downloaded: point the loader at a local copy (the datasets have their own licences).

Formats (paper appendix A.2):

* **MPIIFaceGaze** (Zhang et al. 2017): ``pXX/pXX.txt``, one line per image: image path
  (``dayNN/NNNN.jpg``, relative to ``pXX/``), 2-D gaze on screen (2), six facial landmarks (12), head
  rotation as a Rodrigues vector (3) and translation (3), face centre ``fc`` (3), 3-D gaze target ``gt`` (3),
  evaluation eye. The label is the *normalised* gaze of the MPIIFaceGaze tools (Zhang et al. 2018,
  "Revisiting data normalization"): the camera frame is rotated so that z points at ``fc`` and x follows
  the head's x axis; ``g = R (gt - fc)``, pitch = asin(-g_y), yaw = atan2(-g_x, -g_z). The face crop is a
  square around the six landmarks (side = ``crop_scale`` x the landmark span); the perspective warp of full
  normalisation is *not* applied (it needs the camera matrix from ``Calibration/Camera.mat``), so crops keep
  a small residual roll.
* **ColumbiaGaze** (Smith et al. 2013): ``0001/0001_2m_-15P_10V_-5H.jpg``: subject, distance, head pose P
  (camera yaw relative to the head), gaze V (vertical) and H (horizontal), degrees. ``frame="camera"``
  (default) composes the head-frame gaze (V, H) with the yaw P (a rotation about the vertical axis) to give
  the gaze in the camera frame, which is what a full-face model sees; ``frame="head"`` returns (V, H). Files
  are expected to be face crops (the paper crops the faces itself; no detector is shipped): a centred square
  is taken.
* **Biwi Kinect** (Fanelli et al. 2013; cropped faces of Borghi et al. 2017): sequence folders holding
  ``frame_XXXXX_rgb.png`` and ``frame_XXXXX_pose.txt`` (a 3x3 rotation matrix on three lines, then the head
  centre). Angles follow the widely used conversion of the Hopenet/FSA-Net loaders, with ``M = R^T``:
  yaw = -atan2(-M20, hypot(M21, M22)), pitch = atan2(M21, M22), roll = -atan2(M10, M00).
* **Pandora** (Borghi et al. 2017), the authors' *cropped faces* release: per-sequence folders ``NN/`` with
  ``frame_XXXXXX_face_rgb.png`` and one tab-separated ``*.txt`` file, lines ``frame  roll  pitch  yaw``
  (degrees). The full release's ``data.json`` (rows with ``frame_num`` and
  ``orientation.euler.{roll,pitch,yaw}``, frames in ``RGB/frame_XXXXXX_RGB.png``) is read too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError

_MAX_DEFAULT = 200_000


def _pil():  # type: ignore[no-untyped-def]
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a declared dependency of the loaders
        raise DataError("reading real datasets needs Pillow: pip install 'pillow>=10'") from None
    return Image


def read_image(path: Path, size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Reads an image as RGB, crops ``box`` (left, top, right, bottom; default: the centred square), resizes
    to ``size`` x ``size`` and returns uint8 (3,S,S). Regions outside the image are black."""
    image_mod = _pil()
    try:
        with image_mod.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if box is None:
                side = min(w, h)
                box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            im = im.crop(tuple(int(round(b)) for b in box)).resize((size, size), image_mod.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; check the dataset folder is complete") from None
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _stack(
    images: list[np.ndarray], labels: list[Sequence[float]], what: str
) -> tuple[np.ndarray, np.ndarray]:
    if not images:
        raise DataError(
            f"{what}: no samples found; check the path and the folder layout "
            "(see drmguard_engine/data/real.py)"
        )
    return np.stack(images), np.asarray(labels, dtype=np.float32)


def _rodrigues(r: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (axis * angle), as OpenCV's ``Rodrigues``."""
    theta = float(np.linalg.norm(r))
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * kx + (1 - math.cos(theta)) * kx @ kx


def mpii_normalized_gaze(
    face_center: np.ndarray, gaze_target: np.ndarray, head_rvec: np.ndarray
) -> tuple[float, float]:
    """(pitch, yaw) degrees of the normalised gaze direction (MPIIFaceGaze convention)."""
    hrx = _rodrigues(np.asarray(head_rvec, np.float64))[:, 0]
    fc = np.asarray(face_center, np.float64)
    forward = fc / np.linalg.norm(fc)
    down = np.cross(forward, hrx)
    down /= np.linalg.norm(down)
    right = np.cross(down, forward)
    right /= np.linalg.norm(right)
    rot = np.stack([right, down, forward])
    g = rot @ (np.asarray(gaze_target, np.float64) - fc)
    g /= np.linalg.norm(g)
    return math.degrees(math.asin(-g[1])), math.degrees(math.atan2(-g[0], -g[2]))


def load_mpiifacegaze(
    root: str | Path,
    *,
    size: int = 224,
    subjects: Iterable[str] | None = None,
    max_images: int = _MAX_DEFAULT,
    crop_scale: float = 2.2,
) -> tuple[np.ndarray, np.ndarray]:
    """MPIIFaceGaze from ``root/pXX/pXX.txt``; labels (pitch, yaw) degrees (see the module docstring)."""
    root = Path(root)
    ann_files = sorted(root.glob("p*/p*.txt"))
    if subjects is not None:
        keep = set(subjects)
        ann_files = [f for f in ann_files if f.parent.name in keep]
    images: list[np.ndarray] = []
    labels: list[tuple[float, float]] = []
    for ann in ann_files:
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 27:
                raise DataError(f"{ann}:{lineno}: expected at least 27 fields, got {len(parts)}")
            try:
                nums = np.asarray([float(v) for v in parts[1:27]], np.float64)
            except ValueError:
                raise DataError(f"{ann}:{lineno}: non-numeric annotation field") from None
            lm = nums[2:14].reshape(6, 2)
            hr, fc, gt = nums[14:17], nums[20:23], nums[23:26]
            cx, cy = lm.mean(0)
            half = 0.5 * crop_scale * max(float(np.ptp(lm[:, 0])), float(np.ptp(lm[:, 1])), 1.0)
            images.append(
                read_image(ann.parent / parts[0], size, (cx - half, cy - half, cx + half, cy + half))
            )
            labels.append(mpii_normalized_gaze(fc, gt, hr))
            if len(images) >= max_images:
                return _stack(images, labels, "MPIIFaceGaze")
    return _stack(images, labels, "MPIIFaceGaze")


_COLUMBIA = re.compile(r"^(\d+)_(\d+)m_(-?\d+)P_(-?\d+)V_(-?\d+)H\.(jpg|jpeg|png)$", re.IGNORECASE)


def columbia_camera_gaze(p_deg: float, v_deg: float, h_deg: float) -> tuple[float, float]:
    """Head-frame gaze (V, H) composed with head yaw P -> camera-frame (pitch, yaw) degrees."""
    v, h, p = (math.radians(a) for a in (v_deg, h_deg, p_deg))
    x, y, z = math.cos(v) * math.sin(h), math.sin(v), math.cos(v) * math.cos(h)
    # Rotation about the vertical axis by P.
    x, z = x * math.cos(p) + z * math.sin(p), -x * math.sin(p) + z * math.cos(p)
    return math.degrees(math.asin(max(-1.0, min(1.0, y)))), math.degrees(math.atan2(x, z))


def load_columbiagaze(
    root: str | Path, *, size: int = 224, frame: str = "camera", max_images: int = _MAX_DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """ColumbiaGaze from ``root/NNNN/NNNN_2m_<P>P_<V>V_<H>H.jpg``; labels (pitch, yaw) degrees."""
    if frame not in ("camera", "head"):
        raise DataError(f"frame must be 'camera' or 'head', got {frame!r}")
    images: list[np.ndarray] = []
    labels: list[tuple[float, float]] = []
    for path in sorted(Path(root).glob("*/*")):
        m = _COLUMBIA.match(path.name)
        if not m:
            continue
        p, v, h = (float(m.group(i)) for i in (3, 4, 5))
        labels.append(columbia_camera_gaze(p, v, h) if frame == "camera" else (v, h))
        images.append(read_image(path, size))
        if len(images) >= max_images:
            break
    return _stack(images, labels, "ColumbiaGaze")


def biwi_angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) degrees from a Biwi 3x3 rotation matrix (Hopenet/FSA-Net convention)."""
    m = np.asarray(rotation, np.float64).T
    roll = -math.atan2(m[1, 0], m[0, 0])
    yaw = -math.atan2(-m[2, 0], math.hypot(m[2, 1], m[2, 2]))
    pitch = math.atan2(m[2, 1], m[2, 2])
    return math.degrees(yaw), math.degrees(pitch), math.degrees(roll)


def load_biwi(
    root: str | Path, *, size: int = 112, max_images: int = _MAX_DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """Biwi (cropped faces) from ``frame_XXXXX_rgb.png`` + ``frame_XXXXX_pose.txt``; labels (yaw, pitch,
    roll) degrees."""
    images: list[np.ndarray] = []
    labels: list[tuple[float, float, float]] = []
    for pose in sorted(Path(root).rglob("frame_*_pose.txt")):
        rows = [r.split() for r in pose.read_text().splitlines() if r.strip()]
        try:
            rot = np.asarray([[float(v) for v in r] for r in rows[:3]], np.float64)
        except ValueError:
            raise DataError(f"{pose}: non-numeric rotation matrix") from None
        if rot.shape != (3, 3):
            raise DataError(f"{pose}: expected a 3x3 rotation matrix on the first three lines")
        rgb = pose.with_name(pose.name.replace("_pose.txt", "_rgb.png"))
        images.append(read_image(rgb, size))
        labels.append(biwi_angles(rot))
        if len(images) >= max_images:
            break
    return _stack(images, labels, "Biwi")


def load_pandora(
    root: str | Path, *, size: int = 112, max_images: int = _MAX_DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """Pandora cropped faces (``NN/*.txt`` + ``frame_XXXXXX_face_rgb.png``) or full ``data.json`` sequences;
    labels (yaw, pitch, roll) degrees."""
    root = Path(root)
    images: list[np.ndarray] = []
    labels: list[tuple[float, float, float]] = []
    for ann in sorted(root.glob("*/*.txt")):
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            items = line.split()
            if not items:
                continue
            try:
                frame, roll, pitch, yaw = int(items[0]), float(items[1]), float(items[2]), float(items[3])
            except (ValueError, IndexError):
                raise DataError(f"{ann}:{lineno}: expected 'frame<TAB>roll<TAB>pitch<TAB>yaw'") from None
            images.append(read_image(ann.parent / f"frame_{frame:06d}_face_rgb.png", size))
            labels.append((yaw, pitch, roll))
            if len(images) >= max_images:
                return _stack(images, labels, "Pandora")
    for meta in sorted(root.rglob("data.json")):
        try:
            rows = json.loads(meta.read_text())
            for row in rows:
                e = row["orientation"]["euler"]
                frame = int(row["frame_num"])
                labels.append((float(e["yaw"]), float(e["pitch"]), float(e["roll"])))
                images.append(read_image(meta.parent / "RGB" / f"frame_{frame:06d}_RGB.png", size))
                if len(images) >= max_images:
                    return _stack(images, labels, "Pandora")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta}: not a Pandora data.json ({exc!r})") from None
    return _stack(images, labels, "Pandora")


LOADERS = {
    "mpiifacegaze": load_mpiifacegaze,
    "columbiagaze": load_columbiagaze,
    "biwi": load_biwi,
    "pandora": load_pandora,
}
TASK_OF = {"mpiifacegaze": "gaze", "columbiagaze": "gaze", "biwi": "headpose", "pandora": "headpose"}

__all__ = [
    "LOADERS",
    "TASK_OF",
    "biwi_angles",
    "columbia_camera_gaze",
    "load_biwi",
    "load_columbiagaze",
    "load_mpiifacegaze",
    "load_pandora",
    "mpii_normalized_gaze",
    "read_image",
]
