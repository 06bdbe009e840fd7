"""The benign-dataset file format used everywhere (CLI, gRPC): an ``.npz`` with two arrays.

* ``images``: (N, C, H, W), uint8 in 0..255 or float32 in [0, 1].
* ``labels``: (N, d) float32, degrees, in the task's order (gaze: pitch, yaw; head pose: yaw, pitch, roll).
  Optional where only inputs are needed (``require_labels=False``, e.g. Predict inputs).

Files are read with ``allow_pickle=False``: an object array is refused, never unpickled.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..tasks import Task

MAX_IMAGES = 200_000
MAX_SIDE = 1024


@dataclass(frozen=True)
class BenignSet:
    """Images as float32 in [0,1], shape (N,C,H,W); labels (N,d) float32 degrees, or None."""

    images: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> BenignSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        return BenignSet(self.images[idx], None if self.labels is None else self.labels[idx])

    def to_numpy(self) -> dict[str, np.ndarray]:
        out = {"images": self.images.numpy().astype(np.float32)}
        if self.labels is not None:
            out["labels"] = self.labels.numpy().astype(np.float32)
        return out


def validate_arrays(
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    task: Task | str | None = None,
    require_labels: bool = True,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    min_images: int = 1,
    what: str = "dataset",
) -> BenignSet:
    """Checks shape, dtype, range, NaN/Inf and sizes; returns float32 tensors in [0,1].

    Raises:
        DataError: with a message that names the problem and the fix.
    """
    if not isinstance(images, np.ndarray):
        raise DataError(f"{what}: 'images' must be an array, got {type(images).__name__}")
    if images.ndim != 4:
        fix = ("add the channel axis of greyscale images (images[:, None])" if images.ndim == 3
               else "store channels first (use np.transpose(images, (0, 3, 1, 2)) for NHWC data)")
        raise DataError(f"{what}: 'images' must have shape (N, C, H, W), got {tuple(images.shape)}; {fix}")
    n, c, h, w = (int(s) for s in images.shape)
    if n < min_images:
        raise DataError(f"{what}: needs at least {min_images} images, got {n}")
    if n > MAX_IMAGES:
        raise DataError(f"{what}: at most {MAX_IMAGES} images are accepted, got {n}")
    if c not in (1, 3):
        raise DataError(
            f"{what}: images must have 1 or 3 channels in axis 1, got {c} (shape {tuple(images.shape)}); "
            "store them as (N, C, H, W)"
        )
    if not (4 <= h <= MAX_SIDE and 4 <= w <= MAX_SIDE):
        raise DataError(f"{what}: image size {h}x{w} is outside 4..{MAX_SIDE} pixels")
    if channels is not None and c != channels:
        raise DataError(f"{what}: the model expects {channels} channels, the images have {c}")
    if size is not None and (h, w) != tuple(size):
        raise DataError(f"{what}: the model expects {size[0]}x{size[1]} images, the images are {h}x{w}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 255.0
    elif images.dtype in (np.float32, np.float64, np.float16):
        x = images.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{what}: 'images' contain NaN or Inf values; remove or fix those images")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(
                f"{what}: float images must be in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; "
                "divide 0-255 data by 255 or store it as uint8"
            )
        x = np.clip(x, 0.0, 1.0)
    else:
        raise DataError(f"{what}: 'images' must be uint8 (0-255) or float32 in [0, 1], got dtype {images.dtype}")
    lab_t: torch.Tensor | None = None
    if labels is None:
        if require_labels:
            raise DataError(f"{what}: the file has no 'labels' array; add labels of shape (N, d) in degrees")
    else:
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "fiu":
            raise DataError(f"{what}: 'labels' must be a numeric array of shape (N, d)")
        if labels.ndim != 2 or labels.shape[0] != n:
            raise DataError(f"{what}: 'labels' must have shape ({n}, d) to match {n} images, got {tuple(labels.shape)}")
        if task is not None:
            t = Task.parse(task)
            if labels.shape[1] != t.dim:
                raise DataError(
                    f"{what}: task {t.value} needs {t.dim} label columns {t.label_names}, got {labels.shape[1]}"
                )
        lab = labels.astype(np.float32)
        if not np.isfinite(lab).all():
            raise DataError(f"{what}: 'labels' contain NaN or Inf values; remove or fix those rows")
        if np.abs(lab).max(initial=0.0) > 360.0:
            raise DataError(f"{what}: labels must be angles in degrees (|value| <= 360); found {np.abs(lab).max():.4g}")
        lab_t = torch.from_numpy(np.ascontiguousarray(lab))
    return BenignSet(torch.from_numpy(np.ascontiguousarray(x)), lab_t)


def load_benign_npz(
    source: str | os.PathLike[str] | bytes,
    *,
    task: Task | str | None = None,
    require_labels: bool = True,
    **checks: object,
) -> BenignSet:
    """Reads and validates a benign-dataset ``.npz`` from a path or bytes (never unpickles)."""
    what = "benign dataset" if isinstance(source, bytes | bytearray) else f"dataset {Path(source).name!r}"
    try:
        raw: io.BytesIO | str | os.PathLike[str] = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
        with np.load(raw, allow_pickle=False) as z:
            keys = set(z.files)
            if "images" not in keys:
                raise DataError(f"{what}: no 'images' array (found {sorted(keys) or 'none'}); save with np.savez(f, images=..., labels=...)")
            images = z["images"]
            labels = z["labels"] if "labels" in keys else None
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{what}: file not found") from None
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise DataError(f"{what}: cannot be read without pickle ({exc}); store plain numeric arrays") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what}: not a readable .npz file ({exc}); write it with numpy.savez") from None
    return validate_arrays(images, labels, task=task, require_labels=require_labels, what=what, **checks)  # type: ignore[arg-type]


def save_benign_npz(path: str | os.PathLike[str], images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None) -> None:
    """Writes the format above atomically (uint8 images are kept as uint8)."""
    arrays: dict[str, np.ndarray] = {"images": np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.float32)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
