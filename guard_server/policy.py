"""Admission policy for mitigated versions: which detections may be repaired and served.

Measured on the zoo (``docs/scan.md``, "Mitigating whole-image triggers"): unlearning works when the scan's reversed
trigger *is* the backdoor, and fails when the probe found only a shortcut near it. Then the real trigger keeps
working after mitigation (gaze Blend, SIG, multi-target WaNet) while the re-scan can read benign. Measured on gaze
Blend: AE 1.64 degrees after mitigation, re-scan benign. The re-scan gate cannot catch that. The decisive probe's
held-out variance ratio tells the two apart on the zoo: it is at most 0.0078 wherever mitigation removed the
backdoor or at least moved its outputs far from the target. It is 0.013-0.023 where mitigation failed (gaze Blend,
SIG and multi-target WaNet; head-pose SIG) or only just met the goal (head-pose WaNet and the adaptive attack). So a
probe-decided backdoor is repaired only when its probe collapsed the outputs to at most ``mitigate_max_probe_ratio``
(0.01) of their variance; otherwise the version is rejected (fail closed). The threshold was set on the same zoo.
Detections decided by DRMGuard's generator or the paper's rule are not limited by this check.

After the verdict, mitigation fits the probes again without the scan's task-region exclusion
(``MitigationConfig.unmasked_families``) and unlearns what they find as well: the gaze Blend zoo model's trigger
works only inside the eye region, which the scan's probes never touch. Whether such an unmasked probe found the
trigger does *not* decide admission: on gaze multi-target WaNet it collapsed the outputs to 0.0023 of their
variance with rigidity 8.0, and after mitigation the real trigger still worked (AE 3.55, DAE 27.6 degrees). It is a
gate after mitigation instead (:func:`found_triggers`): an unmasked probe fitted on the mitigated model that still
collapses the outputs rigidly means the backdoor survived (gaze Blend mitigated without them: 0.0001, rigidity 27).
Below ``mitigate_unmasked_above`` the engine runs that gate itself after the first repair and, where a probe still
collapses the model, repairs the submitted model again with the unmasked probes (``MitigationConfig.unmasked_check``).
"""

from __future__ import annotations

from typing import Any

from drmguard_engine.scan import deciding_family, found_triggers


def deciding_probe(report: dict[str, Any]) -> dict[str, Any] | None:
    """The probe that decided a scan (its ``decision`` names it first), or None (the generator or the paper's rule
    decided)."""
    family = deciding_family(str(report.get("decision", "")))
    return next((p for p in report.get("probes") or [] if family and p.get("family") == family), None)


def survived_unlearning(report: dict[str, Any], unmasked_after: dict[str, dict[str, Any]] | None,
                        max_ratio: float) -> str:
    """Why a mitigated model must not be served because an unmasked probe fitted on it after mitigation still
    collapses its outputs to one point, or ""."""
    still = found_triggers(unmasked_after, max_ratio, float((report.get("config") or {}).get("rigidity_threshold")
                                                            or 0.0))
    if not still:
        return ""
    after = unmasked_after or {}
    found = ", ".join(f"{k} variance ratio {float(after[k]['variance_ratio']):.4f}, rigidity "
                      f"{float(after[k]['rigidity']):.2f}" for k in still)
    return (f"after mitigation a probe fitted without the task-region exclusion still collapses the outputs to one "
            f"point ({found}): the backdoor survived unlearning")


def mitigation_refusal(report: dict[str, Any], max_probe_ratio: float, *, require_fit: bool = True) -> str:
    """Why a backdoored scan's model must not be repaired and served, or "" when mitigation may proceed.

    With ``require_fit``, a model that does not fit the benign set's labels (``report["benign_fit"]["warning"]``)
    is not repaired: the repair is fitted on, and its clean-error cost measured against, data the model was not
    made for."""
    fit = report.get("benign_fit") or {}
    if require_fit and fit.get("warning"):
        return (f"the model does not fit the benign set (error {float(fit['error']):.2f} degrees against "
                f"{float(fit['mean_predictor_error']):.2f} for predicting the label mean), so a repair fitted on it, "
                "and its clean-error check, would not mean anything; no mitigated version is served. Fix the benign "
                "set (images in [0, 1] as the model expects, labels in degrees and in the task's order) and vet again, "
                "or start the server with --no-mitigate-require-fit to accept that risk")
    p = deciding_probe(report)
    if p is None or float(p["variance_ratio"]) <= max_probe_ratio:
        return ""
    return (f"the {p['family']} probe found the backdoor only approximately (variance ratio "
            f"{float(p['variance_ratio']):.4f} > {max_probe_ratio:g}); unlearning such a trigger can leave the real "
            f"one working while the re-scan reads benign (docs/scan.md), so no mitigated version is served. Retrain "
            f"the model from clean data, or raise --mitigate-max-probe-ratio to accept that risk")


