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
    cost = cross_validated_cost(bd, benign, "gaze", report=scanned["r_bd"],
                                config=MitigationConfig(steps=40, extra_seeds=0), folds=3,
                                progress=lambda p: seen.append(p.phase))
    assert all(torch.equal(v, bd.state_dict()[k]) for k, v in weights.items())  # the submitted model is untouched
    assert cost.n == len(benign) and cost.folds == 3 and len(cost.fold_rises) == 3
    with torch.no_grad():
        own = per_sample_error("gaze", bd(benign.images), benign.labels).mean()
    assert cost.before == pytest.approx(float(own), rel=1e-5)  # "before" is the submitted model on every image
    assert cost.rise_low <= cost.rise <= cost.rise_high and cost.rise_high - cost.rise_low > 0
    assert min(cost.fold_rises) <= cost.rise <= max(cost.fold_rises)  # pooled: a weighted mean of the folds
    assert {"cost 1/3", "cost 2/3", "cost 3/3"} <= set(seen)
    assert cost.to_dict()["rise"] == pytest.approx(cost.after / cost.before - 1.0)


def test_cross_validation_folds_side_by_side_give_the_same_numbers_and_report_one_at_a_time(
        scanned: dict[str, Any]) -> None:
    """``workers`` only changes how the folds share the cores: each fold mitigates its own copy with its own seeded
    generator, so with one torch thread the estimate is the same to the last bit; progress calls never overlap;
    a fold that fails stops the others and its own error is the one raised (not the others' CancelledError)."""
    import threading

    from drmguard_engine.clean_cost import cross_validated_cost
    from drmguard_engine.errors import CancelledError
    from drmguard_engine.scan import MitigationConfig

    bd, benign, report = scanned["bd"], scanned["train"], scanned["r_bd"]
    cfg = MitigationConfig(steps=20, extra_seeds=0)  # (the extra fits have their own test below)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = cross_validated_cost(bd, benign, "gaze", report=report, config=cfg, folds=3, workers=1)
        inside, overlapped, seen = [0], [False], set()
        lock = threading.Lock()

        def watch(p: Any) -> None:
            with lock:
                inside[0] += 1
                overlapped[0] |= inside[0] > 1
            seen.add((p.phase, threading.get_ident()))
            with lock:
                inside[0] -= 1

        side = cross_validated_cost(bd, benign, "gaze", report=report, config=cfg, folds=3, workers=3,
                                    progress=watch)
        assert side.after == serial.after and side.fold_rises == serial.fold_rises, (side, serial)
        assert (side.rise_low, side.rise_high) == (serial.rise_low, serial.rise_high)
        assert not overlapped[0]
        assert {ph for ph, _ in seen} >= {"cost 1/3", "cost 2/3", "cost 3/3"}
        assert len({t for _, t in seen}) > 1  # the folds really ran in threads of their own

        def fail_in_fold_2(p: Any) -> None:
            if p.phase == "cost 2/3" and p.step >= 5:
                raise RuntimeError("fold 2 failed")

        with pytest.raises(RuntimeError, match="fold 2 failed"):
            cross_validated_cost(bd, benign, "gaze", report=report, config=cfg, folds=3, workers=3,
                                 progress=fail_in_fold_2)
        stop = threading.Event()
        stop.set()
        with pytest.raises(CancelledError):
            cross_validated_cost(bd, benign, "gaze", report=report, config=cfg, folds=3, workers=2, cancel=stop)
    finally:
        torch.set_num_threads(threads)



def _without_times(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_times(v) for k, v in d.items() if k not in ("seconds", "timings")}
    if isinstance(d, list):
        return [_without_times(v) for v in d]
    return d


def test_a_scan_with_its_pieces_side_by_side_reports_the_same_numbers(scanned: dict[str, Any]) -> None:
    """``scan(workers=...)`` runs the reverse engineering, each probe family and each flagged family's rigidity check
    in threads, each on its own copy of the model: with one torch thread the report is the same to the last bit as
    one piece after the other. Small budgets; ``probe_threshold=2`` flags every family, so every rigidity check runs
    too. The submitted model is left as it was."""
    from drmguard_engine.scan import get_profile, scan

    bd, benign = scanned["bd"], scanned["train"]
    cfg = get_profile("default", "gaze", steps=10, probe_steps=12, probe_rigidity_steps=4, probe_threshold=2.0)
    weights = {k: v.clone() for k, v in bd.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = scan(bd, benign, "gaze", cfg, workers=1)
        seen: list[str] = []
        side = scan(bd, benign, "gaze", cfg, workers=3, progress=lambda p: seen.append(p.phase))
    finally:
        torch.set_num_threads(threads)
    assert [p["family"] for p in side.probes] == list(cfg.probes.families)
    assert all("rigidity" in p for p in side.probes)  # every family flagged, every check ran
    assert _without_times(side.to_dict()) == _without_times(one.to_dict())
    assert {"reverse", "probe", "rigidity", "decide"} <= set(seen)
    assert all(torch.equal(v, bd.state_dict()[k]) for k, v in weights.items())
    assert all(p.is_contiguous() for p in bd.parameters())  # the caller's model stays in the default layout


def test_extra_fits_of_the_deciding_probe_keep_only_a_collapse_away_from_the_one_found(scanned: dict[str, Any]) -> None:
    import dataclasses

    from drmguard_engine.scan import MitigationConfig, deciding_family, extra_probes

    p, report, images = scanned["pair"], scanned["r_bd"], scanned["train"].images
    bd = load_onnx_model(p.onnx("backdoored"))  # (the mitigation test above repaired scanned["bd"] in place)
    cfg = MitigationConfig(extra_seeds=2, extra_steps=60, extra_max_ratio=0.05)
    # one trigger, one target: the other seeds land where the scan's probe did, and nothing is added to D_rp
    assert extra_probes(bd, images, report, cfg) == []
    assert extra_probes(bd, images, report, dataclasses.replace(cfg, extra_seeds=0)) == []
    # as if the scan's probe had collapsed the outputs somewhere else (a second trigger): a fit that reaches the real
    # target is kept, once, however many seeds reach it
    family = deciding_family(report.decision)
    assert family is not None, report.decision
    moved = dataclasses.replace(report, probe_results=[
        dataclasses.replace(r, collapse_point=[100.0, -100.0]) if r.family == family else r
        for r in report.probe_results])
    (kept,) = extra_probes(bd, images, moved, cfg)
    assert kept.family == family and kept.variance_ratio <= 0.05 and kept.transform is not None
    target = p.attack.target.view(1, -1)
    assert regression_error("gaze", torch.tensor([kept.collapse_point]), target) < 5.0
    # and it joins D_rp under its own name
    _, mrep = mitigate(load_onnx_model(p.onnx("backdoored")), scanned["train"], "gaze", report=moved,
                       config=dataclasses.replace(cfg, steps=5, unmasked_check=False))
    assert f"probe_{family}_extra1" in mrep.triggers, mrep.triggers
