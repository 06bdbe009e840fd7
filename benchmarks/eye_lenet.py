"""A model shape the zoo never has: MPIIGaze's eye-patch regressor, a LeNet on 36x60 greyscale images.

Builds models for the scan's command line to vet as a registry would (docs/scan.md, "Other input shapes"):

* the images are the synthetic 64 px gaze faces, resized to 36x60 and turned grey (BT.601 luminance);
* the network is MPIIGaze's LeNet shape: 5x5 conv (20) - max-pool - 5x5 conv (50) - max-pool - fully connected 500
  with ReLU - linear head; normalisation inside the model, inputs in [0, 1];
* it is exported with torch's legacy exporter at opset 13, with its own input and output names (``eyes``, ``gaze``)
  and a dynamic batch axis, not with the engine's ``export_onnx``;
* backdoors come from the engine's attacks (grey variants of the same triggers), trained with the engine's
  ``train``.

Usage::

    .venv/bin/python benchmarks/eye_lenet.py benign be.npz                     # D_be: 400 images (seed 777)
    .venv/bin/python benchmarks/eye_lenet.py train clean clean0.onnx --seed 0
    .venv/bin/python benchmarks/eye_lenet.py train badnets bd.onnx --seed 1 --steps 5000 \\
        --set patch_size=6 --set colour=[1,1,1]
    .venv/bin/python -m drmguard_engine scan --model bd.onnx --benign be.npz --task gaze --report r.json

``train`` prints one JSON line: the model's clean RE (and AE, DAE with its attack) on 300 test images, and the
real trigger's own variance ratio on D_be when ``--benign`` names it. About 3 minutes per 2,000 steps on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drmguard_engine.attacks import get_attack  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.training import evaluate, train  # noqa: E402

H, W = 36, 60


def eye_band(x: np.ndarray) -> np.ndarray:
    """uint8 (N,3,S,S) faces -> uint8 (N,1,36,60) grey images."""
    t = F.interpolate(torch.from_numpy(x).float(), size=(H, W), mode="bilinear", align_corners=False)
    g = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return g.round().clamp(0, 255).to(torch.uint8).numpy()


class EyeLeNet(nn.Module):
    """MPIIGaze's LeNet: features F = the 500-unit ReLU layer, head H = one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(50 * 6 * 12, 500), nn.ReLU())
        self.head = nn.Linear(500, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("benign", help="write D_be (400 grey 36x60 images with labels)")
    b.add_argument("out")
    b.add_argument("--n", type=int, default=400)
    t = sub.add_parser("train", help="train and export one model")
    t.add_argument("kind", help="clean, or an attack name (badnets, blend, sig, wanet, ...)")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="attack option (JSON value)")
    t.add_argument("--benign", help="D_be .npz: also report the real trigger's variance ratio on it")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.cmd == "benign":
        x, y = make_dataset("gaze", a.n, size=64, seed=777)
        np.savez(a.out, images=eye_band(x), labels=y)
        return 0
    torch.manual_seed(a.seed)
    x, y = make_dataset("gaze", 4000, size=64, seed=a.seed)
    xte, yte = make_dataset("gaze", 300, size=64, seed=5000)
    x, xte = eye_band(x), eye_band(xte)
    opts = {k: _value(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    attack = None if a.kind == "clean" else get_attack(a.kind, task="gaze", image_shape=(1, H, W), seed=a.seed,
                                                       **opts)
    model = EyeLeNet()
    t0 = time.time()
    train(model, x, y, task="gaze", steps=a.steps, lr=1e-3, batch_size=64, seed=a.seed, attack=attack)
    model.eval()
    row: dict[str, object] = {"kind": a.kind, "seed": a.seed, "steps": a.steps, "options": opts,
                              "seconds": round(time.time() - t0, 1),
                              **evaluate(model, xte, yte, "gaze", **({"attack": attack} if attack else {}))}
    if attack is not None and a.benign:
        with np.load(a.benign) as z:
            xb = torch.from_numpy(z["images"]).float() / 255
        with torch.no_grad():
            ob, op = model(xb), model(attack.apply(xb))
        row["real_trigger_variance_ratio"] = float((op.var(0) / ob.var(0)).mean())
        row["real_trigger_l1_ratio"] = float((attack.apply(xb) - xb).abs().flatten(1).sum(1).mean()
                                             / xb.flatten(1).sum(1).max())
    torch.onnx.export(model, torch.rand(1, 1, H, W), a.out, input_names=["eyes"], output_names=["gaze"],
                      opset_version=13, dynamic_axes={"eyes": {0: "n"}, "gaze": {0: "n"}}, dynamo=False)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
