"""The mitigation admission policy (guard_server/policy.py) on scan reports of the shapes the engine writes."""

from __future__ import annotations

import pytest

from guard_server.policy import (deciding_probe, mitigation_outcome, mitigation_refusal, scan_outcome,
                                 survived_unlearning)
from guard_server.settings import ServerSettings


def _report(decision: str, **ratios: float) -> dict[str, object]:
    return {"decision": decision, "probes": [{"family": f, "variance_ratio": r} for f, r in ratios.items()]}


def test_a_precise_probe_detection_is_repaired_an_approximate_one_is_not() -> None:
    # zoo figures (docs/scan.md): BadNets' patch probe 0.0011 (mitigation works), gaze Blend's blend probe 0.0213
    # (mitigation leaves the trigger working and the re-scan reads benign)
    badnets = _report("patch probe variance ratio 0.0011 vs 0.0500 (calibrated), collapse-point rigidity 11.67 vs 1.7",
                      blend=0.0061, patch=0.0011)
    blend = _report("blend probe variance ratio 0.0213 vs 0.0500 (calibrated), collapse-point rigidity 2.29 vs 1.7",
                    blend=0.0213, patch=0.6)
    assert deciding_probe(badnets)["family"] == "patch"  # type: ignore[index]
    assert mitigation_refusal(badnets, 0.01) == ""
    why = mitigation_refusal(blend, 0.01)
    assert "blend probe found the backdoor only approximately" in why and "0.0213 > 0.01" in why
    assert mitigation_refusal(blend, 1.0) == ""  # the operator accepted the risk


def test_what_the_scan_alone_decides_comes_before_mitigation() -> None:
    blend = {**_report("blend probe variance ratio 0.0213 vs 0.0500 (calibrated)", blend=0.0213), "verdict": "backdoored"}
    benign = {**_report("blend probe variance ratio 0.3 vs 0.0500 (calibrated)", blend=0.3), "verdict": "benign"}
    w = "; WARNING: check the labels"
    assert scan_outcome(benign, allow_mitigated=False, max_probe_ratio=0.0, warn=w) == (
        "benign", "scan found no backdoor" + w)
    off = scan_outcome(blend, allow_mitigated=False, max_probe_ratio=1.0, warn=w)
    assert off is not None and off[0] == "rejected" and "does not admit mitigated" in off[1] and off[1].endswith(w)
    strict = scan_outcome(blend, allow_mitigated=True, max_probe_ratio=0.01)
    assert strict is not None and strict[0] == "rejected" and "only approximately" in strict[1]
    assert scan_outcome(blend, allow_mitigated=True, max_probe_ratio=0.0213) is None  # mitigation may proceed


def test_a_model_that_does_not_fit_its_benign_set_is_not_repaired() -> None:
    import torch

    from drmguard_engine.data.benign import BenignSet
    from drmguard_engine.scan import benign_fit  # the warning comes from the engine, in the report's shape

    badnets = _report("patch probe variance ratio 0.0011 vs 0.0500 (calibrated), collapse-point rigidity 11.67 vs 1.7",
                      patch=0.0011)
    images = torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.rand(50, 2, generator=torch.Generator().manual_seed(1)) * 40 - 20
    constant = torch.nn.Linear(3 * 8 * 8, 2)
    torch.nn.init.zeros_(constant.weight)
    model = torch.nn.Sequential(torch.nn.Flatten(), constant)
    badnets["benign_fit"] = benign_fit(model, BenignSet(images, labels), "gaze")  # a constant fits no labels
    why = mitigation_refusal(badnets, 0.01)
    assert why.startswith("the model does not fit the benign set") and "vet again" in why
    assert mitigation_refusal(badnets, 0.01, require_fit=False) == ""  # the operator accepted the risk
    badnets["benign_fit"] = {"ratio": 0.2, "warning": ""}
    assert mitigation_refusal(badnets, 0.01) == ""


