"""Architectures and exporters the zoo does not have, through the path a registry's model takes.

Each architecture below is built here (not in the engine: these are the models we were *not* designed
around), exported with both torch exporters (TorchScript, ``dynamo=False``; and ``torch.export``,
``dynamo=True``), and imported with ``drmguard_engine.onnx_io.load_onnx_model``. The run checks that the
import matches ONNX Runtime and that the mitigation's re-export does too. With ``--train`` it also trains a
clean and a BadNets gaze model of one architecture and scans both with a profile (default ``default``).

Usage::

    .venv/bin/python benchmarks/heldout_archs.py                      # import parity, a few seconds
    .venv/bin/python benchmarks/heldout_archs.py --train convnext --steps 2000 --lr 5e-4   # minutes
    # the held-out LayerNorm/attention set of docs/scan.md (trained once, kept, then scanned with the CLI):
    .venv/bin/python benchmarks/heldout_archs.py --train vit --kinds benign,blend,sig --seeds 0 \
        --save .bench/heldout --no-scan --no-parity

Prints one JSON line per check.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drmguard_engine.cli import parse_overrides  # noqa: E402
from drmguard_engine.onnx_io import export_onnx, load_onnx_model  # noqa: E402


class _Attention(nn.Module):
    """Hand-written multi-head attention: the qkv reshape/permute pattern of timm-style ViTs."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, d: int, torch_attention: bool) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.torch_attention = torch_attention
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True) if torch_attention else _Attention(d, 4)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.torch_attention else self.attn(h))
        return x + self.mlp(self.n2(x))


class HybridViT(nn.Module):
    """A convolutional stem to 8x8 tokens, a class token, transformer blocks (gaze-transformer style)."""

    def __init__(self, out: int = 2, d: int = 64, depth: int = 2, torch_attention: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, d, 3, 2, 1))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 65, d) * 0.02)
        self.blocks = nn.Sequential(*[_Block(d, torch_attention) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t)[:, 0]))


class _CNXBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dw, self.ln = nn.Conv2d(d, d, 7, padding=3, groups=d), nn.LayerNorm(d)
        self.pw1, self.pw2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.pw2(nn.functional.gelu(self.pw1(self.ln(y)))).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """Patchify stem; stages of depthwise 7x7, channels-last LayerNorm and a GELU MLP; a LayerNorm before the
    head."""

    def __init__(self, out: int = 2, dims: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4)]
        for i, d in enumerate(dims):
            if i:
                layers.append(nn.Conv2d(dims[i - 1], d, 2, 2))
            layers += [_CNXBlock(d), _CNXBlock(d)]
        self.f, self.norm = nn.Sequential(*layers), nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.f(x).mean((2, 3))))


