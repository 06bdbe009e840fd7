"""Defenses by name, with one interface for DRMGuard and the baselines (``docs/baselines.md``).

``list_defenses()`` -> names; ``get_defense(name)`` -> a :class:`Defense` with ``detect`` and/or ``mitigate``:

* ``detect(model, benign, task, *, config=None, device="cpu", progress=None, cancel=None) -> DefenseReport``
* ``mitigate(model, benign, task, *, holdout=None, config=None, device="cpu", progress=None, cancel=None)
  -> (model, DefenseMitigationReport)``; the returned model is a modified copy in eval mode, the input
  model is left as it was.

``drmguard`` adapts :func:`drmguard_engine.scan.scan` and :func:`drmguard_engine.scan.mitigate`.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.benign import BenignSet
from ..errors import ConfigError
from ..tasks import Task
from .baselines import (
    ANPConfig,
    DefenseMitigationReport,
    DefenseReport,
    FeatureREConfig,
    FinePruningConfig,
    FineTuningConfig,
    NeuralCleanseConfig,
    Progress,
    _jsonable,
    anp_mitigate,
    featurere_detect,
    fine_pruning_mitigate,
    fine_tuning_mitigate,
    neural_cleanse_detect,
)

DETECTION = "detection"
MITIGATION = "mitigation"


@dataclass(frozen=True)
class Defense:
    """A registered defense: ``detect``/``mitigate`` are None where it does not do that."""

    name: str
    description: str
    detect: Callable[..., DefenseReport] | None = None
    mitigate: Callable[..., tuple[nn.Module, DefenseMitigationReport]] | None = None
    config_class: type | None = None

    @property
    def kinds(self) -> list[str]:
        return [k for k, f in ((DETECTION, self.detect), (MITIGATION, self.mitigate)) if f is not None]


# -------------------------------------------------------------------------------- DRMGuard adapter


def _drmguard_detect(
    model: nn.Module,
    benign: BenignSet,
    task: Task | str,
    *,
    config: Any = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> DefenseReport:
    """``scan.scan``; ``config`` is a profile name or a ``ScanConfig`` (None = the default profile)."""
    from ..scan import scan

    rep = scan(model, benign, task, config, device=device, progress=progress, cancel=cancel)
    d = rep.to_dict()
    return DefenseReport(
        defense="drmguard",
        verdict=rep.verdict,
        score=rep.score,
        score_threshold=rep.score_threshold,
        decision=rep.decision,
        estimated_target=list(rep.estimated_target),
        seconds=rep.seconds,
        details={
            k: d[k]
            for k in (
                "profile",
                "perturbation_ratio",
                "threshold",
                "output_variance_ratio",
                "rav",
                "rnv",
                "probes",
                "drmguard_target",
                "timings",
                "steps",
                "n_benign",
            )
            if k in d
        },
    )


def _drmguard_mitigate(
    model: nn.Module,
    benign: BenignSet,
    task: Task | str,
    *,
    holdout: BenignSet | None = None,
    config: Any = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> tuple[nn.Module, DefenseMitigationReport]:
    """``scan.mitigate`` on a copy. ``config``: a ``MitigationConfig``, or a dict with optional keys
    ``mitigation`` (``MitigationConfig`` or dict of its fields) and ``scan`` (profile name or
    ``ScanConfig``)."""
    from ..scan import MitigationConfig, mitigate

    t0 = time.perf_counter()
    mcfg: Any = None
    scfg: Any = None
    if isinstance(config, MitigationConfig):
        mcfg = config
    elif isinstance(config, dict):
        bad = sorted(set(config) - {"mitigation", "scan"})
        if bad:
            raise ConfigError(f"drmguard mitigation config takes 'mitigation' and 'scan', not {bad}")
        mcfg = config.get("mitigation")
        if isinstance(mcfg, dict):
            mcfg = MitigationConfig(**mcfg)
        scfg = config.get("scan")
    elif config is not None:
        raise ConfigError(
            f"drmguard mitigation config must be a MitigationConfig or a dict, got {type(config)}"
        )
    model = copy.deepcopy(model)
    model, rep = mitigate(
        model,
        benign,
        task,
        config=mcfg,
        scan_config=scfg,
        holdout=holdout,
        device=device,
        progress=progress,
        cancel=cancel,
    )
    d = rep.to_dict()
    return model.eval(), DefenseMitigationReport(
        defense="drmguard",
        clean_error_before=rep.clean_error_before,
        clean_error_after=rep.clean_error_after,
        seconds=time.perf_counter() - t0,
        details={k: v for k, v in d.items() if k not in ("clean_error_before", "clean_error_after")},
    )


# -------------------------------------------------------------------------------- the registry


_DEFENSES: dict[str, Defense] = {
    d.name: d
    for d in (
        Defense(
            "drmguard",
            "DRMGuard (Du et al.): scan.scan / scan.mitigate",
            _drmguard_detect,
            _drmguard_mitigate,
        ),
        Defense(
            "neural_cleanse",
            "Neural Cleanse generalised to regression (paper eq. 8)",
            detect=neural_cleanse_detect,
            config_class=NeuralCleanseConfig,
        ),
        Defense(
            "featurere",
            "FeatureRE generalised to regression (paper eq. 9), penultimate-feature mask",
            detect=featurere_detect,
            config_class=FeatureREConfig,
        ),
        Defense(
            "anp",
            "Adversarial Neuron Pruning (Wu & Wang 2021) with L1 loss",
            mitigate=anp_mitigate,
            config_class=ANPConfig,
        ),
        Defense(
            "fine_pruning",
            "Fine-pruning (Liu et al. 2018): last conv layer, then fine-tuning",
            mitigate=fine_pruning_mitigate,
            config_class=FinePruningConfig,
        ),
        Defense(
            "fine_tuning",
            "Fine-tuning on D_be only (DRMGuard's mitigation budget)",
            mitigate=fine_tuning_mitigate,
            config_class=FineTuningConfig,
        ),
    )
}
_ALIASES = {
    "nc": "neural_cleanse",
    "neuralcleanse": "neural_cleanse",
    "feature_re": "featurere",
    "fp": "fine_pruning",
    "finepruning": "fine_pruning",
    "ft": "fine_tuning",
    "finetuning": "fine_tuning",
}


def list_defenses(kind: str | None = None) -> list[str]:
    """Registered names (sorted); ``kind`` ``"detection"`` or ``"mitigation"`` filters."""
    if kind not in (None, DETECTION, MITIGATION):
        raise ConfigError(f"kind must be {DETECTION!r} or {MITIGATION!r}, got {kind!r}")
    return sorted(n for n, d in _DEFENSES.items() if kind is None or kind in d.kinds)


def get_defense(name: str) -> Defense:
    """The defense called ``name`` (case, ``-``/``_`` and the aliases nc/fp/ft are accepted)."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _DEFENSES:
        raise ConfigError(f"unknown defense {name!r}; choose one of {', '.join(list_defenses())}")
    return _DEFENSES[key]