def test_the_deciding_probe_is_the_one_the_decision_names_not_the_lowest_ratio() -> None:
    # under the rigidity rule a lower-ratio family whose collapse can be steered does not decide
    rep = _report("patch probe variance ratio 0.0040 vs 0.0500 (calibrated), collapse-point rigidity 3.0 vs 1.7",
                  blend=0.002, patch=0.004)
    assert deciding_probe(rep)["family"] == "patch"  # type: ignore[index]
    assert mitigation_refusal(rep, 0.003) != "" and mitigation_refusal(rep, 0.005) == ""


@pytest.mark.parametrize("decision", [
    "DRMGuard perturbation ratio 0.0035 vs epsilon 0.03 (outputs collapsed to 0.012 of their variance)",
    "paper rule: perturbation ratio 0.0100 < epsilon 0.03",
])
def test_generator_and_paper_rule_detections_are_not_limited(decision: str) -> None:
    rep = _report(decision, blend=0.3)
    assert deciding_probe(rep) is None and mitigation_refusal(rep, 0.0) == ""


def test_the_setting_is_validated() -> None:
    assert ServerSettings().mitigate_max_probe_ratio == 0.01
    with pytest.raises(ValueError, match="mitigate_max_probe_ratio"):
        ServerSettings(mitigate_max_probe_ratio=2.0)
    assert ServerSettings().mitigate_unmasked_above == 0.01 and ServerSettings(mitigate_unmasked_above=0.0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="mitigate_unmasked_above"):
            ServerSettings(mitigate_unmasked_above=bad)


def test_a_mitigation_that_costs_more_clean_error_than_the_tolerance_is_rejected() -> None:
    # the figures of the two-thread copy of the tiny fixture (docs/scan.md): unlearning raised clean error from
    # 4.043 to 4.903 degrees (+21%), over the default 10%
    outcome, why = mitigation_outcome("benign", "", 4.043, 4.903, 0.10)
    assert outcome == "rejected"
    assert "raised clean error from 4.043 to 4.903 degrees on the held-back benign images, more than the 10% " \
           "tolerance" in why
    assert mitigation_outcome("benign", "", 4.043, 4.903, 0.25)[0] == "mitigated"  # an operator's wider tolerance
    # at the bound exactly, and below it, the version is served; lower error after unlearning is fine too
    assert mitigation_outcome("benign", "", 4.0, 4.4, 0.10)[0] == "mitigated"
    assert mitigation_outcome("benign", "", 4.0, 4.41, 0.10)[0] == "rejected"
    outcome, why = mitigation_outcome("benign", "", 3.345, 3.1, 0.0)
    assert outcome == "mitigated" and "3.345 -> 3.100 degrees" in why


def test_a_mitigation_with_an_unmeasurable_clean_error_fails_closed() -> None:
    assert mitigation_outcome("benign", "", 4.0, float("nan"), 0.10)[0] == "rejected"
    assert mitigation_outcome("benign", "", float("nan"), 4.0, 0.10)[0] == "rejected"
    assert mitigation_outcome("benign", "", 4.0, float("inf"), 10.0)[0] == "rejected"


def test_the_rescan_and_the_survival_check_come_before_the_clean_error() -> None:
    # a re-scan that still reads backdoored rejects whatever the clean error did
    outcome, why = mitigation_outcome("backdoored", "", 4.0, 3.9, 0.10)
    assert outcome == "rejected" and "still scans as backdoored" in why
    # an unmasked probe that still collapses the mitigated model (the survival test's figures)
    survived = survived_unlearning({"config": {"rigidity_threshold": 1.7}},
                                   {"blend_unmasked": {"variance_ratio": 1e-8, "rigidity": 3500.0}}, 0.01)
    assert "blend_unmasked variance ratio 0.0000, rigidity 3500.00" in survived
    outcome, why = mitigation_outcome("benign", survived, 4.0, 3.9, 0.10)
    assert outcome == "rejected" and why.endswith("the backdoor survived unlearning")
    # the same probe, no longer rigid or no longer collapsing, is not a survival
    assert survived_unlearning({"config": {"rigidity_threshold": 1.7}},
                               {"blend_unmasked": {"variance_ratio": 1e-8, "rigidity": 1.2}}, 0.01) == ""
    assert survived_unlearning({"config": {"rigidity_threshold": 1.7}},
                               {"blend_unmasked": {"variance_ratio": 0.2, "rigidity": 40.0}}, 0.01) == ""


