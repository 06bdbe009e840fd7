"""The engine's public scan and mitigation API (what the service and the CLI call).

``scan(model, benign, task, config)`` reverse-engineers a trigger with DRMGuard (Du et al., arXiv 2411.04811)
and returns a :class:`ScanReport`; ``mitigate(model, benign, task, report=...)`` unlearns the backdoor by
fine-tuning on D_be plus the reversed poisoned set D_rp (section 3.4) and returns the model and a
:class:`MitigationReport`.

Profiles (``list_profiles()``):

* ``paper``: the method as written: paper generator pre-trained 5,000 steps, 2,000 steps of equation 5 with MTR,
  batch 50/100, lr 1.5e-3/1e-4, lambda1/lambda2 20/800 (gaze) and 10/100 (head pose), the epsilon=0.03 rule on the
  perturbation ratio. score = epsilon / ratio, so ``score >= 1`` iff ``ratio < epsilon``.
* ``default``: our measured improvement (docs/scan.md): DRMGuard's reverse engineering with an identity-initialised
  residual generator and a per-output, dilated attention map, plus universal budgeted probes scored on held-out
  images (the patch probe also starts from the best solid square of a screened search, ``ProbeConfig.patch_grid``),
  each probe that collapses the outputs checked for a rigid collapse point (one target, not a steerable
  direction); the decision statistic is described in :func:`decide`.
* ``fast``: the ``default`` decision with smaller step budgets and no square search (quicker, less thorough: it
  misses patches a network reads only at their exact size and place; for smoke checks and CI).
* ``reference``: ``default`` plus previously vetted clean models of the same family: thresholds are set relative
  to the references' own statistics (falls back to ``default`` without references).
* ``thorough``: ``default`` with the square search unscreened (every candidate scored on all 6 search images:
  about 3x the search's time, 66-243 s at 64 px on one core).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .data.benign import BenignSet
from .defenses.drmguard import DRMGuardConfig, ReverseResult, perturbation_ratio, reverse_engineer
from .defenses.probes import FAMILIES, ProbeConfig, ProbeResult, probe_rigidity, probe_setup, run_probes
from .errors import CancelledError, ConfigError, DataError, UnsupportedModelError
from .parallel import run_side_by_side
from .tasks import Task, regression_error

BENIGN = "benign"
BACKDOORED = "backdoored"


@dataclass(frozen=True)
class ScanProgress:
    phase: str
    step: int
    total: int
    losses: dict[str, float]
    perturbation_ratio: float | None
    message: str = ""


@dataclass(frozen=True)
class ScanConfig:
    """A scan profile: the reverse engineering, the probes (None = off) and the decision rule."""

    profile: str
    drmguard: DRMGuardConfig
    probes: ProbeConfig | None
    decision: str  # "epsilon" (paper) or "combined"
    # combined decision: suspicion = max(epsilon_dg / ratio_dg, probe_threshold / min probe variance ratio)
    probe_threshold: float = 0.05
    collapse_threshold: float = 0.1
    reference_margin: float = 0.5
    # a flagged probe counts only as far as its collapse point is rigid: the same budget cannot move the outputs to
    # neighbouring points (probes.probe_rigidity: neighbours' error / the collapse point's, ~1 when they are as easy
    # to reach); 0 = off (every flagged probe counts, the rule before 2026-11-26)
    rigidity_threshold: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paper_drmguard(task: Task) -> DRMGuardConfig:
    if task is Task.GAZE:
        # the paper's gaze models output radians: lambda1 was set for radians, ours output degrees
        return DRMGuardConfig(batch_size=50, lr=1.5e-3, lambda1=20.0, lambda2=800.0, output_scale=math.pi / 180)
    return DRMGuardConfig(batch_size=100, lr=1e-4, lambda1=10.0, lambda2=100.0, output_scale=1.0)


def _default_drmguard(task: Task, steps: int) -> DRMGuardConfig:
    base = _paper_drmguard(task)
    return base.replace(
        generator="residual",
        pretrain_steps=0,
        steps=steps,
        batch_size=50,
        lr=3e-3,
        lambda1=20.0,
        variance_term="relative",
        output_scale=1.0,
        attention="per_output",
        attention_dilate=5,
        attention_power=0.5,
    )


PROFILES = ("paper", "default", "fast", "reference", "thorough")
_DECISION_KEYS = ("probe_threshold", "collapse_threshold", "rigidity_threshold")
RIGIDITY_THRESHOLD = 1.7


def list_profiles() -> list[str]:
    return list(PROFILES)


def get_profile(name: str, task: Task | str, **overrides: Any) -> ScanConfig:
    """Builds a profile's config for a task; ``overrides`` replace DRMGuard options (ablation switches)."""
    task = Task.parse(task)
    probe_over = {k[len("probe_"):]: v for k, v in overrides.items()
                  if k.startswith("probe_") and k != "probe_threshold"}
    dg_over = {k: v for k, v in overrides.items()
               if not k.startswith("probe_") and k not in _DECISION_KEYS}
    if name == "paper":
        cfg = ScanConfig("paper", _paper_drmguard(task), None, "epsilon")
    elif name in ("default", "reference"):
        # the patch probe starts from the best solid square too (ProbeConfig.patch_grid, screened on 2 images):
        # default since 2026-11-27, when the screen made it affordable (docs/scan.md, "The square search")
        cfg = ScanConfig(name, _default_drmguard(task, 100), ProbeConfig(steps=150, patch_grid=True), "combined",
                         rigidity_threshold=RIGIDITY_THRESHOLD)
    elif name == "thorough":
        # ``default`` with the square search unscreened: every candidate scored on every search image
        cfg = ScanConfig("thorough", _default_drmguard(task, 100),
                         ProbeConfig(steps=150, patch_grid=True, patch_grid_screen=0),
                         "combined", rigidity_threshold=RIGIDITY_THRESHOLD)
    elif name == "fast":
        cfg = ScanConfig("fast", _default_drmguard(task, 50), ProbeConfig(steps=100),
                         "combined", rigidity_threshold=RIGIDITY_THRESHOLD)
    else:
        raise ConfigError(f"unknown scan profile {name!r}; choose one of {', '.join(PROFILES)}")
    dg = cfg.drmguard.replace(**dg_over) if dg_over else cfg.drmguard
    pr = cfg.probes.replace(**probe_over) if (cfg.probes is not None and probe_over) else cfg.probes
    thr = overrides.get("probe_threshold", cfg.probe_threshold)
    return ScanConfig(cfg.profile, dg, pr, cfg.decision, probe_threshold=thr,
                      collapse_threshold=overrides.get("collapse_threshold", cfg.collapse_threshold),
                      reference_margin=cfg.reference_margin,
                      rigidity_threshold=overrides.get("rigidity_threshold", cfg.rigidity_threshold))


