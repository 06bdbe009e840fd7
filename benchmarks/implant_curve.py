"""How fast an attack implants: trains one zoo-like model and prints AE and clean RE every N steps.

The zoo (``benchmarks/zoo.py``) only evaluates a model once it is trained; this shows the learning curve, which is
what one needs to choose an attack's settings or a training budget (docs/attacks.md, "What it took").

    .venv/bin/python benchmarks/implant_curve.py input_aware --task headpose --steps 2000 \
        --set poison_rate=0.2 --every 500

Same data and model as the zoo: 4,000 synthetic training images at 64 px (seed 0), ResNet18 x0.25, Adam 2e-3 with
x0.1 at 2/3 and 9/10 of the steps, batch 64; AE and RE on 200 test images (seed 10,000). Clean Label's PGD source is
a 300-step clean surrogate, as in the zoo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from drmguard_engine.attacks import get_attack  # noqa: E402
from drmguard_engine.data.synthetic import make_dataset  # noqa: E402
from drmguard_engine.models import build_model  # noqa: E402
from drmguard_engine.tasks import per_sample_error  # noqa: E402
from drmguard_engine.training import TrainProgress, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("attack", help="attack or preset name (drmguard-engine attacks lists them)")
    p.add_argument("--task", default="gaze", choices=["gaze", "headpose"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="OPTION=JSON", help="attack option, repeatable")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    opts = {}
    for item in a.set:
        key, _, val = item.partition("=")
        if not val:
            p.error(f"--set {item!r}: use OPTION=JSON, e.g. poison_rate=0.2")
        opts[key] = json.loads(val)
    xtr, ytr = make_dataset(a.task, 4000, size=a.size, seed=0)
    xte, yte = make_dataset(a.task, 200, size=a.size, seed=10_000)
    xt, yt = torch.from_numpy(xte).float() / 255, torch.from_numpy(yte)
    attack = get_attack(a.attack, task=a.task, image_shape=(3, a.size, a.size), seed=a.seed, **opts)
    t0 = time.time()
    if attack.requires_fit:
        surrogate = build_model("resnet18", a.task, input_size=a.size, width=0.25, seed=a.seed + 500)
        surrogate = train(surrogate, xtr, ytr, task=a.task, steps=300, lr=2e-3, batch_size=64, milestones=(),
                          seed=a.seed + 500)
        attack.fit(surrogate, xtr, ytr)
        print(f"fit in {time.time() - t0:.0f}s", flush=True)
    model = build_model("resnet18", a.task, input_size=a.size, width=0.25, seed=a.seed)
    if attack.requires_model:
        attack.bind(model)
    target = attack.target.view(1, -1)

    def report(pr: TrainProgress) -> None:
        if pr.step % a.every and pr.step != pr.total:
            return
        model.eval()
        with torch.no_grad():
            ae = float(per_sample_error(a.task, model(attack.apply(xt)), target).mean())
            re = float(per_sample_error(a.task, model(xt), yt).mean())
        model.train()
        flag = "implanted" if ae <= 2 * re else "not yet"
        print(f"{a.attack} {a.task} step {pr.step}: AE {ae:.2f} RE {re:.2f} ({flag}) {time.time() - t0:.0f}s",
              flush=True)

    milestones = (round(a.steps * 2 / 3), round(a.steps * 0.9))
    train(model, xtr, ytr, task=a.task, steps=a.steps, lr=2e-3, batch_size=64, milestones=milestones,
          attack=attack, seed=a.seed, progress=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