def scan_outcome(report: dict[str, Any], *, allow_mitigated: bool, max_probe_ratio: float, require_fit: bool = True,
                 warn: str = "") -> tuple[str, str] | None:
    """What the scan alone decides, ``("benign" | "rejected", reason)``, or None when the backdoored model may go on
    to mitigation. ``warn`` (what a person should check before trusting the verdict) ends every reason."""
    if report.get("verdict") == "benign":
        return "benign", "scan found no backdoor" + warn
    if not allow_mitigated:
        return "rejected", "backdoor found; policy does not admit mitigated versions" + warn
    refusal = mitigation_refusal(report, max_probe_ratio, require_fit=require_fit)
    if refusal:
        return "rejected", f"backdoor found; {refusal}{warn}"
    return None


def mitigation_outcome(rescan_verdict: str, survived: str, before: float, after: float, tolerance: float, *,
                       rescan_score: float | None = None, max_rescan_score: float = 1.0,
                       cost: dict[str, Any] | None = None) -> tuple[str, str]:
    """The final outcome of a mitigation, ``("mitigated" | "rejected", reason)``: the mitigated version is served
    only when its re-scan reads benign with a margin (score at most ``max_rescan_score``, where 1 is the scan's own
    threshold), no unmasked probe still collapses it (``survived``, from :func:`survived_unlearning`) and its clean
    error (cross-validated, or on the hold-out images) rose by at most ``tolerance`` (a fraction of ``before``).
    The checks are in that order; the first that fails is the reason. ``cost``
    (``drmguard_engine.clean_cost.CleanCost.to_dict()``, where ``before``/``after`` came from cross-validation) only
    adds its interval and sample to the reason.

    The margin: unlearning can weaken a backdoor without removing it, and the re-scan then reads benign just below
    its threshold. Measured on a held-out greyscale LeNet (BadNets; docs/scan.md): AE 1.5 -> 9.7 degrees after
    mitigation, re-scan score 0.82 (blend probe 0.061 against 0.05). Over 30 measured models (two zoos, CPU and
    H200), repairs that moved the trigger off its target re-scanned at 0.195-0.502, those that left it working at
    0.69-0.82."""
    if rescan_verdict != "benign":
        return "rejected", "backdoor found; the mitigated model still scans as backdoored"
    if rescan_score is not None and not rescan_score <= max_rescan_score:  # a NaN score fails closed
        return "rejected", (f"backdoor found; the mitigated model re-scans benign only narrowly (score "
                            f"{rescan_score:.2f} > {max_rescan_score:g}): unlearning may have weakened the backdoor "
                            f"without removing it. Retrain the model from clean data, or raise "
                            f"--mitigate-max-rescan-score to accept that risk")
    if survived:
        return "rejected", f"backdoor found; {survived}"
    how = _cost_note(before, after, cost)
    if not (after <= before * (1.0 + tolerance) + 1e-9):  # a NaN error fails closed
        return "rejected", (f"backdoor found; mitigation raised clean error from {before:.3f} to {after:.3f} degrees"
                            f"{how}, more than the {tolerance:.0%} tolerance")
    return "mitigated", (f"backdoor found and removed; re-scan benign; clean error {before:.3f} -> {after:.3f} "
                         f"degrees{how}")


def _cost_note(before: float, after: float, cost: dict[str, Any] | None) -> str:
    if not cost:
        return " on the held-back benign images"
    rise = (after - before) / max(before, 1e-9)
    return (f" ({rise:+.1%}, 95% interval {float(cost['rise_low']):+.1%} to {float(cost['rise_high']):+.1%}; "
            f"{int(cost['folds'])}-fold cross-validation over {int(cost['n'])} benign images)")


__all__ = ["deciding_probe", "found_triggers", "mitigation_outcome", "mitigation_refusal", "scan_outcome",
           "survived_unlearning"]