@dataclass
class ScanReport:
    verdict: str
    perturbation_ratio: float
    threshold: float
    score: float
    score_threshold: float
    decision: str
    estimated_target: list[float]
    drmguard_target: list[float]
    steps: int
    seconds: float
    profile: str
    task: str
    rav: float
    rnv: float
    output_variance_ratio: float
    probes: list[dict[str, Any]] = field(default_factory=list)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    n_benign: int = 0
    references: list[dict[str, Any]] = field(default_factory=list)
    # how well the model fits D_be's labels (:func:`benign_fit`; empty when D_be has none) and what a person should
    # check before trusting the verdict
    benign_fit: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # not serialised: what mitigation needs
    reverse: ReverseResult | None = field(default=None, repr=False)
    probe_results: list[ProbeResult] = field(default_factory=list, repr=False)

    @property
    def backdoored(self) -> bool:
        return self.verdict == BACKDOORED

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import fields as _fields

        return {f.name: getattr(self, f.name) for f in _fields(self) if f.name not in ("reverse", "probe_results")}

    def one_line(self) -> str:
        return (
            f"verdict={self.verdict} score={self.score:.3f} (threshold {self.score_threshold:g}) "
            f"perturbation_ratio={self.perturbation_ratio:.4f} (epsilon {self.threshold:g}) "
            f"target={[round(v, 2) for v in self.estimated_target]} decided by {self.decision} "
            f"in {self.seconds:.1f}s" + "".join(f"; WARNING: {w}" for w in self.warnings)
        )


#: a model whose error on D_be is at least this fraction of the error of predicting D_be's label mean does not
#: fit the benign set: the scan's premise (D_be is the model's own kind of data) is in doubt
FIT_WARNING_RATIO = 0.75


def benign_fit(model: nn.Module, benign: BenignSet, task: Task | str, *, device: str | torch.device = "cpu",
               batch: int = 256) -> dict[str, Any]:
    """How well ``model`` fits D_be's labels, against predicting their mean, with a warning when it does not.

    The scan's statistics do not use the labels, but they assume D_be is data the model was made for. A model fed
    images scaled other than it expects ([0, 255], BGR, other normalisation), or D_be labelled in other units
    (radians) or another order, fits the labels no better than their mean. The verdict is then about inputs the
    model was never meant to see. Returns ``{}`` when D_be has no labels.
    """
    if benign.labels is None:
        return {}
    task = Task.parse(task)
    model = model.to(device).eval()
    with torch.no_grad():
        preds = torch.cat([model(benign.images[i:i + batch].to(device)).float().cpu()
                           for i in range(0, len(benign), batch)])
    labels = benign.labels.float()
    error = regression_error(task, preds, labels)
    baseline = regression_error(task, labels.mean(0, keepdim=True).expand_as(labels), labels)
    out_spread, label_spread = float(preds.std(0).mean()), float(labels.std(0).mean())
    fit: dict[str, Any] = {"error": error, "mean_predictor_error": baseline,
                           "ratio": error / baseline if baseline > 0 else math.inf,
                           "output_spread": out_spread, "label_spread": label_spread, "warning": ""}
    if not math.isfinite(error) or fit["ratio"] >= FIT_WARNING_RATIO:
        hint = ""
        scale = out_spread / label_spread if label_spread > 0 else math.inf
        if 1 / 120 < scale < 1 / 30:
            hint = " (its outputs vary about 1/57 as much as the labels: outputs in radians?)"
        elif 30 < scale < 120:
            hint = " (its outputs vary about 57 times as much as the labels: labels in radians?)"
        elif scale < 1 / 20:
            hint = " (its outputs barely vary)"
        fit["warning"] = (
            f"the model does not fit the benign set: error {error:.2f} degrees against {baseline:.2f} for "
            f"predicting the label mean{hint}; check that the images are what the model expects (float in [0, 1], "
            f"RGB, channels first) and the labels' units (degrees) and order ({', '.join(task.label_names)}). "
            "The verdict is about these images")
    return fit


def _probe_dict(p: ProbeResult) -> dict[str, Any]:
    return {k: getattr(p, k) for k in ("family", "variance_ratio", "fit_variance_ratio", "collapse_point", "drift",
                                       "perturbation_ratio", "seconds")}


def _check_model(model: nn.Module, task: Task, benign: BenignSet) -> None:
    for attr in ("features", "head"):
        if not hasattr(model, attr):
            raise UnsupportedModelError(f"the model has no '{attr}': it must be split into F (features) and H (head)")
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError("the model's head must be one linear layer (H)")
    if model.head.out_features != task.dim:
        raise UnsupportedModelError(
            f"task {task.value} needs {task.dim} outputs {task.label_names}, the model has {model.head.out_features}"
        )
    if len(benign) < 4:
        raise DataError(f"the benign set needs at least 4 images, got {len(benign)}")


def probe_threshold(cfg: ScanConfig, refs: Sequence[dict[str, float]] = ()) -> tuple[float, str]:
    """The probe variance-ratio threshold and where it came from (calibrated, or the reference models)."""
    if refs:
        return cfg.reference_margin * min(r["min_probe_ratio"] for r in refs), f"{len(refs)} reference model(s)"
    return cfg.probe_threshold, "calibrated"


def needs_rigidity(cfg: ScanConfig, probes: Sequence[dict[str, Any]],
                   refs: Sequence[dict[str, float]] = ()) -> list[str]:
    """The probe families whose rigidity the decision needs: those below the probe threshold."""
    if cfg.decision != "combined" or cfg.rigidity_threshold <= 0:
        return []
    thr, _ = probe_threshold(cfg, refs)
    return [p["family"] for p in probes if p["variance_ratio"] < thr]


def deciding_family(decision: str) -> str | None:
    """The probe family that a :func:`decide` explanation names as deciding (``"<family> probe ..."``), or None
    (DRMGuard's generator or the paper's rule decided)."""
    words = decision.split(" ", 2)
    return words[0] if len(words) > 1 and words[1] == "probe" and words[0] in FAMILIES else None


