"""Small trained models for end-to-end tests: a clean and a BadNets-backdoored regressor at 32 px.

Trained once per test run and cached (in memory, and on disk for the run's other pytest-xdist worker); real
training with the engine's own ``train`` and ``badnets`` attack, not planted weights, so the scan sees what it sees
in the field. The two models train side by side in two spawned single-threaded processes (:func:`run_parallel`):
the weights are bit for bit those of single-threaded training in the test process (checked 2026-11-26).
The zoo's architecture and trigger (ResNet18 at width 0.25, BadNets patch) at 32 px, with fewer training steps and
images. 32 px since 2026-11-27 (64 px before): each forward and backward pass costs 3.4x less (44 against 150 ms
for 50 images, one thread), and the scans separate the pair further. Default profile: clean 0.34, backdoored 3.19
(blend probe ratio 0.0048, rigidity 5.4), in 47 and 56 s; the 64 px backdoored model scored 1.86 under ``fast``,
and a default scan of it took about 250 s (docs/scan.md, "End-to-end check in the test suite"). An older probe set
found no 32 px patch (patch probe ratio 0.73, blend 0.065); the 3-conv ``tiny`` net learns a patch trigger poorly
(its global pooling dilutes it).
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from drmguard_engine.attacks import get_attack
from drmguard_engine.data.benign import BenignSet
from drmguard_engine.data.synthetic import make_dataset
from drmguard_engine.models import build_model
from drmguard_engine.onnx_io import export_onnx
from drmguard_engine.training import evaluate, train

SIZE = 32
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


def _train_one(task: str, seed: int, backdoored: bool) -> dict[str, torch.Tensor]:
    """One model of the pair, trained single-threaded (the suite's setting, so the weights do not depend on which
    process trains them); returns its state dict."""
    torch.set_num_threads(1)
    xtr, ytr = make_dataset(task, 2500, size=SIZE, seed=seed)
    attack = _attack(task, seed) if backdoored else None
    s = seed + 1 if backdoored else seed
    model = train(build_model(ARCH, task, input_size=SIZE, width=WIDTH, seed=s), xtr, ytr, task=task,
                  steps=STEPS, lr=2e-3, batch_size=64, seed=s, attack=attack)
    return model.state_dict()


def _attack(task: str, seed: int) -> object:
    return get_attack("badnets", task=task, image_shape=(3, SIZE, SIZE), seed=seed, poison_rate=0.1)


def run_parallel(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Runs independent calls in spawned single-threaded processes, one per call (at most one per core): on the
    2-core CI machine two single-threaded trainings or scans side by side take the time of one, with the same
    arithmetic as in the test process. Falls back to running them here, one after the other, on one core."""
    workers = min(len(calls), os.cpu_count() or 1)
    if workers < 2:
        return [fn(*args) for fn, args in calls]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for fn, args in calls]
        return [f.result() for f in futures]


def scan_onnx(onnx: bytes, benign: BenignSet, task: str, profile: str) -> Any:
    """Imports an ONNX model the way the service does and scans it, single-threaded (for :func:`run_parallel`)."""
    from drmguard_engine.onnx_io import load_onnx_model
    from drmguard_engine.scan import scan

    torch.set_num_threads(1)
    return scan(load_onnx_model(onnx), benign, task, profile)


