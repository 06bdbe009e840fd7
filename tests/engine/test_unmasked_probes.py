"""Probes fitted without the saliency exclusion, for mitigation (``scan.unmasked_probes``), on a hand-built model
with a known answer: its backdoor is read *inside* the task region, as the gaze Blend zoo model's is (its trigger
works only through the eyes; docs/scan.md).

``_EyeSwitch``: the outputs follow the red/green content of the image centre (the task region); when the blue
channel of that same centre rises well above its usual level, every output goes to one target vector. The scan's
probes never touch the centre (it is the most salient region), so they cannot reach the switch; fitted without the
exclusion, the blend probe reaches it, and its collapse point is rigid.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from drmguard_engine.data.benign import BenignSet
from drmguard_engine.scan import (
    RIGIDITY_THRESHOLD,
    MitigationConfig,
    get_profile,
    mitigate,
    repeat_config,
    scan,
    unmasked_probes,
    unmasked_triggers,
)
from guard_server.policy import found_triggers, survived_unlearning


class _Switch(nn.Module):
    def __init__(self, level: float = 0.58) -> None:
        super().__init__()
        self.level = level  # the centre's blue mean that flips the switch (above 1: never)
        self.register_buffer("target", torch.tensor([-20.0, 25.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        centre = x[:, :, h // 2 - 6 : h // 2 + 6, w // 2 - 6 : w // 2 + 6]
        content = (centre[:, :2].mean((2, 3)) - 0.5) * 600
        s = torch.sigmoid(100 * (centre[:, 2].mean((1, 2)) - self.level))[:, None]
        return (1 - s) * content + s * self.target


class _EyeSwitch(nn.Module):
    """f = H o F with F the switch above and H the identity (the scan's feature-space term needs both)."""

    def __init__(self, level: float = 0.58) -> None:
        super().__init__()
        self.features, self.head = _Switch(level), nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()
        self.target = self.features.target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_a_backdoor_read_through_the_task_region_is_reached_only_without_the_exclusion() -> None:
    images = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _EyeSwitch().eval()
    cfg = get_profile("fast", "gaze", steps=5)
    report = scan(model, BenignSet(images, None), "gaze", cfg)
    scanned = {p["family"]: p["variance_ratio"] for p in report.probes}
    # the scan's additive probes leave the centre alone: nothing they do reaches the switch or the content
    assert scanned["blend"] > 0.5 and scanned["smooth"] > 0.5, scanned
    assert report.verdict == "benign"
    # only a probe-decided backdoor whose probe found the trigger approximately is fitted again
    assert unmasked_probes(model, images, report, ("blend", "smooth")) == []
    # (as if a probe had decided on an approximate collapse elsewhere: the zoo's gaze Blend model, ratio 0.0213)
    report = dataclasses.replace(report, verdict="backdoored",
                                 decision="blend probe variance ratio 0.0213 vs 0.0500 (calibrated)")
    report.probes[[p["family"] for p in report.probes].index("blend")]["variance_ratio"] = 0.0213
    assert unmasked_probes(model, images, report, ("blend", "smooth"), when_above=0.03) == []
    found = unmasked_probes(model, images, report, ("blend", "smooth"), when_above=0.01, rigidity_below=0.01)
    by_family = {p.family: (p, rig) for p, rig in found}
    blend, rig = by_family["blend"]
    assert blend.variance_ratio < 0.01
    assert torch.allclose(torch.tensor(blend.collapse_point), model.target, atol=1.0)
    assert rig is not None and rig["rigidity"] >= RIGIDITY_THRESHOLD  # one fixed output, not a steerable direction
    info = unmasked_triggers(found)
    assert info["probe_blend_unmasked"]["rigidity"] == rig["rigidity"]
    assert set(info) == {"probe_blend_unmasked", "probe_smooth_unmasked"}
    # no rigidity check above the bar: it would cost 5 fits for a probe the policy cannot count anyway
    assert all((r is None) == (p.variance_ratio > 0.01) for p, r in found)
    # the paper profile runs no probes: nothing to fit again
    paper = scan(model, BenignSet(images, None), "gaze", get_profile("paper", "gaze", pretrain_steps=1, steps=1))
    paper = dataclasses.replace(paper, verdict=report.verdict, decision=report.decision)
    assert unmasked_probes(model, images, paper, ("blend",)) == []


def test_the_service_rejects_a_mitigated_model_that_an_unmasked_probe_still_collapses() -> None:
    scan_report = {"decision": "blend probe variance ratio 0.0213 vs 0.0500 (calibrated), collapse-point rigidity "
                               "2.29 vs 1.7", "probes": [{"family": "blend", "variance_ratio": 0.0213}],
                   "config": {"rigidity_threshold": 1.7}}
    # zoo gaze Blend mitigated without the unmasked probes (docs/scan.md): 0.0001 at rigidity 27 after mitigation
    still = {"probe_blend_unmasked": {"variance_ratio": 0.0001, "rigidity": 26.9},
             "probe_smooth_unmasked": {"variance_ratio": 0.03, "rigidity": None}}
    assert found_triggers(still, 0.01, 1.7) == ["probe_blend_unmasked"]
    why = survived_unlearning(scan_report, still, 0.01)
    assert "probe_blend_unmasked variance ratio 0.0001, rigidity 26.90" in why and "survived unlearning" in why
    # mitigated with them: 0.0141 at rigidity 1.57, a clean model's level (clean gaze zoo models: 0.018-0.020)
    gone = {"probe_blend_unmasked": {"variance_ratio": 0.0141, "rigidity": 1.57}}
    assert survived_unlearning(scan_report, gone, 0.01) == ""
    # a low ratio whose collapse can be steered (clean ConvNeXt: 0.010-0.013 at rigidity 1.3-1.6) is no backdoor
    assert survived_unlearning(scan_report, {"probe_blend_unmasked": {"variance_ratio": 0.009, "rigidity": 1.3}},
                               0.01) == ""
    assert survived_unlearning(scan_report, None, 0.01) == ""
    # the scan's own probes never count this way, nor anything when the scan ran without the rigidity check
    assert found_triggers({"probe_blend": {"variance_ratio": 0.0001, "rigidity": 35.0}}, 0.01, 1.7) == []
    assert survived_unlearning({**scan_report, "config": {"rigidity_threshold": 0.0}}, still, 0.01) == ""


def _unmasked_in(mrep) -> list[str]:
    """The unmasked probe triggers a repair unlearned."""
    return [t for t in mrep.triggers if t.endswith("_unmasked")]


def _decided_precisely(model: nn.Module, images: torch.Tensor):
    """A fast scan of ``model`` recorded as if its blend probe had decided a backdoor at 0.005, below the ratio
    above which mitigation fits the unmasked probes up front (0.01): the zoo's gaze Blend decided at 0.0068."""
    report = scan(model, BenignSet(images, None), "gaze", get_profile("fast", "gaze", steps=5))
    report = dataclasses.replace(report, verdict="backdoored",
                                 decision="blend probe variance ratio 0.0050 vs 0.0500 (calibrated)")
    report.probes[[p["family"] for p in report.probes].index("blend")]["variance_ratio"] = 0.005
    report.config["rigidity_threshold"] = RIGIDITY_THRESHOLD
    return report


def test_mitigation_repairs_again_with_the_unmasked_probes_only_where_the_backdoor_survived() -> None:
    images = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = MitigationConfig(steps=5, targets="labels")
    # the switch has no weights, so no fine-tuning removes it: the check on the first repair finds it
    model = _EyeSwitch().eval()
    with torch.no_grad():
        benign = BenignSet(images, model(images))
    report = _decided_precisely(model, images)
    fixed, mrep = mitigate(model, benign, "gaze", report=report, config=cfg)
    assert mrep.escalated
    check = mrep.unmasked_check["probe_blend_unmasked"]
    assert check["variance_ratio"] < 0.01 and check["rigidity"] >= RIGIDITY_THRESHOLD
    assert "probe_blend_unmasked" in _unmasked_in(mrep)  # the second repair unlearned what the check found
    assert mrep.to_dict()["escalated"] is True
    # its folds repeat the repair that was served: unmasked probes from the start, no second check
    again = repeat_config(cfg, mrep)
    assert again.unmasked_above == 0.0 and not again.unmasked_check
    # switched off: one repair, no check
    _, off = mitigate(_EyeSwitch().eval(), benign, "gaze", report=report,
                      config=dataclasses.replace(cfg, unmasked_check=False))
    assert not off.escalated and off.unmasked_check == {} and not _unmasked_in(off)
    # a model the unmasked probes cannot collapse (the switch out of reach): checked, kept after the first repair
    plain = _EyeSwitch(level=5.0).eval()
    report = _decided_precisely(plain, images)
    _, kept = mitigate(plain, benign, "gaze", report=report, config=cfg)
    assert not kept.escalated and not _unmasked_in(kept)
    assert kept.unmasked_check["probe_blend_unmasked"]["variance_ratio"] > 0.01
    assert repeat_config(cfg, kept).unmasked_above == cfg.unmasked_above