def decide(cfg: ScanConfig, perturbation_ratio: float, output_variance_ratio: float,
           probes: Sequence[dict[str, Any]] = (), refs: Sequence[dict[str, float]] = ()) -> tuple[float, float, str]:
    """The profile's decision from a scan's statistics: ``(score, score_threshold, why)``; backdoored iff
    ``score >= score_threshold``. Public so that benchmarks can re-decide cached scans with the current rule.

    ``paper``: score = epsilon / perturbation ratio (the paper's rule, ratio < epsilon).

    ``combined`` (default): suspicion = max of two scale-free ratios, backdoored iff >= 1:

    * DRMGuard term: epsilon / perturbation ratio of the reversed input-aware trigger, counted only when the
      reversed trigger really collapsed the outputs (output variance ratio <= collapse_threshold);
    * probe term: probe_threshold / min over probe families of the held-out output-variance ratio (catches
      universal triggers, whatever their L1 size, within the probe budgets). With ``rigidity_threshold`` > 0
      a family below the threshold counts only as far as its collapse point is rigid: its term is
      min(probe_threshold / ratio, rigidity / rigidity_threshold), where ``rigidity`` (a probe dict's
      ``rigidity`` entry, from :func:`probes.probe_rigidity`) says how far the same budget fails to move the
      collapse to neighbouring outputs (a backdoor's target is one fixed output).

    With reference models, probe_threshold becomes reference_margin x the smallest reference probe ratio.
    """
    eps = cfg.drmguard.epsilon
    if cfg.decision == "epsilon":
        score = eps / max(perturbation_ratio, 1e-9)
        return score, 1.0, (f"paper rule: perturbation ratio {perturbation_ratio:.4f} "
                            f"{'<' if score >= 1 else '>='} epsilon {eps:g}")
    if output_variance_ratio <= cfg.collapse_threshold:
        s_dg = eps / max(perturbation_ratio, 1e-9)
        dg_why = (f"DRMGuard perturbation ratio {perturbation_ratio:.4f} vs epsilon {eps:g} "
                  f"(outputs collapsed to {output_variance_ratio:.3f} of their variance)")
    else:
        # the reverse engineering did not collapse the outputs: a small perturbation that reaches no target is
        # no evidence of a trigger, so the epsilon rule does not vote (it would flag a model whose generator
        # merely failed to move)
        s_dg = 0.0
        dg_why = (f"DRMGuard reverse engineering did not collapse the outputs (variance ratio "
                  f"{output_variance_ratio:.3f} > {cfg.collapse_threshold:g})")
    parts = [(s_dg, dg_why)]
    if probes:
        thr, src = probe_threshold(cfg, refs)
        for p in probes:
            s_p = thr / max(p["variance_ratio"], 1e-9)
            why = f"{p['family']} probe variance ratio {p['variance_ratio']:.4f} vs {thr:.4f} ({src})"
            rig = p.get("rigidity")
            if s_p >= 1 and cfg.rigidity_threshold > 0 and rig is not None:
                # a collapse counts only where it is rigid: a model that the same budget steers to neighbouring
                # outputs has a universal direction, not a shortcut to one target
                s_rig = rig["rigidity"] / cfg.rigidity_threshold
                why += f", collapse-point rigidity {rig['rigidity']:.2f} vs {cfg.rigidity_threshold:g}"
                if s_rig < s_p:
                    s_p = s_rig
                    if s_rig < 1:
                        why += " (the same budget steers the outputs to neighbouring points: not one target)"
            parts.append((s_p, why))
    score, why = max(parts, key=lambda p: p[0])
    return score, 1.0, why


def _reverse_and_probes(model: nn.Module, images: torch.Tensor, cfg: ScanConfig, emit: Callable[..., None],
                        cancel: Any, side: int, own: Callable[[nn.Module], nn.Module]
                        ) -> tuple[ReverseResult, list[ProbeResult]]:
    """DRMGuard's reverse engineering and the probe families, one after the other or (``side`` > 1) side by side,
    each family then fitted on its own (its batches come from its own seeded stream, so the result is the same).
    The square search makes the patch probe the longest piece, the reverse engineering the next: they start
    first."""
    if cfg.probes is None or side <= 1:
        rev = reverse_engineer(model, images, cfg.drmguard, progress=emit, cancel=cancel)
        probes = run_probes(model, images, cfg.probes, progress=emit, cancel=cancel) if cfg.probes is not None else []
        return rev, probes
    pcfg = cfg.probes
    families = sorted(pcfg.families, key=lambda f: f != "patch")  # stable: the rest keep their order
    setup = probe_setup(model, images, pcfg)  # the split, outputs and exclusion every family shares: once

    def reverse(stop: Any) -> ReverseResult:
        return reverse_engineer(own(model), images, cfg.drmguard, progress=emit, cancel=stop)

    def probe(stop: Any, family: str) -> ProbeResult:
        return run_probes(own(model), images, pcfg.replace(families=(family,)), progress=emit, cancel=stop,
                          setup=setup)[0]

    calls: list[Callable[[Any], Any]] = [functools.partial(probe, family=f) for f in families]
    calls.insert(1 if families[0] == "patch" else 0, reverse)
    done = run_side_by_side(calls, side, cancel)
    rev = next(r for r in done if isinstance(r, ReverseResult))
    by_family = {r.family: r for r in done if isinstance(r, ProbeResult)}
    return rev, [by_family[f] for f in pcfg.families]