# -------------------------------------------------------------------------------- CLI hook


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``drmguard-engine baseline`` (registered by cli.py's owner)."""
    p.add_argument("--defense", required=True, help=f"one of {', '.join(list_defenses())}")
    p.add_argument("--model", required=True, help="the ONNX regression model (read as data, never executed)")
    p.add_argument("--benign", required=True, help="D_be .npz (images; labels needed for mitigation)")
    p.add_argument("--task", required=True, choices=["gaze", "headpose"],
                   help="gaze (2 outputs: pitch, yaw) or headpose (3 outputs: yaw, pitch, roll), degrees")
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--out", default=None, help="mitigation: where to write the mitigated ONNX model")
    p.add_argument("--holdout", default=None, help="mitigation: labelled .npz to measure clean error on")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="override a config field of the defense, e.g. --set steps=100",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one defense from CLI arguments; writes ``--report`` (and ``--out``) and returns the report dict.

    Mitigation defenses run their mitigation; detection-only ones their detection; for ``drmguard`` ``--out``
    selects mitigation, else detection.
    """
    from pathlib import Path

    from ..cli import parse_overrides
    from ..data.benign import load_benign_npz
    from ..onnx_io import export_onnx, load_onnx_model

    defense = get_defense(args.defense)
    task = Task.parse(args.task)
    overrides = parse_overrides(args.set)
    model = load_onnx_model(args.model)
    c, h, w = (int(s) for s in model.input_shape)
    do_mitigate = defense.mitigate is not None and (defense.detect is None or args.out is not None)
    benign = load_benign_npz(args.benign, task=task, require_labels=do_mitigate, channels=c, size=(h, w))
    config: Any = overrides or None
    if defense.name == "drmguard" and overrides:
        config = {"mitigation": overrides} if do_mitigate else None
    if do_mitigate:
        holdout = (
            load_benign_npz(args.holdout, task=task, require_labels=True, channels=c, size=(h, w))
            if args.holdout
            else None
        )
        assert defense.mitigate is not None
        out_model, rep = defense.mitigate(
            model, benign, task, holdout=holdout, config=config, device=args.device
        )
        result = rep.to_dict()
        if args.out:
            export_onnx(out_model.cpu(), args.out)
            result["out"] = str(args.out)
    else:
        assert defense.detect is not None
        result = defense.detect(model, benign, task, config=config, device=args.device).to_dict()
    result = _jsonable(result)
    Path(args.report).write_text(json.dumps(result, sort_keys=True, allow_nan=False, indent=1))
    return {
        k: result[k]
        for k in ("defense", "verdict", "score", "clean_error_before", "clean_error_after", "seconds")
        if k in result
    }


__all__ = [
    "DETECTION",
    "MITIGATION",
    "Defense",
    "add_cli_arguments",
    "get_defense",
    "list_defenses",
    "run_cli",
]
