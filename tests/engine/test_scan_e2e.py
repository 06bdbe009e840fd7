"""End to end: train a clean and a BadNets-backdoored model, scan both, check the verdicts, then mitigate.

Real training, real attack, real scan (through the ONNX import path the service uses), the `default` profile;
only the budgets are small (ResNet18 at width 0.25, 32 px, 800 training steps) so that it fits CI on 2 cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from drmguard_engine.onnx_io import load_onnx_model
from drmguard_engine.scan import BACKDOORED, BENIGN, mitigate
from drmguard_engine.tasks import regression_error
from tests.tiny_models import run_parallel, scan_onnx, tiny_pair

pytestmark = pytest.mark.heavy(280)

PROFILE = "default"


@pytest.fixture(scope="module")
def scanned() -> dict[str, Any]:
    p = tiny_pair("gaze")
    # the fixture really is what it claims: the backdoor is in, the clean model learned the task
    assert p.backdoored_metrics["ae"] < 0.5 * p.backdoored_metrics["re"]
    assert p.clean_metrics["re"] < 10.0
    n = len(p.benign)
    train_set, hold = p.benign.subset(torch.arange(int(0.8 * n))), p.benign.subset(torch.arange(int(0.8 * n), n))
    clean_onnx, bd_onnx = p.onnx("clean"), p.onnx("backdoored")
    # the two scans side by side, each in its own single-threaded process
    r_clean, r_bd = run_parallel([(scan_onnx, (clean_onnx, p.benign, "gaze", PROFILE)),
                                  (scan_onnx, (bd_onnx, train_set, "gaze", PROFILE))])
    return {
        "pair": p, "clean": load_onnx_model(clean_onnx), "bd": load_onnx_model(bd_onnx), "train": train_set,
        "hold": hold, "r_clean": r_clean, "r_bd": r_bd,
    }


def test_scan_tells_clean_from_backdoored(scanned: dict[str, Any]) -> None:
    r_clean, r_bd, p = scanned["r_clean"], scanned["r_bd"], scanned["pair"]
    assert r_clean.verdict == BENIGN, r_clean.one_line()
    assert r_bd.verdict == BACKDOORED, r_bd.one_line()
    assert r_bd.score > 2 * r_clean.score
    # both models fit D_be (error about a fifth of the label mean's), so neither report carries a warning
    for r in (r_clean, r_bd):
        assert r.benign_fit["ratio"] < 0.5 and not r.warnings, r.benign_fit
    # the target estimate moved the outputs towards the attack's real target (appendix A.5's check): much nearer
    # to it than the model's mean output on benign inputs
    target = p.attack.target.view(1, -1)
    with torch.no_grad():
        mean_out = scanned["bd"](p.benign.images).mean(0, keepdim=True)
    d_est = regression_error("gaze", torch.tensor([r_bd.estimated_target]), target)
    assert d_est < 0.5 * regression_error("gaze", mean_out, target)


def test_mitigation_removes_the_backdoor_and_keeps_clean_error(scanned: dict[str, Any]) -> None:
    p, bd = scanned["pair"], scanned["bd"]
    x, y, target = p.test.images, p.test.labels, p.attack.target.view(1, -1)
    with torch.no_grad():
        ae_before = regression_error("gaze", bd(p.attack.apply(x)), target)
    fixed, mrep = mitigate(bd, scanned["train"], "gaze", report=scanned["r_bd"], holdout=scanned["hold"])
    with torch.no_grad():
        poisoned_out = fixed(p.attack.apply(x))
        ae_after = regression_error("gaze", poisoned_out, target)
        dae_after = regression_error("gaze", poisoned_out, y)
        clean_after = regression_error("gaze", fixed(x), y)
    assert ae_after > 3 * ae_before  # the trigger no longer sends inputs to the target
    assert dae_after < 3 * p.backdoored_metrics["re"]  # poisoned inputs get (roughly) their true labels
    assert clean_after < 1.3 * p.backdoored_metrics["re"]
    assert mrep.train_size == len(scanned["train"]) and mrep.holdout_size == len(scanned["hold"])
    assert mrep.targets == "teacher" and mrep.to_dict()["targets"] == "teacher"


def test_cross_validated_cost_measures_every_image_on_a_model_that_never_saw_it(scanned: dict[str, Any]) -> None:
    from drmguard_engine.clean_cost import cross_validated_cost
    from drmguard_engine.scan import MitigationConfig
    from drmguard_engine.tasks import per_sample_error

    bd, benign = scanned["bd"], scanned["train"]
    weights = {k: v.clone() for k, v in bd.state_dict().items()}
    seen: list[str] = []
    cost = cross_validated_cost(bd, benign, "gaze", report=scanned["r_bd"], config=MitigationConfig(steps=40),
                                folds=3, progress=lambda p: seen.append(p.phase))
    assert all(torch.equal(v, bd.state_dict()[k]) for k, v in weights.items())  # the submitted model is untouched
    assert cost.n == len(benign) and cost.folds == 3 and len(cost.fold_rises) == 3
    with torch.no_grad():
        own = per_sample_error("gaze", bd(benign.images), benign.labels).mean()
    assert cost.before == pytest.approx(float(own), rel=1e-5)  # "before" is the submitted model on every image
    assert cost.rise_low <= cost.rise <= cost.rise_high and cost.rise_high - cost.rise_low > 0
    assert min(cost.fold_rises) <= cost.rise <= max(cost.fold_rises)  # pooled: a weighted mean of the folds
    assert {"cost 1/3", "cost 2/3", "cost 3/3"} <= set(seen)
    assert cost.to_dict()["rise"] == pytest.approx(cost.after / cost.before - 1.0)