def scan(
    model: nn.Module,
    benign: BenignSet,
    task: Task | str,
    config: ScanConfig | str | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[ScanProgress], None] | None = None,
    cancel: threading.Event | None = None,
    references: Sequence[nn.Module] = (),
    workers: int = 1,
) -> ScanReport:
    """Scans one regression model for a backdoor.

    Args:
        model: f = H o F with ``features`` (F) and ``head`` (an ``nn.Linear``, H); inputs in [0,1]. It is not
            modified (gradients are switched off on a frozen copy's parameters only during the scan).
        benign: D_be (labels are not needed by the scan).
        task: ``gaze`` or ``headpose``.
        config: a profile name (``list_profiles()``) or a :class:`ScanConfig`; default ``"default"``.
        device: where to run (``"cuda"`` when available is the CLI's and the server's default).
        progress: called with :class:`ScanProgress` events.
        cancel: when set, the scan stops with :class:`CancelledError` at the next step.
        references: optional previously vetted clean models of the same family (profile ``reference``).
        workers: on the CPU, how many of the scan's independent pieces (the reverse engineering, each probe family,
            each flagged family's rigidity check) run side by side in threads, each on its own copy of the model
            with the caller's torch thread count (:mod:`drmguard_engine.parallel`; ``side_by_side()`` says how
            many the cores hold). 1, the default, leaves the cores to a caller that runs several scans at once.
            The report does not depend on it (tested).

    Returns:
        The report; a backdoor is a verdict, never an exception.
    """
    task = Task.parse(task)
    cfg = get_profile("default" if config is None else config, task) if not isinstance(config, ScanConfig) else config
    _check_model(model, task, benign)
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = model.to(dev).eval()
    images = benign.images.to(dev)
    req = [p.requires_grad for p in model.parameters()]

    said = threading.Lock()  # the pieces below may run in threads of their own

    def emit(phase: str, step: int, total: int, losses: dict[str, float], ratio: float | None) -> None:
        if progress is not None:
            with said:
                progress(ScanProgress(phase, step, total, losses, ratio))

    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    side = workers if dev.type == "cpu" else 1

    def own(m: nn.Module) -> nn.Module:  # a piece beside others changes its model's layout: it gets a copy
        return copy.deepcopy(m) if side > 1 else m

    try:
        rev, probes = _reverse_and_probes(model, images, cfg, emit, cancel, side, own)
        refs: list[dict[str, float]] = []
        if cfg.profile == "reference" and references and cfg.probes is not None:
            for i, ref in enumerate(references):
                ref = ref.to(dev).eval()
                rp = run_probes(ref, images, cfg.probes, cancel=cancel)
                refs.append({"index": i, "min_probe_ratio": min(p.variance_ratio for p in rp)})
                for p in ref.parameters():
                    p.requires_grad_(True)
        probe_dicts = [_probe_dict(p) for p in probes]
        assert cfg.probes is not None or not probes
        flagged = needs_rigidity(cfg, probe_dicts, refs)
        checks = [(d, pr) for d, pr in zip(probe_dicts, probes, strict=True) if d["family"] in flagged]
        found = run_side_by_side([
            functools.partial(lambda stop, d, pr: probe_rigidity(own(model), images, cfg.probes, d["family"],
                                                                 d["collapse_point"], pr.transform, progress=emit,
                                                                 cancel=stop), d=d, pr=pr)
            for d, pr in checks], side, cancel)
        for (d, _), rig in zip(checks, found, strict=True):
            d["rigidity"] = rig
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
    fit = benign_fit(model, benign, task, device=dev)
    score, score_thr, why = decide(cfg, rev.perturbation_ratio, rev.output_variance_ratio, probe_dicts, refs)
    verdict = BACKDOORED if score >= score_thr else BENIGN
    # the target estimate (A.5) comes from whichever reversed trigger decided: the probe's collapse point when a
    # probe decided, else the mean of f(x') of DRMGuard's generator
    target = rev.estimated_target
    decisive = [p for p in probes if p.family == deciding_family(why)]
    if decisive:
        target = decisive[0].collapse_point
    emit("decide", 1, 1, {"score": score}, rev.perturbation_ratio)
    timings = dict(rev.seconds)
    timings.update({f"probe_{p.family}": p.seconds for p in probes})
    timings.update({f"rigidity_{d['family']}": d["rigidity"]["seconds"] for d in probe_dicts
                    if "rigidity" in d})
    steps = cfg.drmguard.pretrain_steps + cfg.drmguard.steps + (
        cfg.probes.steps_for(*benign.images.shape[-2:]) * len(cfg.probes.families) if cfg.probes is not None else 0)
    return ScanReport(
        verdict=verdict,
        perturbation_ratio=rev.perturbation_ratio,
        threshold=cfg.drmguard.epsilon,
        score=float(score),
        score_threshold=float(score_thr),
        decision=why,
        estimated_target=target,
        drmguard_target=rev.estimated_target,
        steps=steps,
        seconds=time.perf_counter() - t0,
        profile=cfg.profile,
        task=task.value,
        rav=rev.rav,
        rnv=rev.rnv,
        output_variance_ratio=rev.output_variance_ratio,
        probes=probe_dicts,
        loss_history=rev.history,
        timings=timings,
        config=cfg.to_dict(),
        device=str(dev),
        n_benign=len(benign),
        references=refs,
        reverse=rev,
        probe_results=probes,
        benign_fit=fit,
        warnings=[fit["warning"]] if fit.get("warning") else [],
    )


# ---------------------------------------------------------------------------------------------- mitigation


