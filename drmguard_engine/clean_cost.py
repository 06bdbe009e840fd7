"""What a mitigation costs in clean error, estimated by K-fold cross-validation over the benign set.

The service serves a mitigated model only if its clean error rose by at most a tolerance (10% by default). A single
hold-out split measures that rise on the few images kept back (80 of a 400-image D_be), and its noise is about the
size of the tolerance: on the zoo, five of eleven repairs that removed their backdoors read +10-13% on their 80
held-back images while they lost only 2-7% on a 500-image test set (docs/scan.md).

:func:`cross_validated_cost` measures the rise on *every* benign image instead. D_be is cut into ``folds`` parts;
for each part, the submitted model is mitigated on the other parts and its error is measured on that part, which
it never saw. The estimate pools the per-image errors of all parts:

    before = mean_i e(f, x_i),   after = mean_i e(f_k(i), x_i),   rise = after / before - 1

where f_k(i) is the model mitigated without image i's part. This is the standard cross-validated estimate of what
the *procedure* costs; the model that is served is then mitigated on all of D_be (more data, so its own cost is at
most about the same: the estimate errs on the side of rejecting). The 95% interval comes from a paired bootstrap
over the images.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .data.benign import BenignSet
from .errors import ConfigError, DataError
from .parallel import one_at_a_time, run_side_by_side
from .defenses.probes import ProbeResult
from .scan import MitigationConfig, ScanProgress, ScanReport, _predict, extra_probes, mitigate, mitigation_config
from .tasks import Task, per_sample_error


@dataclass
class CleanCost:
    """The cross-validated clean error of a mitigation, in degrees, over ``n`` labelled benign images."""

    before: float  # the submitted model's mean error
    after: float  # the mean error of the fold models, each on the images it was not mitigated on
    n: int
    folds: int
    rise_low: float  # 95% paired-bootstrap interval of the relative rise
    rise_high: float
    fold_rises: list[float] = field(default_factory=list)  # each fold's own relative rise (its spread, for a person)
    seconds: float = 0.0

    @property
    def rise(self) -> float:
        return (self.after - self.before) / max(self.before, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rise"] = self.rise
        return d


def _errors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return per_sample_error(task, _predict(model, images), labels).double().cpu()


def bootstrap_rise(before: torch.Tensor, after: torch.Tensor, *, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """95% interval of ``sum(after) / sum(before) - 1`` under a paired bootstrap over the images."""
    n = before.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (draws, n), generator=gen)
    ratios = after.double()[idx].sum(1) / before.double()[idx].sum(1).clamp_min(1e-12) - 1.0
    lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def fold_indices(n: int, folds: int, seed: int) -> list[torch.Tensor]:
    """``folds`` disjoint parts of ``range(n)`` (a seeded permutation, cut as evenly as it goes)."""
    if not 2 <= folds <= n:
        raise ConfigError(f"cross-validation needs 2 <= folds <= the number of benign images ({n}), got {folds}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in perm.tensor_split(folds)]


def cross_validated_cost(
    model: nn.Module,
    benign: BenignSet,
    task: Task | str,
    *,
    report: ScanReport,
    config: MitigationConfig | None = None,
    folds: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[ScanProgress], None] | None = None,
    cancel: Any = None,
    workers: int = 1,
    extra: Sequence[ProbeResult] | None = None,
) -> CleanCost:
    """Mitigates a copy of ``model`` ``folds`` times, each on all of ``benign`` but one part, and measures each copy
    on the part it left out (module docstring). ``model`` itself is not changed. ``report`` is the scan's, as for
    :func:`mitigate`; ``progress`` sees phase ``"cost k/K"`` (from several threads in turn when ``workers`` > 1;
    one call at a time).

    ``workers`` > 1 runs that many folds side by side in threads, on the CPU only
    (:func:`drmguard_engine.parallel.side_by_side` says how many the cores hold; each thread runs torch with the
    caller's thread count). Every fold mitigates its own copy with its own
    seeded generator, so the result does not depend on ``workers`` (tested: the same numbers to the last bit with
    one torch thread). The deciding family's other triggers (:func:`drmguard_engine.scan.extra_probes`, where
    ``config.extra_seeds`` asks for them) are searched once on the whole set, or taken from ``extra``, and every
    fold unlearns them, as the scan's own triggers (also fitted on the whole set)."""
    task = Task.parse(task)
    if benign.labels is None:
        raise DataError("the clean-error estimate needs labels in the benign set ('labels', (N, d) in degrees)")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    n = len(benign)
    parts = fold_indices(n, folds, seed)
    dev = torch.device(device)
    images, labels = benign.images.to(dev), benign.labels.to(dev)
    before = _errors(model.to(dev), images, labels, task)
    if extra is None:
        extra = extra_probes(copy.deepcopy(model), images, report, mitigation_config(config, report), cancel=cancel)
    after = torch.empty_like(before)
    fold_rises = [0.0] * len(parts)
    relay_to = one_at_a_time(progress)

    def one(k: int, stop: Any) -> None:
        part = parts[k]
        keep = torch.ones(n, dtype=torch.bool)
        keep[part] = False
        label = f"cost {k + 1}/{len(parts)}"

        def relay(p: ScanProgress) -> None:
            if relay_to is not None:
                relay_to(ScanProgress(label, p.step, p.total, p.losses, p.perturbation_ratio, p.message))

        fixed, _ = mitigate(copy.deepcopy(model), benign.subset(keep.nonzero().flatten()), task, report=report,
                            config=config, holdout=benign.subset(part), device=dev, progress=relay, cancel=stop,
                            extra=extra)
        after[part] = _errors(fixed, images[part.to(dev)], labels[part.to(dev)], task)
        fold_rises[k] = float(after[part].sum() / before[part].sum().clamp_min(1e-12) - 1.0)

    run_side_by_side([functools.partial(one, k) for k in range(len(parts))],
                     workers if dev.type == "cpu" else 1, cancel)
    lo, hi = bootstrap_rise(before, after, seed=seed)
    return CleanCost(before=float(before.mean()), after=float(after.mean()), n=n, folds=len(parts), rise_low=lo,
                     rise_high=hi, fold_rises=fold_rises, seconds=time.perf_counter() - t0)


__all__ = ["CleanCost", "bootstrap_rise", "cross_validated_cost", "fold_indices"]