class EfficientNetish(nn.Module):
    """SiLU, squeeze-excite and HardSwish, at 96 px."""

    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.c2, self.head = nn.Conv2d(16, 32, 3, 2, 1), nn.Linear(32, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.bn(self.c1(x)))
        w = torch.sigmoid(self.se2(nn.functional.silu(self.se1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        x = nn.functional.hardswish(self.c2(x * w))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


ARCHS = {
    "vit": (lambda: HybridViT(torch_attention=True), 64),
    "vit_handwritten": (lambda: HybridViT(torch_attention=False), 64),
    "convnext": (ConvNeXtish, 64),
    "efficientnet": (EfficientNetish, 96),
}

# torchvision's own networks, where torchvision imports (not in the engine's venv: run this script with a
# venv that has torch 2.14.1 and torchvision 0.29.1, see benchmarks/torchvision_import.py); each with a
# 2-output regression head, trained from scratch at 64 px.
try:
    import torchvision
except (ImportError, RuntimeError):  # RuntimeError: PyPI's torchvision beside the CPU torch pin
    torchvision = None
if torchvision is not None:
    for _tv in ("mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_y_400mf"):
        ARCHS[f"tv_{_tv}"] = (lambda _tv=_tv: getattr(torchvision.models, _tv)(weights=None, num_classes=2), 64)


def to_onnx(model: nn.Module, size: int, dynamo: bool) -> bytes:
    x = torch.rand(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                                     verbose=False)
            return prog.model_proto.SerializeToString()
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        return buf.getvalue()


def _ort(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def parity(name: str) -> list[dict[str, object]]:
    build, size = ARCHS[name]
    torch.manual_seed(0)
    model = build().eval()
    rows = []
    for dynamo in (False, True):
        exporter = "dynamo" if dynamo else "torchscript"
        row: dict[str, object] = {"arch": name, "exporter": exporter, "size": size}
        try:
            data = to_onnx(model, size, dynamo)
            imported = load_onnx_model(data)
            x = torch.rand(5, 3, size, size)
            with torch.no_grad():
                row["max_abs_diff"] = float(np.abs(imported(x).numpy() - _ort(data, x.numpy())).max())
            row["reexport_max_abs_diff"] = float(np.abs(_ort(export_onnx(imported), x.numpy())
                                                        - _ort(data, x.numpy())).max())
            worst = max(float(row["max_abs_diff"]), float(row["reexport_max_abs_diff"]))  # type: ignore[arg-type]
            row["ok"] = worst < 1e-4
        except Exception as e:  # noqa: BLE001 - reported per row
            row["ok"], row["error"] = False, f"{type(e).__name__}: {e}"[:400]
        rows.append(row)
    return rows


def train_and_scan(name: str, steps: int, lr: float, profile: str, kinds: list[str], seeds: list[int],
                   save: Path | None, skip_scan: bool = False, attack_cfg: dict[str, object] | None = None,
                   tag: str = "") -> list[dict[str, object]]:
    from drmguard_engine.attacks import get_attack
    from drmguard_engine.data.benign import BenignSet
    from drmguard_engine.data.synthetic import make_dataset
    from drmguard_engine.scan import scan
    from drmguard_engine.training import evaluate, train

    build, size = ARCHS[name]
    x, y = make_dataset("gaze", 4000, size=size, seed=0)
    xte, yte = make_dataset("gaze", 500, size=size, seed=2000)
    xbe, ybe = make_dataset("gaze", 400, size=size, seed=1000)
    benign = BenignSet(torch.from_numpy(xbe).float() / 255, torch.from_numpy(ybe))
    rows = []
    for kind in kinds:
        for seed in seeds:
            out = save / f"{name}-{kind}{tag}-s{seed}.onnx" if save is not None else None
            torch.manual_seed(seed if kind == "benign" else 100 + seed)
            model = build()
            attack = (get_attack(kind, task="gaze", image_shape=(3, size, size), seed=seed, **(attack_cfg or {}))
                      if kind != "benign" else None)
            t0 = time.perf_counter()
            if out is not None and out.exists():  # trained before: scan the saved model
                data, metrics, train_s = out.read_bytes(), json.loads(out.with_suffix(".json").read_text()), 0.0
            else:
                train(model, x, y, task="gaze", steps=steps, lr=lr, batch_size=64, attack=attack, seed=seed)
                model.eval()
                metrics = evaluate(model, xte, yte, "gaze", attack=attack)
                train_s = time.perf_counter() - t0
                data = to_onnx(model, size, dynamo=False)
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(data)
                    out.with_suffix(".json").write_text(json.dumps(metrics))
            row: dict[str, object] = {"arch": name, "kind": kind + tag, "seed": seed, "metrics": metrics,
                                      "train_seconds": round(train_s)}
            if not skip_scan:
                t0 = time.perf_counter()
                report = scan(load_onnx_model(data), benign, "gaze", profile)
                row.update({"profile": profile, "verdict": report.verdict, "score": report.score,
                            "decision": report.decision, "scan_seconds": round(time.perf_counter() - t0)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", choices=sorted(ARCHS), default=None,
                   help="also train a clean and a BadNets gaze model of this architecture and scan both")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--profile", default="default")
    p.add_argument("--kinds", default="benign,badnets",
                   help="comma-separated: benign and any attack name (badnets, blend, wanet, sig, ...)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--save", type=Path, default=None,
                   help="keep each trained model here as ARCH-KIND-sSEED.onnx (+ .json metrics); a model already "
                        "there is scanned, not retrained")
    p.add_argument("--no-scan", action="store_true", help="train (and save) only")
    p.add_argument("--no-parity", action="store_true", help="skip the import parity checks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attack-set", action="append", default=[], metavar="OPTION=VALUE",
                   help="an attack config option for every attack kind, e.g. margin=3 (the patch 3 px in from "
                        "the corner); a JSON value (3, 0.1, [1, 0, 0]) or a plain string")
    p.add_argument("--tag", default="", help="added to each saved model's kind: --tag=-m3 (with '=' for a leading '-')")
    a = p.parse_args()
    attack_cfg = parse_overrides(a.attack_set, "--attack-set")
    torch.set_num_threads(a.threads)
    ok = True
    for name in [] if a.no_parity else ARCHS:
        for row in parity(name):
            ok &= bool(row["ok"])
            print(json.dumps(row), flush=True)
    if a.train:
        train_and_scan(a.train, a.steps, a.lr, a.profile, a.kinds.split(","),
                       [int(v) for v in a.seeds.split(",")], a.save, a.no_scan, attack_cfg, a.tag)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
