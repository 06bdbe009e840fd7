"""ONNX Runtime sessions for admitted versions, built from bytes (never from user-chosen paths).

Providers are requested in the configured order (TensorRT -> CUDA -> CPU by default), filtered by what
this onnxruntime build offers; the providers the session actually uses are reported, because ORT falls
back silently (a missing TensorRT lands on CPU, not CUDA).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(double)": np.float64,
              "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
ORT_TO_OIP = {"tensor(float)": "FP32", "tensor(uint8)": "UINT8", "tensor(double)": "FP64",
              "tensor(float16)": "FP16", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


@dataclass
class TensorSpec:
    name: str
    ort_type: str
    shape: list[int]  # -1 for a dynamic dimension

    @property
    def np_dtype(self) -> type:
        return _ORT_TO_NP.get(self.ort_type, np.float32)

    @property
    def oip_datatype(self) -> str:
        return ORT_TO_OIP.get(self.ort_type, "FP32")


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
    return TensorSpec(arg.name, arg.type, shape)


@dataclass
class LoadedModel:
    """One admitted version with its session. `run` is thread-safe (ORT sessions are)."""

    name: str
    version: str
    sha256: str
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    providers: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def provider(self) -> str:
        return self.providers[0] if self.providers else ""

    @property
    def input_chw(self) -> tuple[int, ...]:
        """The input's non-batch dims as the graph declares them: (C, H, W), or (H, W, C) if channels-last."""
        return tuple(self.inputs[0].shape[1:])

    @property
    def channels_last(self) -> bool:
        """An (N, H, W, C) image input, by the rule the engine imports it with."""
        from drmguard_engine.onnx_io import input_layout

        return input_layout(self.inputs[0].shape) == "NHWC"

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph fixes (an export without a dynamic batch axis), else ``None``."""
        d = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else -1
        return d if d > 0 else None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the session. A graph with a fixed batch size takes any multiple of it, in chunks of it."""
        fb = self.fixed_batch
        n = next(iter(feeds.values())).shape[0] if len(feeds) == 1 else fb
        if fb is None or n == fb:
            return self.session.run(None, feeds)
        if not n or n % fb:
            raise InvalidRequestError(f"this model's graph fixes its batch size at {fb}; send a multiple of "
                                      f"{fb} images, not {n}")
        ((name, x),) = feeds.items()
        parts = [self.session.run(None, {name: x[i:i + fb]}) for i in range(0, n, fb)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_preloaded = False


def _preload_gpu_libraries() -> None:
    """Loads CUDA and cuDNN for ORT's GPU providers from the process's torch or the nvidia pip packages.

    ``onnxruntime-gpu`` links its CUDA provider against the CUDA runtime, cuBLAS and cuDNN sonames but ships
    none of them; without this (or LD_LIBRARY_PATH) session creation falls back to the CPU. Once per process; a
    failure only means the fallback below reports the CPU provider.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - best effort; the session reports what it actually uses
        logger.warning("could not preload CUDA/cuDNN libraries for onnxruntime: %s", exc)


def resolve_providers(requested: tuple[str, ...] | list[str]) -> list[str]:
    """The requested providers this onnxruntime build has, in order; CPU always last as the fallback."""
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if any(p in _GPU_PROVIDERS for p in chosen):
        _preload_gpu_libraries()
    return chosen


def load_session(name: str, version: str, sha256: str, data: bytes, *, providers: list[str],
                 cache_dir: Path | None = None, intra_threads: int = 0, spinning: bool = True) -> LoadedModel:
    """Builds a session from bytes and runs one warm-up inference on zeros.

    ``spinning=False`` sets ``session.intra_op.allow_spinning=0``: ORT's worker threads then sleep between runs
    instead of busy-waiting, which leaves the cores to the gRPC threads (and to scans) on a small CPU.

    Raises:
        RuntimeError: the session cannot be built or the warm-up fails (the version is then not served).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_threads:
        opts.intra_op_num_threads = intra_threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider_options: list[dict[str, str]] = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and cache_dir is not None:
            # Engine caches are keyed by the model's sha256 so a different model never reuses one.
            d = cache_dir / sha256
            d.mkdir(parents=True, exist_ok=True)
            provider_options.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(d),
                                     "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(d)})
        elif p == "CUDAExecutionProvider":
            # FP32 outputs that match the CPU provider within 1e-3: no TF32 tensor-core rounding in convolutions.
            provider_options.append({"use_tf32": "0"})
        else:
            provider_options.append({})
    sess = ort.InferenceSession(data, sess_options=opts, providers=providers, provider_options=provider_options)
    loaded = LoadedModel(name, version, sha256, sess, [_spec(a) for a in sess.get_inputs()],
                         [_spec(a) for a in sess.get_outputs()], list(sess.get_providers()))
    # Warm-up: a version serves only after it has answered once (Triton #4330: load "succeeds", then fails).
    feeds = {}
    for spec in loaded.inputs:
        shape = [1 if d < 0 else d for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=spec.np_dtype)
    outs = loaded.run(feeds)
    if not outs or not all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f"):
        raise RuntimeError(f"{name}:{version}: warm-up inference returned no or non-finite outputs")
    if providers[0] != "CPUExecutionProvider" and loaded.provider != providers[0]:
        logger.warning("%s:%s requested %s but runs on %s", name, version, providers[0], loaded.provider)
    return loaded
