"""Synthetic face datasets for gaze and head-pose regression, rendered in vectorised torch.

No real dataset can be shipped or downloaded here, so tests, benchmarks and the model zoo use cartoon faces
whose label is carried by geometry a network has to learn, while identity, skin tone, background, lighting,
position and noise vary independently of the label (so there is no colour or position shortcut):

* **gaze** ``(pitch, yaw)`` degrees, pitch ~ U[-25, 25], yaw ~ U[-35, 35]: a frontal face (skin ellipse, hair,
  eyebrows, nose, mouth) with two eyes; each iris+pupil is displaced inside its eye white by the projection of
  an eyeball rotation, ``(R_x sin(yaw) cos(pitch), -R_y sin(pitch))`` (the same gaze gives the same offset,
  relative to the eye size). The face's own position, scale, eye spacing and eyelid opening vary.
* **headpose** ``(yaw, pitch, roll)`` degrees, yaw ~ U[-45, 45], pitch ~ U[-30, 30], roll ~ U[-25, 25]: a 3-D
  template of landmarks (eyes, eyebrows, nose tip, mouth corners, chin, ears) with per-identity offsets,
  rotated by ``Rz(roll) Ry(yaw) Rx(-pitch)`` and projected orthographically. Landmarks are drawn as soft
  ellipses, fore-shortened and faded as they turn away; the skin region follows the rotated face front.
  Conventions: yaw > 0 moves the nose to the image right, pitch > 0 moves it up, roll > 0 turns the face
  counter-clockwise in the image.

Every image gets a two-colour gradient background with random ellipses, a gain/colour cast, a lighting
gradient and Gaussian noise. The generator is deterministic in ``seed`` (a private ``torch.Generator``; the
global RNG is untouched). Rendering is done in chunks so the per-pixel maps stay in cache.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError
from ..tasks import Task

GAZE_RANGE = ((-25.0, 25.0), (-35.0, 35.0))  # pitch, yaw
HEADPOSE_RANGE = ((-45.0, 45.0), (-30.0, 30.0), (-25.0, 25.0))  # yaw, pitch, roll
_CHUNK = 256


class _Canvas:
    """A chunk of C images (C,3,S,S) and the pixel-centre grid in [-1, 1] (x right, y down)."""

    def __init__(self, c: int, size: int) -> None:
        a = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
        self.v, self.u = a.view(1, size, 1), a.view(1, 1, size)
        self.pix = 2.0 / size
        self.img = torch.empty(c, 3, size, size)

    def ellipse(
        self,
        cx: torch.Tensor,
        cy: torch.Tensor,
        ax: torch.Tensor,
        ay: torch.Tensor,
        angle: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Anti-aliased coverage (C,S,S) in [0,1] of per-image ellipses (centre, semi-axes, angle in rad)."""
        du = self.u - cx.view(-1, 1, 1)
        dv = self.v - cy.view(-1, 1, 1)
        if angle is not None:
            c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
            du, dv = du * c + dv * s, dv * c - du * s
        ax = ax.clamp_min(1e-4).view(-1, 1, 1)
        ay = ay.clamp_min(1e-4).view(-1, 1, 1)
        r = torch.sqrt((du / ax).square_() + (dv / ay).square_())
        # (r - 1) * min-axis approximates the signed distance in image units; a one-pixel ramp anti-aliases.
        return r.sub_(1.0).mul_(torch.minimum(ax, ay) / -self.pix).add_(0.5).clamp_(0.0, 1.0)

    def paint(self, alpha: torch.Tensor, colour: torch.Tensor) -> None:
        """Composites per-image RGB ``colour`` (C,3) over the canvas with coverage ``alpha`` (C,S,S)."""
        self.img.lerp_(colour.view(-1, 3, 1, 1).expand_as(self.img), alpha.unsqueeze(1))


def _u(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=g) * (hi - lo) + lo


def _skin(g: torch.Generator, n: int) -> torch.Tensor:
    """Skin tones from dark to light along a warm ramp, with some per-channel variation."""
    t = torch.rand(n, 1, generator=g)
    dark, light = torch.tensor([0.36, 0.22, 0.14]), torch.tensor([0.96, 0.80, 0.68])
    return (dark + t * (light - dark) + _u(g, n, -0.05, 0.05, 3)).clamp(0, 1)


