"""Compare ONNX importers on the engine's exported models: our interpreter vs onnx2torch.

For ResNet18, ResNet34 and MobileNetV1 (``drmguard_engine.models.build_model``) this exports ONNX with
``export_onnx`` and measures, for each importer: import time, forward time (batch ``--batch``), the max abs
difference to the torch model, and whether gradients reach the input. onnx2torch runs in a separate Python
(``--o2t-python``, a throwaway venv) because it imports torchvision, which our environment does not have;
this script re-runs itself there in ``--worker`` mode, which needs only torch, onnx, numpy and onnx2torch.
ONNX Runtime's CPU forward time is given as a reference.

Run (about 2-4 minutes on 2 cores):
    python3 -m venv /tmp/o2t && /tmp/o2t/bin/pip install torch==2.13.0 onnx2torch
    .venv/bin/python benchmarks/onnx_import.py --o2t-python /tmp/o2t/bin/python --out /tmp/onnx_import.json

Timings use one intra-op thread so that they compare the importers, not the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _times(fn: Any, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _ms(times: list[float]) -> dict[str, float]:
    # The minimum is the robust figure on a loaded shared machine; the median shows the load.
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def _measure_module(module: Any, x_np: np.ndarray, ref: np.ndarray, repeat: int) -> dict[str, Any]:
    import torch

    x = torch.from_numpy(x_np)
    module.eval()
    with torch.no_grad():
        y = module(x)
        forward = _ms(_times(lambda: module(x), repeat))
    out = y.detach().numpy()
    xg = x.clone().requires_grad_(True)
    try:
        module(xg).sum().backward()
        grad_ok = bool(xg.grad is not None and float(xg.grad.abs().sum()) > 0)
    except RuntimeError as e:  # pragma: no cover - reported, not raised
        grad_ok = f"error: {e}"
    return {
        "max_abs_diff": float(np.abs(out - ref).max()) if out.shape == ref.shape else f"shape {out.shape}",
        "forward_ms": forward,
        "grad_to_input": grad_ok,
        "params": int(sum(p.numel() for p in module.parameters())),
    }


def _trained_like_bn(model: Any, seed: int) -> None:
    """Gives every BatchNorm random affine parameters and running statistics, as training would.

    A fresh ResNet zero-initialises the last BatchNorm scale of each residual block, so after the exporter
    folds BatchNorm into the convolutions several weight tensors are all zeros; the exporter then stores one
    copy and adds Identity nodes for the others. Trained models do not have that; fresh ones do
    (``--bn fresh``).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def worker(onnx_dir: Path, repeat: int, stub_torchvision: bool) -> dict[str, Any]:
    """Runs inside the onnx2torch venv: imports each model with onnx2torch and measures it."""
    import torch

    torch.set_num_threads(1)
    result: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    t = time.perf_counter()
    try:
        import onnx2torch  # noqa: F401  (the import itself is under test)
        from onnx2torch import convert
    except Exception as e:  # noqa: BLE001 - report whatever breaks the import
        result["import_error"] = f"{type(e).__name__}: {e}"
        if not stub_torchvision:
            return result
        # onnx2torch needs torchvision only for its NMS and RoiAlign converters; a stand-in module lets the
        # conversion of conv nets be measured anyway (clearly flagged in the result).
        import types

        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "onnx2torch")]:
            del sys.modules[name]

        def _absent(*_a: Any, **_k: Any) -> Any:
            raise NotImplementedError("torchvision stand-in")

        tv = types.ModuleType("torchvision")
        tv.__version__ = "stand-in"  # type: ignore[attr-defined]
        ops = types.ModuleType("torchvision.ops")
        ops.nms = ops.box_convert = ops.roi_align = _absent  # type: ignore[attr-defined]
        tv.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
        result["torchvision_stand_in"] = True
        t = time.perf_counter()
        from onnx2torch import convert
    result["import_module_s"] = time.perf_counter() - t
    try:
        import torchvision

        result["torchvision"] = torchvision.__version__
    except Exception as e:  # noqa: BLE001
        result["torchvision"] = f"{type(e).__name__}: {e}"
    try:
        from importlib.metadata import version

        result["onnx2torch"] = version("onnx2torch")
    except Exception:  # noqa: BLE001
        pass
    # Our importer too, in this same process and torch, so that forward times can be taken interleaved
    # (the shared machine's load shifts by the minute; separate processes are not comparable).
    ours_loader = None
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from drmguard_engine.onnx_io import load_onnx_model as ours_loader
    except Exception as e:  # noqa: BLE001
        result["ours_in_worker"] = f"unavailable: {type(e).__name__}: {e}"
    x = np.load(onnx_dir / "x.npy")
    models = {}
    for path in sorted(onnx_dir.glob("*.onnx")):
        ref = np.load(path.with_suffix(".ref.npy"))
        entry: dict[str, Any] = {}
        try:
            t = time.perf_counter()
            module = convert(str(path))
            entry["import_s"] = time.perf_counter() - t
            entry.update(_measure_module(module, x, ref, repeat))
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
            module = None
        if ours_loader is not None:
            t = time.perf_counter()
            ours = ours_loader(path)
            mine: dict[str, Any] = {"import_s": time.perf_counter() - t}
            mine.update(_measure_module(ours, x, ref, repeat))
            entry["ours_same_process"] = mine
            if module is not None:
                entry["interleaved_forward_ms"] = _interleaved(
                    {"onnx2torch": module, "ours": ours}, x, repeat
                )
        models[path.stem] = entry
    result["models"] = models
    return result