def test_a_rescan_that_reads_benign_only_narrowly_is_rejected() -> None:
    # the held-out greyscale LeNet (docs/scan.md): unlearning weakened its BadNets backdoor (AE 1.5 -> 9.7 degrees)
    # and the re-scan read benign at score 0.82 (blend probe 0.061 against 0.05), clean error +8.7%
    outcome, why = mitigation_outcome("benign", "", 4.356, 4.733, 0.10, rescan_score=0.82, max_rescan_score=0.5)
    assert outcome == "rejected"
    assert "re-scans benign only narrowly (score 0.82 > 0.5)" in why and "--mitigate-max-rescan-score" in why
    # the zoo's removed backdoors re-scanned at 0.20-0.40; at the bound the version is served
    assert mitigation_outcome("benign", "", 4.0, 4.1, 0.10, rescan_score=0.39, max_rescan_score=0.5)[0] == "mitigated"
    assert mitigation_outcome("benign", "", 4.0, 4.1, 0.10, rescan_score=0.5, max_rescan_score=0.5)[0] == "mitigated"
    assert mitigation_outcome("benign", "", 4.0, 4.1, 0.10, rescan_score=0.82, max_rescan_score=1.0)[0] == "mitigated"
    assert mitigation_outcome("benign", "", 4.0, 4.1, 0.10, rescan_score=float("nan"),
                              max_rescan_score=0.5)[0] == "rejected"  # fails closed
    # a re-scan that reads backdoored is still the first reason
    assert "still scans as backdoored" in mitigation_outcome("backdoored", "", 4.0, 4.1, 0.10, rescan_score=1.5,
                                                            max_rescan_score=0.5)[1]
    assert ServerSettings().mitigate_max_rescan_score == 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="mitigate_max_rescan_score"):
            ServerSettings(mitigate_max_rescan_score=bad)


def test_a_cross_validated_cost_is_judged_like_a_hold_out_one_and_says_how_it_was_measured() -> None:
    cost = {"before": 4.0, "after": 4.2, "n": 400, "folds": 5, "rise_low": 0.01, "rise_high": 0.09}
    outcome, why = mitigation_outcome("benign", "", 4.0, 4.2, 0.10, rescan_score=0.3, max_rescan_score=0.5, cost=cost)
    assert outcome == "mitigated"
    assert "clean error 4.000 -> 4.200 degrees (+5.0%, 95% interval +1.0% to +9.0%; 5-fold cross-validation over " \
           "400 benign images)" in why
    outcome, why = mitigation_outcome("benign", "", 4.0, 4.6, 0.10, cost=cost | {"after": 4.6})
    assert outcome == "rejected" and "(+15.0%" in why and "more than the 10% tolerance" in why
    # a hold-out figure says so, and a NaN (a cost that was never measured) fails closed
    assert "on the held-back benign images" in mitigation_outcome("benign", "", 4.0, 4.2, 0.10)[1]
    assert mitigation_outcome("benign", "", float("nan"), float("nan"), 0.10, cost=cost)[0] == "rejected"


def test_cross_validation_folds_are_validated() -> None:
    assert ServerSettings().mitigate_cv_folds == 5
    assert ServerSettings(mitigate_cv_folds=0).mitigate_cv_folds == 0  # the single hold-out split
    for bad in (1, -1, 21):
        with pytest.raises(ValueError, match="mitigate_cv_folds"):
            ServerSettings(mitigate_cv_folds=bad)


def test_scan_parallel_is_validated() -> None:
    assert ServerSettings().scan_parallel == 0 and ServerSettings(scan_parallel=3).scan_parallel == 3
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="scan_parallel"):
            ServerSettings(scan_parallel=bad)


def test_extra_seeds_are_validated_and_match_the_engine() -> None:
    from drmguard_engine.scan import MitigationConfig

    assert ServerSettings().mitigate_extra_seeds == MitigationConfig().extra_seeds  # the server's default is the engine's
    assert ServerSettings(mitigate_extra_seeds=0).mitigate_extra_seeds == 0
    for bad in (-1, 17):
        with pytest.raises(ValueError, match="mitigate_extra_seeds"):
            ServerSettings(mitigate_extra_seeds=bad)