def _background(cv: _Canvas, g: torch.Generator) -> None:
    n = cv.img.shape[0]
    c1, c2 = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g)
    th = _u(g, n, 0, 2 * math.pi)
    t = (
        (cv.u * torch.cos(th).view(-1, 1, 1) + cv.v * torch.sin(th).view(-1, 1, 1))
        .mul_(0.5)
        .add_(0.5)
        .clamp_(0, 1)
    )
    cv.img.copy_(c1.view(-1, 3, 1, 1).expand_as(cv.img))
    cv.paint(t, c2)
    for _ in range(3):  # distractor shapes, independent of the label
        a = cv.ellipse(
            _u(g, n, -1, 1), _u(g, n, -1, 1), _u(g, n, 0.05, 0.4), _u(g, n, 0.05, 0.4), _u(g, n, 0, math.pi)
        )
        a.mul_(_u(g, n, 0.3, 1.0).view(-1, 1, 1))
        cv.paint(a, torch.rand(n, 3, generator=g))


def _finish(cv: _Canvas, g: torch.Generator) -> torch.Tensor:
    """Camera effects: gain and colour cast, a lighting gradient, Gaussian noise; returns uint8."""
    n = cv.img.shape[0]
    gain = _u(g, n, 0.65, 1.25).view(-1, 1, 1, 1) * _u(g, n, 0.9, 1.1, 3).view(-1, 3, 1, 1)
    th = _u(g, n, 0, 2 * math.pi)
    k = _u(g, n, 0.0, 0.35).view(-1, 1, 1)
    light = 1.0 + k * (cv.u * torch.cos(th).view(-1, 1, 1) + cv.v * torch.sin(th).view(-1, 1, 1))
    img = cv.img.mul_(gain).mul_(light.unsqueeze(1))
    sigma = _u(g, n, 0.0, 0.04).view(-1, 1, 1, 1)
    img.add_(torch.randn(img.shape, generator=g).mul_(sigma))
    return img.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)


