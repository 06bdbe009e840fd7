"""What the real trigger does to a model: the variance ratio a perfect probe could reach, and how exact
the trigger must be.

The scan's probes decide on the held-out output-variance ratio of a universal transformation
(``docs/scan.md``). This applies the model's *real* trigger to D_be and reports the same statistic, so a miss
can be read as either "the probe did not find the trigger" (the real trigger is below the 0.05 threshold) or
"the backdoor does not collapse the outputs that far" (it is above: no probe of the rule could catch it). It
also varies the trigger: its strength (x + s (T(x) - x) for s = 0.75, 0.5) and, for patch attacks, the
patch's size and a shift towards the image centre, which shows whether the network keys on the exact
template.

The attack is rebuilt with ``get_attack(kind, seed=...)`` as the training scripts build it
(``benchmarks/heldout_archs.py``), or read from an ``attack.npz`` of the zoo (``--attack-file``).

Usage::

    .venv/bin/python benchmarks/real_trigger.py .bench/tv/tv_shufflenet_v2_x0_5-badnets-s0.onnx \
        --attack badnets --seed 0 --benign .bench/heldout/be.npz --task gaze
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drmguard_engine.attacks import get_attack, load_attack  # noqa: E402
from drmguard_engine.attacks.patch import PatchConfig, patch_side  # noqa: E402
from drmguard_engine.data.benign import load_benign_npz  # noqa: E402
from drmguard_engine.defenses.probes import outputs  # noqa: E402
from drmguard_engine.onnx_io import load_onnx_model  # noqa: E402


def variance_ratio(model: torch.nn.Module, clean: torch.Tensor,
                   triggered: torch.Tensor) -> tuple[float, list]:
    """Mean over outputs of Var f(T(x)) / Var f(x) (the probes' statistic) and the mean triggered output."""
    y0, y1 = outputs(model, clean), outputs(model, triggered)
    return float((y1.var(0) / y0.var(0).clamp_min(1e-12)).mean()), [round(float(v), 2) for v in y1.mean(0)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--benign", required=True, type=Path)
    ap.add_argument("--task", required=True, choices=["gaze", "headpose"])
    ap.add_argument("--attack", help="attack name, rebuilt with get_attack(--seed)")
    ap.add_argument("--attack-file", type=Path, help="an attack.npz (the zoo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=int, default=None,
                    help="a patch attack's margin from its corner, as the model was trained with "
                         "(heldout_archs.py --attack-set margin=N)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_onnx_model(a.model).eval()
    x = load_benign_npz(a.benign, task=a.task).images
    shape = tuple(x.shape[1:])
    if a.attack_file:
        attack = load_attack(a.attack_file)
    elif a.attack:
        attack = get_attack(a.attack, task=a.task, image_shape=shape, seed=a.seed,
                            **({} if a.margin is None else {"margin": a.margin}))
    else:
        ap.error("give --attack or --attack-file")
    attack.eval()
    xt = attack.apply(x)
    rows = {"trigger": variance_ratio(model, x, xt)}
    rows["real_trigger_l1_ratio"] = attack.real_trigger_ratio(x)
    for s in (0.75, 0.5):
        rows[f"strength {s}"] = variance_ratio(model, x, x + s * (xt - x))
    cfg = attack.config.to_dict()
    if isinstance(attack.config, PatchConfig) and a.attack:
        side = patch_side(attack.config, shape[1], shape[2])
        for d in (-1, 1, 3):
            if side + d >= 2:
                v = get_attack(a.attack, task=a.task, image_shape=shape, seed=a.seed, patch_size=side + d,
                               margin=cfg.get("margin", 0))
                rows[f"patch {side + d} px"] = variance_ratio(model, x, v.eval().apply(x))
        for m in (-2, -1, 1, 2):  # negative: towards the corner, where the margin leaves room
            if cfg.get("margin", 0) + m >= 0:
                v = get_attack(a.attack, task=a.task, image_shape=shape, seed=a.seed,
                               margin=cfg.get("margin", 0) + m)
                rows[f"shifted {m} px"] = variance_ratio(model, x, v.eval().apply(x))
    if a.json:
        print(json.dumps({"model": str(a.model), **rows}))
    else:
        for k, v in rows.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