@dataclass(frozen=True)
class MitigationConfig:
    """Fine-tuning on D_be + D_rp. The paper gives no epochs, lr or mix (notes 4.8): Adam, the DRM's own training
    lr 1e-4, L1 loss, each batch half D_be and half D_rp."""

    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    # which probes' reversed triggers join D_rp: "decisive" (the one with the lowest variance ratio) or "flagged"
    # (every probe below the scan's probe threshold: a trigger is often reproduced in part by several families;
    # measured on the zoo, flagged lowered DAE from 17.2 to 9.1 deg (gaze adaptive) and 11.2 to 6.6 (head-pose
    # WaNet), and changed nothing where only one probe flagged)
    probe_triggers: str = "flagged"
    # what the fine-tuning fits: "labels" (the paper: D_be and D_rp with their annotations) or "teacher" (the
    # model's own outputs on the clean images, so reversed-trigger inputs are pulled to what their clean image gives
    # and clean behaviour is held where it was, instead of being refitted to 400 labels)
    targets: str = "teacher"
    # refreshing the probe triggers while unlearning (0 = off: D_rp is built once, as the paper does): every
    # ``refresh_every`` steps each probe trigger in D_rp is re-fitted for ``refresh_steps`` steps against the model
    # as it is now (the scan's own objective: collapse the outputs' variance), and its part of D_rp is rebuilt.
    # A fixed trigger that is only near the real one (whole-image Blend, SIG) is unlearned while the backdoor
    # keeps working; a refreshed one follows what is left of it. Measured side by side in docs/scan.md.
    refresh_every: int = 0
    refresh_steps: int = 20
    # unlearning a neighbourhood of each probe trigger, not only the trigger itself (0 = off): every step, the
    # ``neighbourhood_share`` of the D_rp half of the batch is made on the fly by a copy of a reversed probe whose
    # parameters (before their sigmoid/tanh) are moved by N(0, neighbourhood_sigma^2). A probe that found a shortcut
    # *near* a whole-image trigger then also unlearns the triggers around it. Measured in docs/scan.md.
    neighbourhood_sigma: float = 0.0
    neighbourhood_share: float = 0.5
    # probe families fitted again *without* the saliency exclusion once the verdict is in, whose triggers join D_rp
    # when they collapse the outputs below the scan's probe threshold (() = off: only the scan's own triggers). The
    # exclusion keeps a clean model from being collapsed through its task region, but a backdoor can be read there
    # too: the gaze Blend zoo model's trigger works only inside the excluded eye region (AE 0.39 deg with the
    # trigger there alone, 26.6 with it everywhere else), so the scan's probe found a shortcut near it and
    # unlearning that left the backdoor working (AE 1.64, DAE 26.5). Fitted without the exclusion, the blend probe
    # reaches the real trigger (variance ratio 0.0001, collapse point 0.08 std from the real target) and
    # mitigation meets the goal (AE 24.6, DAE 7.05, clean error +4.5%). Measured in docs/scan.md.
    unmasked_families: tuple[str, ...] = ("blend", "smooth")
    # ... fitted only when a probe decided the scan with a variance ratio above this: its trigger was found only
    # approximately. Below it the scan's probe has the trigger already (zoo: mitigation worked wherever the deciding
    # probe was at most 0.0078), and more triggers in D_rp cost clean error (head-pose Blend: +11% instead of +5%)
    unmasked_above: float = 0.01
    # an unmasked trigger at or below this variance ratio also gets the rigidity check (probes.probe_rigidity): the
    # service fits the unmasked probes again on the mitigated model and rejects it when one still collapses the
    # outputs to one point (guard_server/policy.py: survived_unlearning), not to a steerable direction
    unmasked_rigidity_below: float = 0.01
    # where the unmasked probes were not fitted (the deciding probe's ratio at or below ``unmasked_above``), fit them
    # on the mitigated model: when one still collapses its outputs to one point (:func:`found_triggers`, the
    # service's survival gate), the backdoor was read through the task region and survived, so the submitted model
    # is mitigated again with them in D_rp (the ``unmasked_above=0`` repair). Good repairs keep the cheaper recipe
    # (at 0, 3 of 8 zoo repairs failed the service's clean-error check); a surviving one gets the unmasked probes.
    # Measured side by side in docs/scan.md, "Fitting the unmasked probes only when the backdoor survived".
    unmasked_check: bool = True
    # more fits of the deciding probe family before unlearning, from ``extra_seeds`` other seeds with ``extra_steps``
    # steps each (0 = off): a fit that collapses the outputs to at most ``extra_max_ratio`` of their variance at a
    # point at least ``extra_min_distance`` benign output stds (RMS over the outputs) from every trigger already
    # kept joins D_rp. A backdoor with two triggers (multi-target WaNet) is found by the scan through one of them;
    # unlearning that one leaves the other working (gaze: AE 3.86 after), and another seed reaches it (gaze: AE
    # 25.0 after). Fits that land on the trigger already found add nothing (the 9 other zoo repairs: unchanged to
    # the last digit, 25-60 s more each). Measured in docs/scan.md, "A second trigger"
    extra_seeds: int = 2
    extra_steps: int = 450
    extra_max_ratio: float = 0.01
    extra_min_distance: float = 1.0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 1 or not self.lr > 0:
            raise ConfigError("mitigation steps, batch_size (>1) and lr must be positive")
        if self.refresh_every < 0 or self.refresh_steps < 1:
            raise ConfigError("refresh_every must be >= 0 (0 = off) and refresh_steps >= 1")
        if self.neighbourhood_sigma < 0 or not 0.0 <= self.neighbourhood_share <= 1.0:
            raise ConfigError("neighbourhood_sigma must be >= 0 and neighbourhood_share in [0, 1]")
        if self.targets not in ("labels", "teacher"):
            raise ConfigError(f"targets must be 'labels' or 'teacher', got {self.targets!r}")
        if not 0.0 <= self.unmasked_above < 1.0 or not 0.0 <= self.unmasked_rigidity_below < 1.0:
            raise ConfigError("unmasked_above and unmasked_rigidity_below must be variance ratios in [0, 1)")
        if self.extra_seeds < 0 or self.extra_steps < 1 or not 0.0 <= self.extra_max_ratio < 1.0 \
                or self.extra_min_distance < 0:
            raise ConfigError("extra_seeds must be >= 0 (0 = off), extra_steps >= 1, extra_max_ratio in [0, 1) and "
                              "extra_min_distance >= 0")
        if self.probe_triggers not in ("decisive", "flagged"):
            raise ConfigError(f"probe_triggers must be 'decisive' or 'flagged', got {self.probe_triggers!r}")
        bad = [f for f in self.unmasked_families if f not in FAMILIES]
        if bad:
            raise ConfigError(f"unmasked_families must be a subset of {FAMILIES}, got {self.unmasked_families}")


