"""How fast an attack implants: trains one zoo-like model and prints AE and clean RE every N steps.

The zoo (``benchmarks/zoo.py``) only evaluates a model once it is trained; this shows the learning curve, which is
what one needs to choose an attack's settings or a training budget (docs/attacks.md, "What it took").

    .venv/bin/python benchmarks/implant_curve.py input_aware --task headpose --steps 2000 \
        --set poison_rate=0.2 --every 500

The zoo's own data, attack, surrogate (Clean Label's PGD source) and schedule (``benchmarks/zoo.py``'s ``Zoo``),
with ``--steps`` replacing the zoo's budget (milestones scaled to it); AE and clean RE on the first 200 test images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))

from drmguard_engine.models import build_model  # noqa: E402
from drmguard_engine.tasks import per_sample_error  # noqa: E402
from drmguard_engine.training import TrainProgress, train  # noqa: E402
from zoo import Zoo, ZooSettings  # noqa: E402


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
    base = ZooSettings(size=a.size)
    # the zoo's settings with --steps as the budget (milestones scaled) and --set on top of the attack's defaults
    s = ZooSettings(size=a.size, steps=a.steps, milestones=tuple(round(m * a.steps / base.steps) for m in base.milestones),
                    attack_options={a.attack: opts}, attack_step_factor={}, task_attack_options={})
    zoo = Zoo(Path(tempfile.gettempdir()), s)  # only its data, attack, surrogate and schedule are used
    xtr, ytr, xte, yte = zoo.data(a.task)
    xt, yt = torch.from_numpy(xte[:200]).float() / 255, torch.from_numpy(yte[:200])
    attack = zoo.make_attack(a.task, a.attack, a.seed)
    if attack is None:
        p.error("give an attack, not 'benign'")
    t0 = time.time()
    if attack.requires_fit:
        attack.fit(zoo._surrogate(a.task, "resnet18", 0.25, a.seed + 500), xtr, ytr)
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

    steps, milestones = zoo.schedule(a.attack)
    train(model, xtr, ytr, task=a.task, steps=steps, lr=s.lr, batch_size=s.batch_size, milestones=milestones,
          attack=attack, seed=a.seed, progress=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
