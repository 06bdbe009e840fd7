"""Reads Predict inputs in the benign-dataset ``.npz`` format with numpy only (no torch).

The format (shared with the engine's ``drmguard_engine.data.benign``): ``images`` (N, C, H, W), uint8 in
0..255 or float32 in [0, 1]; ``labels`` (N, d) optional. Files are opened with ``allow_pickle=False``
so an object array is refused rather than unpickled.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["load_images_npz", "check_images"]


def check_images(images: np.ndarray, *, what: str = "images") -> np.ndarray:
    """Checks a batch of images and returns it as contiguous float32 in [0, 1] or uint8.

    uint8 batches are passed through unchanged (the server converts them, and they are 4x smaller
    on the wire); float batches must be finite and in [0, 1].

    Raises:
        ValueError: naming the problem and the fix.
    """
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"{what}: expected shape (N, C, H, W), got {tuple(images.shape)}; "
            "store channels first (np.transpose(images, (0, 3, 1, 2)) for NHWC data)"
        )
    if images.shape[0] < 1:
        raise ValueError(f"{what}: the batch is empty; pass at least one image")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if images.dtype in (np.float16, np.float32, np.float64):
        x = np.ascontiguousarray(images, dtype=np.float32)  # no copy for contiguous float32
        # min/max propagate NaN, so one pass each also catches NaN; Inf fails the range check.
        lo, hi = float(x.min()), float(x.max())
        if np.isnan(lo) or np.isnan(hi):
            raise ValueError(f"{what}: contains NaN values; fix or drop those images")
        if not (lo >= -1e-6 and hi <= 1 + 1e-6):
            raise ValueError(
                f"{what}: float images must be in [0, 1], found [{lo:.4g}, {hi:.4g}]; "
                "divide 0-255 data by 255 or store it as uint8"
            )
        return np.clip(x, 0.0, 1.0) if lo < 0.0 or hi > 1.0 else x
    raise ValueError(f"{what}: images must be uint8 (0-255) or float32 in [0, 1], got dtype {images.dtype}")


def load_images_npz(source: str | os.PathLike[str] | bytes) -> np.ndarray:
    """Reads the ``images`` array of a benign-format ``.npz`` (path or bytes) and checks it.

    Raises:
        ValueError: the file is missing, not an ``.npz``, has no ``images`` or holds bad values.
    """
    what = "input" if isinstance(source, bytes | bytearray) else f"input {str(source)!r}"
    raw: io.BytesIO | str | os.PathLike[str] = (
        io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else source
    )
    try:
        loaded = np.load(raw, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what}: is a directory, expected an .npz file") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{what}: not a readable .npz file ({exc})") from None
    except ValueError:
        # numpy falls back to unpickling what is neither .npz nor .npy; that is refused, so it is no .npz.
        raise ValueError(f"{what}: not an .npz file; save one with np.savez(path, images=...)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{what}: is a plain .npy array; save an .npz with np.savez(path, images=...)")
    try:
        with loaded as z:
            if "images" not in z.files:
                raise ValueError(
                    f"{what}: no 'images' array (found {sorted(z.files) or 'none'}); "
                    "save with np.savez(path, images=...)"
                )
            images = z["images"]
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ValueError(f"{what}: 'images' is an object array, which is refused; store plain numbers") from None
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{what}: not a readable .npz file ({exc})") from None
    return check_images(images, what=what)


def read_file_bytes(path: str | os.PathLike[str], *, what: str) -> bytes:
    """Reads a whole file, turning a missing or unreadable file into a ValueError naming it."""
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(p)!r}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {str(p)!r}: is a directory, expected a file") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(p)!r}: cannot be read ({exc.strerror})") from None