def _render_gaze(lab: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n = lab.shape[0]
    cv = _Canvas(n, size)
    _background(cv, g)
    p, y = torch.deg2rad(lab[:, 0]), torch.deg2rad(lab[:, 1])
    s = _u(g, n, 0.78, 1.0)  # face scale
    fx, fy = _u(g, n, -0.12, 0.12), _u(g, n, -0.08, 0.1)
    fw, fh = _u(g, n, 0.88, 1.1), _u(g, n, 0.9, 1.1)
    skin = _skin(g, n)
    hair = torch.rand(n, 3, generator=g) * _u(g, n, 0.1, 0.7).view(-1, 1)
    cv.paint(cv.ellipse(fx, fy - 0.25 * s, 0.7 * s * fw, 0.72 * s * fh), hair)
    cv.paint(cv.ellipse(fx, fy + 0.05 * s, 0.6 * s * fw, 0.78 * s * fh), skin)
    # Eyes: identity sets spacing, height, size and eyelid opening.
    ex, ey = _u(g, n, 0.23, 0.29) * s * fw, _u(g, n, -0.14, -0.06) * s
    eax = _u(g, n, 0.14, 0.17) * s
    eay = eax * _u(g, n, 0.45, 0.62)
    iris_r = eax * _u(g, n, 0.42, 0.5)
    # Eyeball rotation: offsets scale with the eye, so the same gaze gives the same relative offset.
    dx = 1.25 * eax * torch.sin(y) * torch.cos(p)
    dy = -1.5 * eay * torch.sin(p)
    white = (torch.tensor([0.95, 0.95, 0.92]) * _u(g, n, 0.8, 1.0).view(-1, 1)).clamp(0, 1)
    iris_c = torch.rand(n, 3, generator=g) * _u(g, n, 0.25, 0.7).view(-1, 1)
    brow_c = hair * 0.8
    tilt = _u(g, n, -0.15, 0.15)
    for side in (-1.0, 1.0):
        cx, cy = fx + side * ex, fy + ey
        eye = cv.ellipse(cx, cy, eax, eay)
        cv.paint(eye, white)
        cv.paint(cv.ellipse(cx + dx, cy + dy, iris_r, iris_r).mul_(eye), iris_c)
        cv.paint(cv.ellipse(cx + dx, cy + dy, 0.45 * iris_r, 0.45 * iris_r).mul_(eye), torch.zeros(n, 3))
        by = cy - _u(g, n, 0.14, 0.2) * s
        cv.paint(cv.ellipse(cx, by, eax * 1.1, 0.028 * s, side * tilt), brow_c)
    cv.paint(cv.ellipse(fx, fy + 0.16 * s, 0.05 * s, 0.09 * s), skin * 0.8)  # nose
    lips = torch.stack([_u(g, n, 0.5, 0.8), _u(g, n, 0.15, 0.35), _u(g, n, 0.2, 0.35)], 1)
    cv.paint(
        cv.ellipse(fx, fy + _u(g, n, 0.38, 0.46) * s, _u(g, n, 0.14, 0.22) * s, _u(g, n, 0.03, 0.07) * s),
        lips,
    )
    return _finish(cv, g)


# Head template (x right, y up, z towards the camera; head radius about 1).
_TEMPLATE = {
    "eye_l": (-0.33, 0.2, 0.8),
    "eye_r": (0.33, 0.2, 0.8),
    "brow_l": (-0.34, 0.42, 0.78),
    "brow_r": (0.34, 0.42, 0.78),
    "nose": (0.0, -0.08, 1.08),
    "mouth_l": (-0.26, -0.42, 0.78),
    "mouth_r": (0.26, -0.42, 0.78),
    "mouth_c": (0.0, -0.42, 0.86),
    "chin": (0.0, -0.82, 0.62),
    "ear_l": (-0.95, 0.05, 0.0),
    "ear_r": (0.95, 0.05, 0.0),
    "front": (0.0, 0.0, 0.55),
    "crown": (0.0, 0.6, -0.3),
}
_KEYS = list(_TEMPLATE)


def _rotation(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """R = Rz(roll) Ry(yaw) Rx(-pitch), (N,3,3), acting on column vectors (x right, y up, z to camera)."""
    cy, sy, cp, sp, cr, sr = (f(a) for a in (yaw, pitch, roll) for f in (torch.cos, torch.sin))
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)
    rx = torch.stack([one, zero, zero, zero, cp, sp, zero, -sp, cp], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def _render_headpose(lab: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    n = lab.shape[0]
    cv = _Canvas(n, size)
    _background(cv, g)
    yaw, pitch, roll = (torch.deg2rad(lab[:, i]) for i in range(3))
    rot = _rotation(yaw, pitch, roll)
    base = torch.tensor([_TEMPLATE[k] for k in _KEYS])  # (K,3)
    # Identity: per-landmark offsets and a per-face width/height stretch.
    fw, fh = _u(g, n, 0.88, 1.1), _u(g, n, 0.9, 1.1)
    pts = base.unsqueeze(0) + _u(g, n, -0.04, 0.04, len(_KEYS), 3)
    pts = pts * torch.stack([fw, fh, torch.ones(n)], 1).unsqueeze(1)
    rp = pts @ rot.transpose(1, 2)  # (N,K,3) rotated points
    s = _u(g, n, 0.48, 0.6)
    cx0, cy0 = _u(g, n, -0.12, 0.12), _u(g, n, -0.1, 0.1)
    px, py = cx0.view(-1, 1) + s.view(-1, 1) * rp[..., 0], cy0.view(-1, 1) - s.view(-1, 1) * rp[..., 1]
    # Unit normals of landmarks ~ their direction from the head centre; z>0 faces the camera.
    vis = torch.sigmoid(rp[..., 2] / rp.norm(dim=-1).clamp_min(1e-3) * 8.0)  # (N,K)
    img_roll = -roll  # image y points down, so a counter-clockwise roll is a negative image angle
    skin = _skin(g, n)
    hair = torch.rand(n, 3, generator=g) * _u(g, n, 0.1, 0.6).view(-1, 1)
    k = {key: i for i, key in enumerate(_KEYS)}

    def at(key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = k[key]
        return px[:, i], py[:, i], vis[:, i]

    # Head silhouette in hair colour, then the skin of the face front, which moves and narrows with the pose.
    cv.paint(cv.ellipse(cx0, cy0, 0.95 * s * fw, 1.12 * s * fh, img_roll), hair)
    fxp, fyp, _ = at("front")
    front_w = 0.82 * s * fw * (0.55 + 0.45 * torch.cos(yaw))
    front_h = 1.02 * s * fh * (0.7 + 0.3 * torch.cos(pitch))
    cv.paint(cv.ellipse(fxp, fyp + 0.12 * s, front_w, front_h, img_roll), skin)
    # The top of the head shows as hair only when it turns towards the camera (head pitched down).
    crx, cry, crv = at("crown")
    cv.paint(cv.ellipse(crx, cry, 0.7 * s * fw, 0.35 * s, img_roll).mul_(crv.view(-1, 1, 1)), hair)
    for ear in ("ear_l", "ear_r"):
        ex, ey, ev = at(ear)
        side_vis = torch.sigmoid(((rp[:, k[ear], 2]) + 0.25) * 8.0)  # ears show until they turn well away
        a = cv.ellipse(ex, ey, 0.12 * s * (0.3 + 0.7 * (1 - ev)), 0.2 * s, img_roll).mul_(
            side_vis.view(-1, 1, 1)
        )
        cv.paint(a, skin * 0.75)
    fore_x, fore_y = torch.cos(yaw).abs(), torch.cos(pitch).abs()  # fore-shortening of frontal features
    white = (torch.tensor([0.95, 0.95, 0.92]) * _u(g, n, 0.8, 1.0).view(-1, 1)).clamp(0, 1)
    pupil = torch.rand(n, 3, generator=g) * 0.3
    eax, eay = _u(g, n, 0.13, 0.16) * s * fw, _u(g, n, 0.06, 0.085) * s
    for eye, brow in (("eye_l", "brow_l"), ("eye_r", "brow_r")):
        x, y_, v = at(eye)
        e = cv.ellipse(x, y_, eax * fore_x, eay * fore_y, img_roll).mul_(v.view(-1, 1, 1))
        cv.paint(e, white)
        cv.paint(cv.ellipse(x, y_, 0.5 * eay * fore_x, 0.9 * eay * fore_y).mul_(e), pupil)
        bx, by, bv = at(brow)
        cv.paint(
            cv.ellipse(bx, by, eax * 1.1 * fore_x, 0.03 * s, img_roll).mul_(bv.view(-1, 1, 1)), hair * 0.8
        )
    # Mouth: an ellipse spanning the two projected corners (its length and angle follow yaw and roll).
    lx, ly, lv = at("mouth_l")
    rx_, ry_, rv = at("mouth_r")
    mx, my, mv = at("mouth_c")
    half = 0.5 * torch.sqrt((rx_ - lx) ** 2 + (ry_ - ly) ** 2)
    ang = torch.atan2(ry_ - ly, rx_ - lx)
    lips = torch.stack([_u(g, n, 0.5, 0.8), _u(g, n, 0.15, 0.35), _u(g, n, 0.2, 0.35)], 1)
    m_alpha = cv.ellipse(mx, my, half, _u(g, n, 0.035, 0.06) * s * fore_y, ang).mul_(mv.view(-1, 1, 1))
    cv.paint(m_alpha, lips)
    nx, ny, nv = at("nose")
    cv.paint(cv.ellipse(nx, ny, 0.075 * s, 0.085 * s).mul_(nv.view(-1, 1, 1)), skin * 0.72)
    chx, chy, chv = at("chin")
    cv.paint(
        cv.ellipse(chx, chy, 0.14 * s * fore_x, 0.05 * s, img_roll).mul_(chv.view(-1, 1, 1) * 0.6), skin * 0.8
    )
    return _finish(cv, g)


def sample_labels(task: Task | str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform labels (N,d) in degrees over the task's range."""
    task = Task.parse(task)
    ranges = GAZE_RANGE if task is Task.GAZE else HEADPOSE_RANGE
    lo = torch.tensor([r[0] for r in ranges])
    hi = torch.tensor([r[1] for r in ranges])
    return lo + torch.rand(n, len(ranges), generator=generator) * (hi - lo)


def make_dataset(
    task: Task | str, n: int, size: int = 64, seed: int = 0, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Renders ``n`` synthetic faces.

    Args:
        task: ``gaze`` (labels pitch, yaw) or ``headpose`` (labels yaw, pitch, roll), degrees.
        n: number of images.
        size: square side in pixels (16..512).
        seed: the same (task, n, size, seed) always gives the same arrays.
        labels: optional (n, d) labels to render instead of random ones; everything else (identity,
            background, lighting, noise) is drawn exactly as without them, so the same seed renders the same
            faces with a different gaze or pose (useful for tests and for controlled probes).

    Returns:
        ``(images, labels)``: uint8 (N,3,S,S) and float32 (N,d).

    Raises:
        ConfigError: ``n`` or ``size`` out of range.
    """
    task = Task.parse(task)
    if not (1 <= int(n) <= 1_000_000):
        raise ConfigError(f"n must be in 1..1000000, got {n}")
    if not (16 <= int(size) <= 512):
        raise ConfigError(f"size must be in 16..512 pixels, got {size}")
    g = torch.Generator().manual_seed(int(seed))
    drawn = sample_labels(
        task, int(n), g
    )  # always drawn, so the rest of the stream does not depend on labels
    if labels is None:
        labels_t = drawn
    else:
        arr = np.asarray(labels, dtype=np.float32)
        if arr.shape != (int(n), task.dim) or not np.isfinite(arr).all():
            raise ConfigError(f"labels must be finite with shape ({n}, {task.dim}), got {arr.shape}")
        labels_t = torch.from_numpy(arr.copy())
    render = _render_gaze if task is Task.GAZE else _render_headpose
    out = np.empty((int(n), 3, int(size), int(size)), np.uint8)
    with torch.no_grad():
        for i in range(0, int(n), _CHUNK):
            out[i : i + _CHUNK] = render(labels_t[i : i + _CHUNK], int(size), g).numpy()
    return out, labels_t.numpy().astype(np.float32)


__all__ = ["GAZE_RANGE", "HEADPOSE_RANGE", "make_dataset", "sample_labels"]
