"""Admission policy for mitigated versions: which detections may be repaired and served.

Measured on the zoo (``docs/scan.md``, "Mitigating whole-image triggers"): unlearning works when the scan's reversed
trigger *is* the backdoor, and fails when the probe found only a shortcut near it. Then the real trigger keeps
working after mitigation (gaze Blend, SIG, multi-target WaNet) while the re-scan can read benign. Measured on gaze
Blend: AE 1.64 degrees after mitigation, re-scan benign. The re-scan gate cannot catch that. The decisive probe's held-out variance ratio tells the
two apart on the zoo: it is at most 0.0078 wherever mitigation removed the backdoor or at least moved its outputs far
from the target. It is 0.013-0.023 where mitigation failed (gaze Blend, SIG and multi-target WaNet; head-pose SIG) or
only just met the goal (head-pose WaNet and the adaptive attack). So a probe-decided backdoor is repaired only when
its probe collapsed the outputs to at most ``mitigate_max_probe_ratio`` (0.01) of their variance; otherwise the
version is rejected (fail closed). The threshold was set on the same zoo. Detections decided
by DRMGuard's generator or the paper's rule are not limited by this check.
"""

from __future__ import annotations

from typing import Any

PROBE_FAMILIES = ("patch", "blend", "warp", "smooth", "additive")


def deciding_probe(report: dict[str, Any]) -> dict[str, Any] | None:
    """The probe that decided a scan (its ``decision`` names it first), or None (the generator or the paper's rule
    decided)."""
    decision = str(report.get("decision", ""))
    for p in report.get("probes") or []:
        if p.get("family") in PROBE_FAMILIES and decision.startswith(f"{p['family']} probe"):
            return p
    return None


def mitigation_refusal(report: dict[str, Any], max_probe_ratio: float) -> str:
    """Why a backdoored scan's model must not be repaired and served, or "" when mitigation may proceed."""
    p = deciding_probe(report)
    if p is None or float(p["variance_ratio"]) <= max_probe_ratio:
        return ""
    return (f"the {p['family']} probe found the backdoor only approximately (variance ratio "
            f"{float(p['variance_ratio']):.4f} > {max_probe_ratio:g}); unlearning such a trigger can leave the real one "
            f"working while the re-scan reads benign (docs/scan.md), so no mitigated version is served. Retrain "
            f"the model from clean data, or raise --mitigate-max-probe-ratio to accept that risk")


__all__ = ["PROBE_FAMILIES", "deciding_probe", "mitigation_refusal"]