def _trained_pair(task: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The pair's state dicts, trained once per test run: under pytest-xdist the workers share them through
    ``DRMGUARD_TEST_SHARED`` (a folder of this run's, set by tests/conftest.py), the first to ask trains them while
    the others wait on a file lock. The file holds our own freshly trained weights as plain arrays (``np.savez``,
    read back with ``allow_pickle=False``)."""
    calls = [(_train_one, (task, seed, False)), (_train_one, (task, seed, True))]
    shared = os.environ.get("DRMGUARD_TEST_SHARED")
    if not shared:
        clean_sd, bd_sd = run_parallel(calls)
        return clean_sd, bd_sd
    path = Path(shared) / f"tiny-pair-{task}-{seed}.npz"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            clean_sd, bd_sd = run_parallel(calls)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **{f"clean/{k}": v.numpy() for k, v in clean_sd.items()},
                     **{f"bd/{k}": v.numpy() for k, v in bd_sd.items()})
            tmp.replace(path)
        with np.load(path, allow_pickle=False) as z:
            sds: dict[str, dict[str, torch.Tensor]] = {"clean": {}, "bd": {}}
            for key in z.files:
                which, name = key.split("/", 1)
                sds[which][name] = torch.from_numpy(z[key].copy())
    return sds["clean"], sds["bd"]


@functools.lru_cache(maxsize=4)
def tiny_pair(task: str = "gaze", seed: int = 0) -> TinyPair:
    xbe, ybe = make_dataset(task, 200, size=SIZE, seed=seed + 1000)
    xte, yte = make_dataset(task, 200, size=SIZE, seed=seed + 2000)
    clean_sd, bd_sd = _trained_pair(task, seed)
    clean = build_model(ARCH, task, input_size=SIZE, width=WIDTH, seed=seed)
    clean.load_state_dict(clean_sd)
    bd = build_model(ARCH, task, input_size=SIZE, width=WIDTH, seed=seed + 1)
    bd.load_state_dict(bd_sd)
    attack = _attack(task, seed)
    to_set = lambda x, y: BenignSet(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y))  # noqa: E731
    return TinyPair(
        task=task, clean=clean.eval(), backdoored=bd.eval(), attack=attack,
        benign=to_set(xbe, ybe), test=to_set(xte, yte),
        clean_metrics=evaluate(clean, xte, yte, task),
        backdoored_metrics=evaluate(bd, xte, yte, task, attack=attack),
    )


class EyeGate(torch.nn.Module):
    """``model`` with a second backdoor that fine-tuning cannot remove: when the blue channel inside the model's own
    most salient region (the eyes, which the scan's probes never touch) carries a fine checkerboard, the features are
    replaced by one fixed vector. The gate has no parameters, so unlearning changes nothing about it; only a probe
    fitted without the task-region exclusion can reach it (``scan.unmasked_probes``). The gaze Blend zoo model reads
    its trigger only through the eyes as well (docs/scan.md).

    The gate opens ``margin`` above the largest benign reading, with a steep sigmoid (``gain``), so that benign
    images still give a probe a gradient towards it. Measured on the 64 px pair: with gain 100 and margin 0.05 no
    unmasked probe found the gate (ratio 0.020), with 300 and 0.015 the blend probe collapsed it to 4e-9. On the
    32 px pair (2026-11-27, ``unmasked_probes`` on the fast scan's report): margin 0.015 left the blend probe at
    0.046 (not found), margin 0.005 collapses it to 1.4e-8 with gain 300 (4e-4 with gain 100, 0.052 with 1000),
    while benign images keep the model's error (0.9985x)."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, *, margin: float = 0.005, gain: float = 300.0
                 ) -> None:
        from drmguard_engine.defenses.probes import ProbeConfig, saliency_exclusion

        super().__init__()
        self.model, self.head, self.gain = model.eval(), model.head, gain
        cfg = ProbeConfig()  # the region the scan's probes leave alone
        mask = saliency_exclusion(self.model, images[: cfg.saliency_images], cfg.exclude_fraction,
                                  cfg.exclude_dilate)[0]
        h, w = mask.shape[-2:]
        checker = ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2) * 2.0 - 1.0
        self.register_buffer("read", mask * checker / mask.sum())
        with torch.no_grad():
            # benign images carry no such pattern: the gate opens only above their largest reading plus a margin
            self.level = float(self._reading(images).max()) + margin
            self.register_buffer("switched", 2.0 * self.model.features(images[:1])[0])

    def _reading(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 2:3] * self.read).sum((1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.gain * (self._reading(x) - self.level))[:, None]
        return self.head((1 - s) * self.model.features(x) + s * self.switched)

    def trigger(self, x: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
        """The gate's trigger, blended in: a blue checkerboard over the read region, the rest of the image kept."""
        pattern = x.clone()
        pattern[:, 2] = torch.where(self.read != 0, (self.read > 0).float(), x[:, 2])
        return (1 - alpha) * x + alpha * pattern
