"""The mitigation admission policy (guard_server/policy.py) on scan reports of the shapes the engine writes."""

from __future__ import annotations

import pytest

from guard_server.policy import deciding_probe, mitigation_refusal
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