@dataclass
class MitigationReport:
    clean_error_before: float
    clean_error_after: float
    reversed_error_before: float  # regression error to the true labels on reversed-poisoned held-out inputs
    reversed_error_after: float
    target_error_before: float  # error to the estimated target on the same inputs (a reversed-trigger AE)
    target_error_after: float
    holdout_size: int
    train_size: int
    steps: int
    seconds: float
    triggers: list[str]
    targets: str = "teacher"  # what the fine-tuning fitted (MitigationConfig.targets)
    # each probe trigger in D_rp: its held-out output-variance ratio and, where measured, its collapse-point
    # rigidity (the scan's flagged probes, then the unmasked ones fitted after the verdict)
    probe_triggers: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # MitigationConfig.unmasked_check: the unmasked probes fitted on the first repair (empty when the check did not
    # run), and whether one survived it so that the model was mitigated again with them in D_rp
    unmasked_check: dict[str, dict[str, float | None]] = field(default_factory=dict)
    escalated: bool = False

    @property
    def clean_error_increase(self) -> float:
        return (self.clean_error_after - self.clean_error_before) / max(self.clean_error_before, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clean_error_increase"] = self.clean_error_increase
        return d


def mitigation_config(config: MitigationConfig | None, report: ScanReport | None) -> MitigationConfig:
    """The mitigation settings: ``config`` when given; otherwise the default, except after a ``paper``-profile scan,
    which mitigates as the paper does (D_be and D_rp with their annotations, ``targets="labels"``)."""
    if config is not None:
        return config
    if report is not None and report.profile == "paper":
        return MitigationConfig(targets="labels")
    return MitigationConfig()


def needs_unmasked(report: ScanReport, when_above: float) -> bool:
    """Whether a probe decided ``report``'s backdoored verdict with a variance ratio above ``when_above`` (its
    trigger found only approximately: :func:`unmasked_probes` then runs)."""
    ratios = ({p["family"]: p["variance_ratio"] for p in report.probes}
              or {p.family: p.variance_ratio for p in report.probe_results})
    ratio = ratios.get(deciding_family(report.decision) or "")
    return report.verdict == BACKDOORED and ratio is not None and ratio > when_above


def unmasked_probes(
    model: nn.Module,
    images: torch.Tensor,
    report: ScanReport,
    families: Sequence[str],
    *,
    when_above: float = 0.0,
    rigidity_below: float = 0.01,
    progress: Callable[[ScanProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[tuple[ProbeResult, dict[str, Any] | None]]:
    """The scan's probe ``families`` fitted again on ``images`` without the saliency exclusion, each with its
    rigidity check (:func:`probes.probe_rigidity`) when its variance ratio is at most ``rigidity_below`` (else
    None). For mitigation, after a backdoored verdict: a backdoor read through the task region (the eyes) is out of
    the scan's probes' reach (``MitigationConfig.unmasked_families``). Empty unless a probe decided a backdoored
    verdict with a variance ratio above ``when_above`` (so never after the ``paper`` profile, which runs no probes)."""
    stored = report.config.get("probes")
    if not families or not stored or not needs_unmasked(report, when_above):
        return []
    cfg = _stored_probes(stored).replace(families=tuple(families), exclude_fraction=0.0)

    def emit(phase: str, step: int, total: int, losses: dict[str, float], ratio: float | None) -> None:
        if progress is not None:
            progress(ScanProgress(f"unmasked_{phase}", step, total, losses, ratio))

    out: list[tuple[ProbeResult, dict[str, Any] | None]] = []
    for r in run_probes(model, images, cfg, progress=emit, cancel=cancel):
        rig = None
        if r.variance_ratio <= rigidity_below:
            rig = probe_rigidity(model, images, cfg, r.family, r.collapse_point, r.transform, progress=emit,
                                 cancel=cancel)
        out.append((r, rig))
    return out


def _stored_probes(stored: dict[str, Any]) -> ProbeConfig:
    """The scan's probe settings from its report's ``config["probes"]``."""
    known = {f.name for f in dataclasses.fields(ProbeConfig)}
    return ProbeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known})


def extra_probes(
    model: nn.Module,
    images: torch.Tensor,
    report: ScanReport,
    config: MitigationConfig,
    *,
    progress: Callable[[ScanProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[ProbeResult]:
    """The deciding probe family fitted ``config.extra_seeds`` more times on ``images`` (other seeds,
    ``config.extra_steps`` steps), keeping each fit that collapses the outputs to at most ``config.extra_max_ratio``
    at a point ``config.extra_min_distance`` benign output stds or more from the deciding probe's collapse point and
    from every fit kept before it: other triggers of the same backdoor (``MitigationConfig.extra_seeds``). Empty
    when off, after a benign verdict, or when no probe decided."""
    family = deciding_family(report.decision)
    stored = report.config.get("probes")
    first = next((p for p in report.probe_results if p.family == family), None)
    if config.extra_seeds < 1 or report.verdict != BACKDOORED or not stored or first is None:
        return []
    base = _stored_probes(stored)
    with torch.no_grad():
        std = _predict(model.eval(), images).std(0).clamp_min(1e-6)
    points = [torch.tensor(first.collapse_point, device=std.device)]

    def emit(phase: str, step: int, total: int, losses: dict[str, float], ratio: float | None) -> None:
        if progress is not None:
            progress(ScanProgress(f"extra_{phase}", step, total, losses, ratio))

    kept: list[ProbeResult] = []
    for k in range(1, config.extra_seeds + 1):
        cfg = base.replace(families=(family,), seed=base.seed + k, steps=config.extra_steps)
        (r,) = run_probes(model, images, cfg, progress=emit, cancel=cancel)
        point = torch.tensor(r.collapse_point, device=std.device)
        far = all(float((((point - q) / std) ** 2).mean().sqrt()) >= config.extra_min_distance for q in points)
        if r.variance_ratio <= config.extra_max_ratio and far and r.transform is not None:
            kept.append(r)
            points.append(point)
    return kept


def unmasked_triggers(unmasked: Sequence[tuple[ProbeResult, dict[str, Any] | None]]) -> dict[str, dict[str, Any]]:
    """``{"probe_<family>_unmasked": {"variance_ratio": r, "rigidity": rho or None}}`` for
    :func:`unmasked_probes`' results (the names and fields of ``MitigationReport.probe_triggers``)."""
    return {f"probe_{p.family}_unmasked": {"variance_ratio": float(p.variance_ratio),
                                           "rigidity": float(rig["rigidity"]) if rig else None} for p, rig in unmasked}


def found_triggers(probe_triggers: dict[str, dict[str, Any]] | None, max_ratio: float,
                   rigidity_threshold: float) -> list[str]:
    """The unmasked probe triggers (:func:`unmasked_triggers`) that collapse the outputs: variance ratio at most
    ``max_ratio`` and collapse-point rigidity at least ``rigidity_threshold`` (the scan's; none count when it is 0,
    the scan's rigidity check switched off)."""
    if rigidity_threshold <= 0:
        return []
    return [name for name, t in (probe_triggers or {}).items()
            if name.endswith("_unmasked") and float(t.get("variance_ratio", 1.0)) <= max_ratio
            and float(t.get("rigidity") or 0.0) >= rigidity_threshold]


def repeat_config(config: MitigationConfig, mitigation: MitigationReport) -> MitigationConfig:
    """The settings that repeat ``mitigation``'s recipe (on a cross-validation fold): with the unmasked probes
    where it was mitigated again with them (:attr:`MitigationReport.escalated`), without the check either way, so a
    fold's cost is the cost of the repair that is served."""
    above = 0.0 if mitigation.escalated else config.unmasked_above
    return dataclasses.replace(config, unmasked_above=above, unmasked_check=False)


def _reversed_inputs(
    report: ScanReport, model: nn.Module, probe_triggers: str = "decisive",
    unmasked: Sequence[tuple[ProbeResult, dict[str, Any] | None]] = (), extra: Sequence[ProbeResult] = (),
) -> list[tuple[str, Callable, nn.Module | None, dict[str, float | None] | None]]:
    """The transformations that reproduce the reversed trigger on new images (G with MTR, best probe, the unmasked
    probes below the probe threshold), each with the probe module behind it (``None`` for the generator) and, for
    a probe, its variance ratio and rigidity (``None`` for the generator)."""
    out: list[tuple[str, Callable, nn.Module | None, dict[str, float | None] | None]] = []
    rev = report.reverse
    if rev is not None:
        from .defenses.drmguard import attention_maps

        cfg = DRMGuardConfig(**{k: v for k, v in report.config["drmguard"].items()})
        g = rev.generator.eval()

        def gen_fn(x: torch.Tensor, g: nn.Module = g, cfg: DRMGuardConfig = cfg) -> torch.Tensor:
            with torch.no_grad():
                y = g(x)
            if cfg.use_mtr:
                t = attention_maps(model, x, cfg)
                return y * (1 - t) + x * t
            return y

        out.append(("drmguard", gen_fn, None, None))
    thr = float(report.config.get("probe_threshold", 0.05))
    rigidities = {d["family"]: d["rigidity"]["rigidity"] for d in report.probes if d.get("rigidity")}
    chosen: list[tuple[str, ProbeResult, float | None]] = []
    if report.probe_results:
        ranked = sorted(report.probe_results, key=lambda p: p.variance_ratio)
        picked = ranked[:1]
        if probe_triggers == "flagged":
            picked = [p for p in ranked if p.variance_ratio < thr] or picked
        chosen += [(f"probe_{p.family}", p, rigidities.get(p.family)) for p in picked]
    info = unmasked_triggers(unmasked)
    chosen += [(name, p, info[name]["rigidity"]) for name, (p, _) in zip(info, unmasked, strict=True)
               if p.variance_ratio < thr]
    chosen += [(f"probe_{p.family}_extra{i + 1}", p, None) for i, p in enumerate(extra)]
    for name, p, rig in chosen:
        if p.transform is None:
            continue

        def probe_fn(x: torch.Tensor, tr: nn.Module = p.transform) -> torch.Tensor:
            with torch.no_grad():
                return tr(x)

        out.append((name, probe_fn, p.transform, {"variance_ratio": float(p.variance_ratio), "rigidity": rig}))
    return out


def mitigate(
    model: nn.Module,
    benign: BenignSet,
    task: Task | str,
    *,
    report: ScanReport | None = None,
    config: MitigationConfig | None = None,
    scan_config: ScanConfig | str | None = None,
    holdout: BenignSet | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[ScanProgress], None] | None = None,
    cancel: threading.Event | None = None,
    extra: Sequence[ProbeResult] | None = None,
) -> tuple[nn.Module, MitigationReport]:
    """Unlearns the reversed backdoor: fine-tunes all of f with L1 on D_be (true labels) + D_rp (reversed inputs
    with the *true* labels). ``benign`` must carry labels. ``holdout`` (labels too) measures clean error before
    and after and is never trained on (defaults to D_be itself). Where a probe decided the verdict with a ratio
    above ``config.unmasked_above``, :func:`unmasked_probes` are fitted on ``benign`` and join D_rp; otherwise,
    with ``config.unmasked_check``, they are fitted on the mitigated model, and where one still collapses it the
    model is mitigated again, from ``model`` as it was, with them in D_rp (``MitigationReport.escalated``).
    ``extra``: the deciding family's other triggers, from :func:`extra_probes` (None: searched here when
    ``config.extra_seeds`` asks for it), so that a caller mitigating several subsets searches once."""
    task = Task.parse(task)
    cfg = mitigation_config(config, report)
    if benign.labels is None:
        raise DataError("mitigation needs labels in the benign set ('labels', (N, d) in degrees)")
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = model.to(dev)
    if report is None or report.reverse is None:
        report = scan(model, benign, task, scan_config, device=dev, progress=progress, cancel=cancel)
    x_tr = benign.images.to(dev)
    hold = holdout if holdout is not None else benign
    if hold.labels is None:
        raise DataError("the mitigation hold-out set needs labels")
    run = _Unlearning(task, cfg, report, x_tr, benign.labels.to(dev), hold.images.to(dev), hold.labels.to(dev), dev,
                      progress, cancel)
    unmasked = unmasked_probes(model.eval(), x_tr, report, cfg.unmasked_families, when_above=cfg.unmasked_above,
                               rigidity_below=cfg.unmasked_rigidity_below, progress=progress, cancel=cancel)
    rigid = float(report.config.get("rigidity_threshold") or 0.0)
    check = (cfg.unmasked_check and not unmasked and rigid > 0 and bool(cfg.unmasked_families)
             and needs_unmasked(report, -1.0))
    submitted = copy.deepcopy(model) if check else None
    if extra is None:
        extra = extra_probes(model, x_tr, report, cfg, progress=progress, cancel=cancel)
    mrep = run.unlearn(model, unmasked, extra)
    found: dict[str, dict[str, Any]] = {}
    escalated = False
    if submitted is not None:
        found = unmasked_triggers(unmasked_probes(
            model.eval(), x_tr, report, cfg.unmasked_families, when_above=-1.0,
            rigidity_below=cfg.unmasked_rigidity_below, progress=progress, cancel=cancel))
        if found_triggers(found, cfg.unmasked_rigidity_below, rigid):
            escalated = True
            model = submitted
            unmasked = unmasked_probes(model.eval(), x_tr, report, cfg.unmasked_families, when_above=-1.0,
                                       rigidity_below=cfg.unmasked_rigidity_below, progress=progress, cancel=cancel)
            mrep = run.unlearn(model, unmasked, extra)
    return model, dataclasses.replace(mrep, seconds=time.perf_counter() - t0, unmasked_check=found,
                                      escalated=escalated)


class _Unlearning:
    """One fine-tuning of a model on D_be + D_rp (the body of :func:`mitigate`, run again when it escalates)."""

    def __init__(self, task: Task, cfg: MitigationConfig, report: ScanReport, x_tr: torch.Tensor, labels: torch.Tensor,
                 x_ho: torch.Tensor, y_ho: torch.Tensor, dev: torch.device,
                 progress: Callable[[ScanProgress], None] | None, cancel: threading.Event | None) -> None:
        self.task, self.cfg, self.scan_report, self.dev = task, cfg, report, dev
        self.x_tr, self.labels, self.x_ho, self.y_ho = x_tr, labels, x_ho, y_ho
        self.progress, self.cancel = progress, cancel

    def unlearn(self, model: nn.Module, unmasked: Sequence[tuple[ProbeResult, dict[str, Any] | None]],
                extra: Sequence[ProbeResult] = ()) -> MitigationReport:
        """Fine-tunes ``model`` in place and reports it (the seconds of this fine-tuning only)."""
        task, cfg, report, dev = self.task, self.cfg, self.scan_report, self.dev
        x_tr, y_tr, x_ho, y_ho = self.x_tr, self.labels, self.x_ho, self.y_ho
        progress, cancel = self.progress, self.cancel
        t0 = time.perf_counter()
        transforms = _reversed_inputs(report, model.eval(), cfg.probe_triggers, unmasked, extra)
        if not transforms:
            raise ConfigError("the scan report carries no reversed trigger to unlearn")
        # the transformation that decided the verdict measures the reversed-trigger errors; all of them build D_rp
        decisive = next((t for t in transforms if "probe" in report.decision and t[0].startswith("probe")),
                        transforms[0])
        name, fn, _, _ = decisive

        def apply_all(x: torch.Tensor, fn: Callable = fn) -> torch.Tensor:
            return torch.cat([fn(x[i : i + 128]) for i in range(0, x.shape[0], 128)])

        target = torch.tensor(report.estimated_target, device=dev)[None]

        def errors() -> tuple[float, float, float]:
            model.eval()
            with torch.no_grad():
                clean = regression_error(task, _predict(model, x_ho), y_ho)
                xp = apply_all(x_ho)
                out_p = _predict(model, xp)
                return clean, regression_error(task, out_p, y_ho), regression_error(task, out_p, target)

        # D_rp is built once, from the scan's generator as it was (before fine-tuning changes the attention map)
        if cfg.targets == "teacher":
            model.eval()
            with torch.no_grad():
                y_tr = _predict(model, x_tr).detach()
        x_rp = torch.cat([apply_all(x_tr, f) for _, f, _, _ in transforms]).detach()
        y_rp = y_tr.repeat(len(transforms), 1)
        before = errors()
        # refreshed probes are copies: the report's own triggers (and the before/after measurement) stay as scanned
        refreshable = [(k, copy.deepcopy(m)) for k, (_, _, m, _) in enumerate(transforms) if m is not None]
        gen = torch.Generator().manual_seed(cfg.seed)
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        half = max(1, cfg.batch_size // 2)
        n = x_tr.shape[0]
        # eval mode: BatchNorm keeps its running statistics (imported ONNX models usually have BN folded anyway)
        model.eval()
        for step in range(cfg.steps):
            if cancel is not None and cancel.is_set():
                raise CancelledError("mitigation cancelled")
            if cfg.refresh_every and step and step % cfg.refresh_every == 0:
                for k, probe in refreshable:
                    _refit_probe(model, probe, x_tr, cfg.refresh_steps, gen)
                    x_rp[k * n : (k + 1) * n] = apply_all(x_tr, lambda x, pr=probe: _no_grad(pr, x))
            i = torch.randperm(n, generator=gen)[:half].to(dev)
            j = torch.randperm(x_rp.shape[0], generator=gen)[:half].to(dev)
            xb = torch.cat([x_tr[i], x_rp[j]])
            yb = torch.cat([y_tr[i], y_rp[j]])
            nb_on = cfg.neighbourhood_sigma > 0 and refreshable
            n_nb = int(round(cfg.neighbourhood_share * j.numel())) if nb_on else 0
            if n_nb:
                _, probe = refreshable[int(torch.randint(len(refreshable), (1,), generator=gen))]
                k = torch.randperm(n, generator=gen)[:n_nb].to(dev)
                off = i.numel()  # the D_rp part of the batch starts here
                xb[off : off + k.numel()] = _neighbour(probe, cfg.neighbourhood_sigma, gen)(x_tr[k])
                yb[off : off + k.numel()] = y_tr[k]
            loss = (model(xb) - yb).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None and (step % 10 == 0 or step == cfg.steps - 1):
                progress(ScanProgress("mitigate", step + 1, cfg.steps, {"l1": float(loss.detach())}, None))
        for p in params:
            p.requires_grad_(False)
        model.eval()
        after = errors()
        return MitigationReport(
            clean_error_before=before[0],
            clean_error_after=after[0],
            reversed_error_before=before[1],
            reversed_error_after=after[1],
            target_error_before=before[2],
            target_error_after=after[2],
            holdout_size=int(x_ho.shape[0]),
            train_size=int(n),
            steps=cfg.steps,
            seconds=time.perf_counter() - t0,
            triggers=[t[0] for t in transforms],
            targets=cfg.targets,
            probe_triggers={t[0]: t[3] for t in transforms if t[3] is not None},
        )


def _neighbour(probe: nn.Module, sigma: float, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of ``probe`` with every parameter moved by N(0, sigma^2) (its pre-activation space), applied without
    gradients."""
    near = copy.deepcopy(probe)
    with torch.no_grad():
        for prm in near.parameters():
            prm.add_(sigma * torch.randn(prm.shape, generator=gen).to(prm.device))
    return lambda x: _no_grad(near, x)


def _no_grad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _refit_probe(model: nn.Module, probe: nn.Module, images: torch.Tensor, steps: int, gen: torch.Generator,
                 batch: int = 50, lr: float = 0.05) -> None:
    """A few more steps of the scan's probe objective (mean relative output variance) against ``model`` as it is
    now; only the probe's parameters move."""
    with torch.no_grad():
        var0 = _predict(model, images).var(0, unbiased=False).clamp_min(1e-12)
    params = [p for p in probe.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    bs = min(batch, images.shape[0])
    for _ in range(steps):
        idx = torch.randperm(images.shape[0], generator=gen)[:bs].to(images.device)
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            loss = (model(probe(images[idx])).var(0, unbiased=False) / var0).mean()
            grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    for p in params:
        p.requires_grad_(False)


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i : i + 256]) for i in range(0, x.shape[0], 256)])


__all__ = [
    "BACKDOORED",
    "BENIGN",
    "MitigationConfig",
    "MitigationReport",
    "mitigation_config",
    "ScanConfig",
    "ScanProgress",
    "ScanReport",
    "decide",
    "deciding_family",
    "extra_probes",
    "found_triggers",
    "get_profile",
    "list_profiles",
    "mitigate",
    "needs_unmasked",
    "perturbation_ratio",
    "repeat_config",
    "scan",
    "unmasked_probes",
    "unmasked_triggers",
]
