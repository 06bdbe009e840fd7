"""Where a zoo backdoor is read, and what the probes reach without the scan's saliency exclusion (docs/scan.md,
"Unmasked probes").

For each chosen zoo model (``make zoo`` first; the gaze and head-pose zoo under ``.bench/zoo``) it prints one JSON
line with:

* ``split``: the real trigger's AE / DAE (degrees) on the test set when it is applied everywhere, only outside the
  scan's exclusion region (the most salient pixels, dilated), and only inside it;
* ``unmasked``: the probe families fitted without the exclusion (``ProbeConfig(exclude_fraction=0)``), each with
  its held-out variance ratio, collapse point, distance to the attack's real target in benign output stds, and the
  rigidity check when the ratio is below the probe threshold.

``--onnx FILE.onnx ... --benign D.npz`` runs the unmasked probes on other models (the held-out LayerNorm set of
``benchmarks/heldout_archs.py``); their real target is taken as the zoo attacks' default gaze target (-10, 15).
With ``--attack KIND --attack-seed S`` (how ``heldout_archs.py`` built the model's attack: ``<arch>-<kind>-s<S>``)
the trigger split is measured too, on that script's test set.

Usage::

    .venv/bin/python benchmarks/unmasked_probes.py --task gaze --kinds benign,badnets,blend,sig,wanet_multi
    .venv/bin/python benchmarks/unmasked_probes.py --onnx .bench/heldout/*.onnx --benign be.npz --families blend
    .venv/bin/python benchmarks/unmasked_probes.py --onnx .bench/heldout/convnext-blend-s1.onnx --benign be.npz \
        --attack blend --attack-seed 1 --no-probes

About 40 s per ResNet18 x0.25 zoo model on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import paper_tables as pt  # noqa: E402

from drmguard_engine.attacks import load_attack  # noqa: E402
from drmguard_engine.defenses.probes import ProbeConfig, probe_rigidity, run_probes, saliency_exclusion  # noqa: E402
from drmguard_engine.training import evaluate  # noqa: E402

DEFAULT_GAZE_TARGET = (-10.0, 15.0)


class _Masked:
    """The attack's trigger applied only where ``keep`` is 0 (the clean image where it is 1)."""

    def __init__(self, attack: Any, keep: torch.Tensor) -> None:
        self.attack, self.keep, self.target = attack, keep, attack.target

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep * x + (1 - self.keep) * self.attack.apply(x)


def trigger_split(model: nn.Module, images: torch.Tensor, attack: Any, xte: Any, yte: Any, task: str) -> dict[str, Any]:
    """The real trigger's AE / DAE applied everywhere, only outside the scan's exclusion region, only inside it."""
    pc = ProbeConfig()
    keep = saliency_exclusion(model, images[: pc.saliency_images], pc.exclude_fraction, pc.exclude_dilate)
    split = {}
    for name, att in (("everywhere", attack), ("outside_only", _Masked(attack, keep)),
                      ("inside_only", _Masked(attack, 1 - keep))):
        m = evaluate(model, xte, yte, task, attack=att)
        split[name] = {"ae": round(m["ae"], 2), "dae": round(m["dae"], 2)}
    return {"excluded_fraction": round(float(keep.mean()), 3), "split": split}


def unmasked(model: nn.Module, images: torch.Tensor, families: tuple[str, ...], target: Any,
             blend_alpha: float = ProbeConfig.blend_alpha) -> dict[str, Any]:
    cfg = ProbeConfig(families=families, exclude_fraction=0.0, blend_alpha=blend_alpha)
    with torch.no_grad():
        std = torch.cat([model(images[i : i + 200]) for i in range(0, images.shape[0], 200)]).std(0)
    out: dict[str, Any] = {}
    for r in run_probes(model, images, cfg):
        d: dict[str, Any] = {"ratio": round(r.variance_ratio, 4), "point": [round(v, 2) for v in r.collapse_point]}
        if target is not None:
            gap = (torch.tensor(r.collapse_point) - torch.as_tensor(target, dtype=torch.float32).flatten()) / std
            d["distance_to_target_std"] = round(float(gap.norm()), 2)
        if r.variance_ratio < 0.05:
            rig = probe_rigidity(model, images, cfg, r.family, r.collapse_point, r.transform)
            d["rigidity"] = round(rig["rigidity"], 2)
        out[r.family] = d
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="gaze", choices=("gaze", "headpose"))
    p.add_argument("--kinds", default="benign,badnets,blend,sig,wanet_multi", help="zoo kinds, comma-separated")
    p.add_argument("--families", default="blend,smooth")
    p.add_argument("--blend-alpha", type=float, default=ProbeConfig.blend_alpha,
                   help="the blend family's alpha cap (default: the scan's)")
    p.add_argument("--max-benign", type=int, default=3, help="clean zoo models to include")
    p.add_argument("--onnx", nargs="*", default=[], help="other models (ONNX) instead of the zoo")
    p.add_argument("--benign", help="D_be .npz for --onnx")
    p.add_argument("--attack", help="with --onnx: the attack to rebuild for the trigger split (e.g. blend)")
    p.add_argument("--attack-seed", type=int, default=0)
    p.add_argument("--no-probes", action="store_true", help="the trigger split only")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    families = tuple(a.families.split(","))
    if a.onnx:
        from drmguard_engine.data.benign import load_benign_npz
        from drmguard_engine.onnx_io import load_onnx_model

        if not a.benign:
            p.error("--onnx needs --benign D.npz")
        images = load_benign_npz(a.benign, require_labels=False).images
        for path in a.onnx:
            t0 = time.perf_counter()
            model = load_onnx_model(path).eval()
            row = {"model": Path(path).name}
            if a.attack:
                from drmguard_engine.attacks import get_attack
                from drmguard_engine.data.synthetic import make_dataset

                size = images.shape[-1]
                attack = get_attack(a.attack, task="gaze", image_shape=(3, size, size), seed=a.attack_seed)
                xte, yte = make_dataset("gaze", 500, size=size, seed=2000)  # heldout_archs.py's test set
                row.update(trigger_split(model, images, attack, xte, yte, "gaze"))
            if not a.no_probes:
                row["unmasked"] = unmasked(model, images, families, DEFAULT_GAZE_TARGET, a.blend_alpha)
            row["seconds"] = round(time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
        return 0
    bench = pt.Bench([pt.ROOT / ".bench" / "zoo"], pt.ROOT / ".bench" / "unmasked", n_benign=400, paper_steps=40,
                     baseline_steps=100, quick=False)
    kinds, seen = a.kinds.split(","), {"benign": 0}
    for e in bench.entries:
        if e["task"] != a.task or e["kind"] not in kinds or e.get("arch") != "resnet18":
            continue
        if e["kind"] == "benign":
            seen["benign"] += 1
            if seen["benign"] > a.max_benign:
                continue
        t0 = time.perf_counter()
        model, dbe = bench.model(e).eval(), bench.dbe_e(e)
        row: dict[str, Any] = {"task": a.task, "kind": e["kind"], "model": bench.name(e)}
        if e["kind"] != "benign":
            xte, yte = bench.test_set(e)
            row.update(trigger_split(model, dbe.images, load_attack(Path(e["dir"]) / "attack.npz"), xte, yte, a.task))
        row["unmasked"] = unmasked(model, dbe.images, families, e.get("target"), a.blend_alpha)
        row["seconds"] = round(time.perf_counter() - t0)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
