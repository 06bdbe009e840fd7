"""Small trained models for end-to-end tests: a clean and a BadNets-backdoored regressor at 32 px.

Trained once per test session (seconds each on a 2-core CPU) and cached in memory; real training with the
engine's own ``train`` and ``badnets`` attack, not planted weights, so the scan sees what it sees in the field.
The zoo's architecture, size and trigger (ResNet18 at width 0.25, 64 px, BadNets 6x6 patch) with fewer training
steps and images: at 32 px the 4-pixel patch is found by no probe (measured: patch probe ratio 0.73), and the
3-conv ``tiny`` net learns a patch trigger poorly (its global pooling dilutes it).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import torch

from drmguard_engine.attacks import get_attack
from drmguard_engine.data.benign import BenignSet
from drmguard_engine.data.synthetic import make_dataset
from drmguard_engine.models import build_model
from drmguard_engine.onnx_io import export_onnx
from drmguard_engine.training import evaluate, train

SIZE = 64
STEPS = 800
ARCH = "resnet18"
WIDTH = 0.25


@dataclass
class TinyPair:
    task: str
    clean: torch.nn.Module
    backdoored: torch.nn.Module
    attack: object
    benign: BenignSet  # D_be with labels (uint8-derived floats in [0,1])
    test: BenignSet
    clean_metrics: dict
    backdoored_metrics: dict

    def onnx(self, which: str) -> bytes:
        model = self.clean if which == "clean" else self.backdoored
        return export_onnx(model, None, input_shape=(3, SIZE, SIZE))

    def benign_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, images=(self.benign.images.numpy() * 255).round().astype(np.uint8),
                 labels=self.benign.labels.numpy())
        return buf.getvalue()


@functools.lru_cache(maxsize=4)
def tiny_pair(task: str = "gaze", seed: int = 0) -> TinyPair:
    xtr, ytr = make_dataset(task, 2500, size=SIZE, seed=seed)
    xbe, ybe = make_dataset(task, 200, size=SIZE, seed=seed + 1000)
    xte, yte = make_dataset(task, 200, size=SIZE, seed=seed + 2000)
    clean = train(build_model(ARCH, task, input_size=SIZE, width=WIDTH, seed=seed), xtr, ytr, task=task,
                  steps=STEPS, lr=2e-3, batch_size=64, seed=seed)
    attack = get_attack("badnets", task=task, image_shape=(3, SIZE, SIZE), seed=seed, poison_rate=0.1)
    bd = train(build_model(ARCH, task, input_size=SIZE, width=WIDTH, seed=seed + 1), xtr, ytr, task=task,
               steps=STEPS, lr=2e-3, batch_size=64, seed=seed + 1, attack=attack)
    to_set = lambda x, y: BenignSet(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y))  # noqa: E731
    return TinyPair(
        task=task, clean=clean.eval(), backdoored=bd.eval(), attack=attack,
        benign=to_set(xbe, ybe), test=to_set(xte, yte),
        clean_metrics=evaluate(clean, xte, yte, task),
        backdoored_metrics=evaluate(bd, xte, yte, task, attack=attack),
    )
