"""Plain, typed views of the service's replies (no protobuf types leak out of the client)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Admission states after which a version no longer changes by itself.
FINAL_STATES = frozenset({"ADMITTED", "REJECTED", "FAILED"})


@dataclass(frozen=True)
class ScanEvent:
    """One progress event of a scan (``WatchScan``)."""

    scan_id: str
    state: str
    phase: str = ""
    step: int = 0
    total: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    perturbation_ratio: float | None = None
    message: str = ""
    verdict: str | None = None

    @property
    def final(self) -> bool:
        """Whether the scan reached ADMITTED, REJECTED or FAILED."""
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"final": self.final}


@dataclass(frozen=True)
class ScanInfo:
    """The record of one scan (``GetScan``).

    Attributes:
        verdict: the engine's words, ``"benign"`` or ``"backdoored"``; None until the scan decided.
        mitigated: whether a mitigated version was admitted in place of the submitted one.
        admitted_version: the version this scan admitted (the submitted one, or the mitigated child);
            None when nothing was admitted.
        report: the engine's scan report (``ScanReport.to_dict()``), empty until decided.
        mitigation: the mitigation report, empty unless mitigation ran.
        rescan: the re-scan of the mitigated model, empty unless it ran.
        clean_error_before / clean_error_after: degrees, cross-validated over the benign set (the server's
            --mitigate-cv-folds; with 0, on the held-back --holdout-fraction of it)
            (mitigation only).
        reused_from: the scan whose verdict this record reuses (identical bytes), or None.
    """

    scan_id: str
    name: str
    version: str
    task: str
    state: str
    verdict: str | None
    reason: str
    perturbation_ratio: float | None
    mitigated: bool
    admitted_version: str | None
    sha256: str
    profile: str
    benign_set_id: str = ""
    clean_error_before: float | None = None
    clean_error_after: float | None = None
    reused_from: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    mitigation: dict[str, Any] = field(default_factory=dict)
    rescan: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VetTicket:
    """What ``VetModel`` answers at once: the scan id and the state the version starts in."""

    scan_id: str
    name: str
    version: str
    state: str
    reused: bool
    message: str = ""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One version of one model (``ListModels``).

    Attributes:
        served: whether this version answers Predict calls that name no version.
        pinned: whether the model's served version is pinned (set on the served version only).
        mitigated: whether the service produced this version by mitigating ``parent``.
    """

    name: str
    version: str
    task: str
    state: str
    verdict: str | None
    reason: str
    sha256: str
    served: bool
    mitigated: bool
    parent: str | None
    scan_id: str
    pinned: bool = False
    provider: str = ""
    input_shape: tuple[int, ...] = ()
    output_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


@dataclass(frozen=True)
class Admission:
    """The outcome of ``vet --wait``: the final scan state and what the model serves now.

    ``version`` is the version the model serves after the scan (the admitted one, unless a pin
    keeps another version served), or None when nothing is served.
    """

    scan_id: str
    name: str
    submitted_version: str
    state: str
    verdict: str | None
    perturbation_ratio: float | None
    mitigated: bool
    admitted_version: str | None
    version: str | None
    serving: bool
    reason: str
    reused: bool
    clean_error_before: float | None = None
    clean_error_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """Predict's answer: raw outputs (N, d) float32 and the version that produced them."""

    outputs: Any  # numpy.ndarray; typed loosely so this module needs no numpy import
    version: str
