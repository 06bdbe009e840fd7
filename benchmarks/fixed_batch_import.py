"""Fixed-batch exports (torch's default: no dynamic batch axis) through the importer, against ONNX Runtime.

Every architecture of ``benchmarks/heldout_archs.py`` and of the engine's zoo is exported with both torch
exporters (TorchScript ``dynamo=False`` and ``dynamo=True``) at a fixed batch of 1 and of 2, imported with
``load_onnx_model``, run at batch 6 and compared with ONNX Runtime run on the file in chunks of its own batch;
the mitigation's re-export (dynamic batch) is compared too. docs/onnx-import.md, "Fixed-batch exports", has
the figures.

Usage::

    .venv/bin/python benchmarks/fixed_batch_import.py          # about 90 s on 2 cores

Prints one JSON line per export, then a summary line.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heldout_archs import ARCHS  # noqa: E402

from drmguard_engine.models import build_model, list_archs  # noqa: E402
from drmguard_engine.onnx_io import export_onnx, load_onnx_model  # noqa: E402


def export_fixed(model: torch.nn.Module, size: int, dynamo: bool, batch: int) -> bytes:
    """The model exported the way a registry's default call writes it: the traced batch stays fixed."""
    x = torch.rand(batch, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                                     verbose=False)
            return prog.model_proto.SerializeToString()
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["output"], opset_version=17,
                          dynamo=False)
        return buf.getvalue()


def _ort_chunks(data: bytes, x: np.ndarray, batch: int) -> np.ndarray:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def main() -> int:
    logging.disable(logging.WARNING)
    cases = [(name, build, size) for name, (build, size) in ARCHS.items()]
    cases += [(a, (lambda a=a: build_model(a, "gaze", input_size=64)), 64) for a in list_archs()]
    ok = total = 0
    for name, build, size in cases:
        for dynamo in (False, True):
            for batch in (1, 2):
                row: dict[str, object] = {"arch": name, "exporter": "dynamo" if dynamo else "torchscript",
                                          "fixed_batch": batch}
                total += 1
                try:
                    torch.manual_seed(0)
                    data = export_fixed(build().eval(), size, dynamo, batch)
                    imported = load_onnx_model(data)
                    x = torch.rand(6, 3, size, size)
                    want = _ort_chunks(data, x.numpy(), batch)
                    with torch.no_grad():
                        row["max_abs_diff"] = float(np.abs(imported(x).numpy() - want).max())
                    again = _ort_chunks(export_onnx(imported), x.numpy(), 6)
                    row["reexport_max_abs_diff"] = float(np.abs(again - want).max())
                    row["ok"] = max(row["max_abs_diff"], row["reexport_max_abs_diff"]) < 1e-4  # type: ignore[type-var]
                except Exception as e:  # noqa: BLE001 - reported per row
                    row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"[:300]
                ok += bool(row["ok"])
                print(json.dumps(row), flush=True)
    print(json.dumps({"imported_and_matching": ok, "exports": total}))
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
