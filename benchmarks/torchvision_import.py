"""torchvision's model zoo, exported as a registry would, through the importer and against ONNX Runtime.

The engine's venv has no torchvision (the CPU torch pin cannot import PyPI's torchvision), so this runs in two
steps. ``export`` runs in a second venv with torch 2.14.1 and torchvision 0.29.1 (a different torch than the
importer's, as a registry's would be) and writes every architecture, its classifier replaced by a 2-output
regression head, with each export form a registry's call produces:

* ``ts-dyn``: ``torch.onnx.export(dynamo=False)`` with a dynamic batch axis, opset 17;
* ``ts-fixed``: the same without ``dynamic_axes`` (the traced batch of 1 stays in the graph);
* ``dynamo-fixed``: ``torch.onnx.export(dynamo=True)`` without ``dynamic_shapes`` (torch's default exporter);
* ``dynamo-dyn``: ``dynamo=True`` with a dynamic batch dimension.

``check`` runs in the engine's venv: each file goes through ``load_onnx_model`` and is compared with ONNX
Runtime at a batch of 4 (in chunks of the file's own batch where it is fixed), gradients must reach the input
(the scan needs them), and the mitigation's re-export (``export_onnx``) must match too.

Usage::

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript
    /tmp/tv/bin/python benchmarks/torchvision_import.py export --out /tmp/tvx      # a few minutes
    .venv/bin/python benchmarks/torchvision_import.py check --dir /tmp/tvx          # a few minutes

``check`` prints one JSON line per file and a summary; docs/onnx-import.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

# name -> (constructor name, keyword arguments, input side). Weights are random: the importer's fidelity does
# not depend on them, and nothing may download weights.
ARCHS: dict[str, tuple[str, dict, int]] = {
    "resnet18": ("resnet18", {}, 64),
    "resnet50": ("resnet50", {}, 64),
    "resnext50_32x4d": ("resnext50_32x4d", {}, 64),
    "wide_resnet50_2": ("wide_resnet50_2", {}, 64),
    "mobilenet_v2": ("mobilenet_v2", {}, 64),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, 64),
    "mobilenet_v3_large": ("mobilenet_v3_large", {}, 64),
    "efficientnet_b0": ("efficientnet_b0", {}, 64),
    "efficientnet_v2_s": ("efficientnet_v2_s", {}, 64),
    "mnasnet0_5": ("mnasnet0_5", {}, 64),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", {}, 64),
    "squeezenet1_1": ("squeezenet1_1", {}, 64),
    "regnet_x_400mf": ("regnet_x_400mf", {}, 64),
    "regnet_y_400mf": ("regnet_y_400mf", {}, 64),
    "densenet121": ("densenet121", {}, 64),
    "googlenet": ("googlenet", {"aux_logits": False, "init_weights": True}, 64),
    "vgg11_bn": ("vgg11_bn", {}, 224),
    "alexnet": ("alexnet", {}, 224),
    "convnext_tiny": ("convnext_tiny", {}, 64),
    "vit_b_16": ("vit_b_16", {"image_size": 64}, 64),
    "swin_t": ("swin_t", {}, 64),
    "maxvit_t": ("maxvit_t", {}, 224),
    "inception_v3": ("inception_v3", {"aux_logits": False, "init_weights": True}, 299),
}

FORMS = ("ts-dyn", "ts-fixed", "dynamo-fixed", "dynamo-dyn")


def _calibrated(model, side: int):
    """The model in eval mode with BatchNorm statistics of its own activations on random images.

    At initialisation the running statistics are (0, 1), and deep nets then shrink their activations to
    nothing (EfficientNet's outputs were 1e-19): a comparison at that scale proves nothing. A head initialised
    at zero gets small random weights, for the same reason.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(8, 3, side, side))
    # torchvision's ViT starts its head at zero: outputs of 0 would match anything
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model.eval()


def _export_one(model, x, form: str, path: Path) -> None:
    import torch

    names = {"input_names": ["input"], "output_names": ["output"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form.startswith("ts"):
            dyn = {"input": {0: "N"}, "output": {0: "N"}} if form == "ts-dyn" else None
            torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False, dynamic_axes=dyn,
                              **names)
            return
        shapes = ({0: torch.export.Dim("N", min=1, max=1024)},) if form == "dynamo-dyn" else None
        prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False, **names)
        prog.save(str(path))


def export(out: Path, names: list[str]) -> None:
    import torch
    import torchvision

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        ctor, kwargs, side = ARCHS[name]
        torch.manual_seed(0)
        model = _calibrated(getattr(torchvision.models, ctor)(weights=None, num_classes=2, **kwargs), side)
        x = torch.rand(1, 3, side, side)
        for form in FORMS:
            path = out / f"{name}.{form}.onnx"
            t = time.perf_counter()
            try:
                _export_one(model, x, form, path)
                status = "ok"
            except Exception as e:  # noqa: BLE001 - reported per file
                status = f"export failed: {type(e).__name__}: {str(e)[:200]}"
            print(json.dumps({"arch": name, "form": form, "side": side, "export": status,
                              "seconds": round(time.perf_counter() - t, 1)}), flush=True)


def check(folder: Path) -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from drmguard_engine.onnx_io import export_onnx, load_onnx_model

    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    for path in sorted(folder.glob("*.onnx")):
        arch, form = path.name.split(".")[:2]
        row: dict[str, object] = {"arch": arch, "form": form}
        data = path.read_bytes()
        try:
            dims = onnx.load_from_string(data).graph.input[0].type.tensor_type.shape.dim
            fixed = dims[0].dim_value or None
            side = dims[2].dim_value
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            x = np.random.default_rng(0).random((4, 3, side, side), dtype=np.float32)
            step = fixed or 4
            want = np.concatenate([sess.run(None, {name: x[i:i + step]})[0] for i in range(0, 4, step)])
            t = time.perf_counter()
            model = load_onnx_model(data)
            row["import_s"] = round(time.perf_counter() - t, 2)
            xt = torch.from_numpy(x).requires_grad_(True)
            got = model(xt)
            got.sum().backward()
            row["max_abs_diff"] = float(np.abs(got.detach().numpy() - want).max())
            row["scale"] = float(np.abs(want).max())
            row["grad_reaches_input"] = bool(xt.grad is not None and float(xt.grad.abs().sum()) > 0)
            again = ort.InferenceSession(export_onnx(model), providers=["CPUExecutionProvider"])
            re = again.run(None, {again.get_inputs()[0].name: x})[0]
            row["reexport_max_abs_diff"] = float(np.abs(re - want).max())
            tol = 1e-4 * max(1.0, row["scale"])  # type: ignore[arg-type]
            row["ok"] = bool(row["grad_reaches_input"] and row["max_abs_diff"] < tol
                             and row["reexport_max_abs_diff"] < tol)
        except Exception as e:  # noqa: BLE001 - reported per file
            row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = sum(bool(r["ok"]) for r in rows)
    print(json.dumps({"imported_and_matching": ok, "files": len(rows)}))
    return 0 if ok == len(rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the ONNX files (needs torchvision)")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--arch", action="append", choices=sorted(ARCHS), help="default: all")
    c = sub.add_parser("check", help="import every file and compare with ONNX Runtime")
    c.add_argument("--dir", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "export":
        export(a.out, a.arch or list(ARCHS))
        return 0
    return check(a.dir)


if __name__ == "__main__":
    sys.exit(main())