def _interleaved(modules: dict[str, Any], x_np: np.ndarray, repeat: int) -> dict[str, dict[str, float]]:
    """Forward times of several modules taken in turns, so that they share the same machine load."""
    import torch

    x = torch.from_numpy(x_np)
    times: dict[str, list[float]] = {k: [] for k in modules}
    with torch.no_grad():
        for _ in range(repeat):
            for name, m in modules.items():
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    return {k: _ms(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="resnet18,resnet34,mobilenetv1")
    ap.add_argument("--size", type=int, default=64, help="input side in pixels")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--bn",
        choices=("trained", "fresh"),
        default="trained",
        help="BatchNorm state: random as after training (default) or as build_model returns it",
    )
    ap.add_argument("--o2t-python", default=None, help="python of a venv with onnx2torch (skipped if absent)")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument(
        "--stub-torchvision",
        action="store_true",
        help="if onnx2torch fails to import because torchvision does not load, retry with a stand-in module",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker), args.repeat, args.stub_torchvision)))
        return 0

    import onnxruntime as ort
    import torch

    from drmguard_engine.models import build_model
    from drmguard_engine.onnx_io import export_onnx, load_onnx_model

    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="onnx_import_") as tmp:
        work = Path(tmp)
        x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        np.save(work / "x.npy", x.numpy())
        for arch in args.archs.split(","):
            model = build_model(arch, "gaze", input_size=args.size, seed=0).eval()
            if args.bn == "trained":
                _trained_like_bn(model, seed=0)
            with torch.no_grad():
                ref = model(x).numpy()
                torch_fwd = _ms(_times(lambda m=model: m(x), args.repeat))
            t = time.perf_counter()
            data = export_onnx(model, work / f"{arch}.onnx")
            export_s = time.perf_counter() - t
            np.save(work / f"{arch}.ref.npy", ref)
            imports = []
            for _ in range(3):
                t = time.perf_counter()
                imported = load_onnx_model(data)
                imports.append(time.perf_counter() - t)
            ours = {"import_s": statistics.median(imports)} | _measure_module(
                imported, x.numpy(), ref, args.repeat
            )
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            # No spinning worker threads left behind to slow down the torch timings that follow.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
            sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x.numpy()}
            ort_out = sess.run(None, feed)[0]
            rows[arch] = {
                "onnx_bytes": len(data),
                "nodes": len(__import__("onnx").load_model_from_string(data).graph.node),
                "export_s": export_s,
                "torch_forward_ms": torch_fwd,
                "ort_forward_ms": _ms(_times(lambda s=sess, f=feed: s.run(None, f), args.repeat)),
                "ort_max_abs_diff": float(np.abs(ort_out - ref).max()),
                "ref_max_abs": float(np.abs(ref).max()),
                "ours": ours,
            }
            del sess, imported
            print(f"{arch}: ours {json.dumps(ours)}", file=sys.stderr)
        o2t: dict[str, Any] = {"skipped": "no --o2t-python given"}
        if args.o2t_python:
            proc = subprocess.run(
                [args.o2t_python, __file__, "--worker", str(work), "--repeat", str(args.repeat)]
                + (["--stub-torchvision"] if args.stub_torchvision else []),
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if proc.returncode == 0 and proc.stdout.strip():
                o2t = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                o2t = {"worker_failed": proc.stderr[-2000:]}
    result = {
        "size": args.size,
        "batch": args.batch,
        "threads": 1,
        "bn": args.bn,
        "torch": torch.__version__,
        "models": rows,
        "onnx2torch": o2t,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
