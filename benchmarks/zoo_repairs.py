"""The zoo's backdoored models, each scanned once as the service would, with whether the service would repair it:
the loop the repair benchmarks (``clean_cost.py``, ``unmasked_cost.py``) share.

The service's D_be is 400 images of seed 777; a model is repairable when the scan flags it and the admission policy
does not refuse the repair (``guard_server.policy.mitigation_refusal``: deciding probe ratio at most 0.01, a model
that fits D_be). The test set each benchmark reads the repairs on is drawn with a seed neither the zoo nor D_be
used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.scan_tables import benign_set
from drmguard_engine.attacks import load_attack
from drmguard_engine.attacks.base import Attack
from drmguard_engine.data.benign import BenignSet
from drmguard_engine.data.synthetic import make_dataset
from drmguard_engine.onnx_io import load_onnx_model
from drmguard_engine.scan import ScanReport, scan
from guard_server.policy import mitigation_refusal


@dataclass
class ZooModel:
    name: str  # task-kind-directory
    task: str
    kind: str
    path: Path  # the model's directory (model.onnx, attack.npz, meta.json)
    meta: dict[str, Any]
    benign: BenignSet
    model: torch.nn.Module
    report: ScanReport
    refusal: str  # why the service would not repair it ("not flagged" on a benign verdict), or ""
    scan_seconds: float

    def test_set(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return make_dataset(self.task, n, size=int(self.meta["size"]), seed=int(self.meta.get("data_seed", 0)) + 20_000)

    def attack(self) -> Attack:
        return load_attack(self.path / "attack.npz")


def backdoored_models(zoo: Path, *, only: str = "", skip: frozenset[str] | set[str] = frozenset(),
                      profile: str = "default", device: str = "cpu", workers: int = 1) -> Iterator[ZooModel]:
    """Each backdoored model under ``zoo`` (whose path contains one of the comma-separated ``only`` substrings, and
    whose name is not in ``skip``), scanned with ``profile``; the repairable ones have ``refusal == ""``."""
    for meta_path in sorted(zoo.rglob("meta.json")):
        meta = json.loads(meta_path.read_text())
        d, task = meta_path.parent, meta["task"]
        name = f"{task}-{meta['kind']}-{d.name}"
        if not meta["backdoored"] or name in skip or (only and not any(s in str(meta_path) for s in only.split(","))):
            continue
        t0 = time.time()
        benign = benign_set(task, int(meta["size"]), 400, 777)
        model = load_onnx_model(d / "model.onnx")
        report = scan(model, benign, task, profile, device=device, workers=workers)
        refusal = mitigation_refusal(report.to_dict(), 0.01) if report.verdict == "backdoored" else "not flagged"
        yield ZooModel(name, task, meta["kind"], d, meta, benign, model, report, refusal, round(time.time() - t0, 1))
