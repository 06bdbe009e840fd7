"""Baseline defenses (Neural Cleanse, FeatureRE, ANP, Fine-pruning, Fine-tuning) and the defense registry.

The trained pair is a ResNet-18 x0.25 at 32 px (the smallest input it takes), 300 steps each on 1,000
synthetic images: a clean model and a BadNets model with a 4 px patch and 20% poisoning (measured AE 0.84 deg
vs 25 deg for the clean model). The 3-conv ``tiny`` net at 24 px trained this briefly barely regresses (output
spread 2.6 deg), so any mask collapses it; ResNet-18 at 32 px gives real models in ~9 s each on one thread.
The ONNX checks use an untrained ``tiny`` model at 16 px: they test the plumbing, not the outcomes.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import threading

import numpy as np
import pytest
import torch
from torch import nn

from drmguard_engine.attacks import get_attack
from drmguard_engine.data.benign import BenignSet
from drmguard_engine.data.synthetic import make_dataset
from drmguard_engine.defenses.baselines import (
    DefenseMitigationReport,
    DefenseReport,
    NeuralCleanseConfig,
    neural_cleanse_detect,
)
from drmguard_engine.defenses.registry import add_cli_arguments, get_defense, list_defenses, run_cli
from drmguard_engine.errors import CancelledError, ConfigError, UnsupportedModelError
from drmguard_engine.models import build_model
from drmguard_engine.onnx_io import export_onnx, load_onnx_model
from drmguard_engine.scan import MitigationConfig, get_profile
from drmguard_engine.training import train

pytestmark = pytest.mark.heavy(130)

TASK = "gaze"
SIZE = 32


def _set(x: np.ndarray, y: np.ndarray) -> BenignSet:
    return BenignSet(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y))


@functools.lru_cache(maxsize=1)
def _pair() -> tuple[nn.Module, nn.Module, object, BenignSet, BenignSet]:
    xtr, ytr = make_dataset(TASK, 1000, size=SIZE, seed=0)

    def fit(seed: int, attack: object = None) -> nn.Module:
        model = build_model("resnet18", TASK, input_size=SIZE, width=0.25, seed=seed)
        return train(model, xtr, ytr, task=TASK, steps=300, lr=3e-3, batch_size=64, seed=seed, attack=attack)

    clean = fit(0)
    attack = get_attack(
        "badnets", task=TASK, image_shape=(3, SIZE, SIZE), seed=0, poison_rate=0.2, patch_size=4
    )
    bd = fit(1, attack)
    benign = _set(*make_dataset(TASK, 100, size=SIZE, seed=1))
    holdout = _set(*make_dataset(TASK, 100, size=SIZE, seed=3))
    return clean.eval(), bd.eval(), attack, benign, holdout


@functools.lru_cache(maxsize=1)
def _tiny() -> tuple[nn.Module, nn.Module, BenignSet]:
    model = build_model("tiny", TASK, input_size=16, width=0.5, seed=0).eval()
    imported = load_onnx_model(export_onnx(model))
    return model, imported, _set(*make_dataset(TASK, 24, size=16, seed=5))


def _json(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


# -------------------------------------------------------------------------------- registry


def test_registry_lists_all_six_defenses_with_their_kinds() -> None:
    assert list_defenses() == [
        "anp",
        "drmguard",
        "featurere",
        "fine_pruning",
        "fine_tuning",
        "neural_cleanse",
    ]
    assert list_defenses("detection") == ["drmguard", "featurere", "neural_cleanse"]
    assert list_defenses("mitigation") == ["anp", "drmguard", "fine_pruning", "fine_tuning"]
    assert get_defense("NC").name == "neural_cleanse"
    assert get_defense("fine-pruning").name == "fine_pruning"
    with pytest.raises(ConfigError, match="unknown defense 'strip'"):
        get_defense("strip")
    with pytest.raises(ConfigError, match="unknown NeuralCleanseConfig option"):
        neural_cleanse_detect(_tiny()[0], _tiny()[2], TASK, config={"stepz": 3})


# -------------------------------------------------------------------------------- outcomes


def test_neural_cleanse_reverses_a_smaller_mask_on_the_backdoored_model() -> None:
    clean, bd, attack, benign, _ = _pair()
    cfg = NeuralCleanseConfig(steps=200, batch_size=16, restarts=3)
    before = _state(bd)
    r_clean = neural_cleanse_detect(clean, benign, TASK, config=cfg)
    r_bd = neural_cleanse_detect(bd, benign, TASK, config=cfg)
    assert r_clean.details["success"] and r_bd.details["success"]
    # measured: 0.0197 (clean) vs 0.0122 (backdoored) at this seed, 1.5-2.5x apart over seeds 0-3, on one 2-core
    # box; 0.0155 vs 0.0144 on another CPU (AMD EPYC, 2026-11-26, same code and torch): on this tiny pair the gap
    # depends on the float summation order, so only its direction is asserted
    assert r_bd.details["mask_fraction"] < r_clean.details["mask_fraction"]
    assert r_bd.score > r_clean.score
    # the trainable y_T landed 1.0 deg from the backdoor's target on the first box, and 45 deg away on the second
    # (it found another small-mask shortcut there), so only its shape is asserted; the scan's own target estimate is
    # checked in test_scan_e2e.py
    assert len(r_bd.estimated_target) == attack.target.numel()
    assert r_bd.artifacts["mask"].shape == (SIZE, SIZE)
    # detection leaves the model as it was, gradients switched back on
    assert all(torch.equal(a, b) for a, b in zip(before, _state(bd), strict=True))
    assert all(p.requires_grad for p in bd.parameters())
    d = _json(r_bd.to_dict())
    assert d["defense"] == "neural_cleanse" and d["verdict"] in ("benign", "backdoored")
    assert "artifacts" not in d and len(d["details"]["runs"]) == 3


def test_fine_pruning_zeroes_channels_keeps_them_zero_and_the_model_runs() -> None:
    _, bd, _, benign, holdout = _pair()
    before = _state(bd)
    model, rep = get_defense("fine_pruning").mitigate(bd, benign, TASK, holdout=holdout, config={"steps": 30})
    assert isinstance(rep, DefenseMitigationReport)
    pruned = rep.details["pruned_channels"]
    assert rep.details["n_pruned"] == len(pruned) > 0
    # pruned feature channels no longer reach the head, after 30 fine-tuning steps too
    assert float(model.head.weight[:, pruned].abs().max()) == 0.0
    assert float(model.head.weight.abs().sum()) > 0
    assert rep.details["clean_error_search"] <= rep.clean_error_before * 1.1 + 1e-6
    out = model(holdout.images[:4])
    assert out.shape == (4, 2) and torch.isfinite(out).all() and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, _state(bd), strict=True)), "input model modified"
    _json(rep.to_dict())

    # last_conv: the last conv's weights and its BatchNorm's weight and bias are zero for pruned channels
    model2, rep2 = get_defense("fine_pruning").mitigate(
        bd, benign, TASK, holdout=holdout, config={"steps": 5, "layer": "last_conv"}
    )
    idx = rep2.details["pruned_channels"]
    assert rep2.details["layer"] == "backbone.layer4.1.conv2" and idx
    blk = model2.backbone.layer4[1]
    assert float(blk.conv2.weight[idx].abs().max()) == 0.0
    assert float(blk.bn2.weight[idx].abs().max()) == 0.0 and float(blk.bn2.bias[idx].abs().max()) == 0.0


def test_anp_prunes_to_zero_within_the_clean_error_tolerance() -> None:
    _, bd, _, benign, holdout = _pair()
    model, rep = get_defense("anp").mitigate(
        bd, benign, TASK, holdout=holdout, config={"steps": 40, "tolerance": 0.25}
    )
    d = rep.details
    assert d["unit_kind"] == "batchnorm" and d["layers"] == 20 and d["threshold"] is not None
    assert d["n_pruned"] > 0
    mods = dict(model.named_modules())
    for name, idx in d["pruned"].items():
        assert float(mods[name].weight[idx].abs().max()) == 0.0  # ANP zeroes the BN scale
    # measured: the 3 masks ANP drives to 0 in 40 steps already cost 11% (a 10% tolerance prunes nothing)
    assert rep.clean_error_after <= rep.clean_error_before * 1.25 + 1e-4
    # the permanent pruning reproduces the error the threshold search measured through hooks
    assert rep.clean_error_after == pytest.approx(d["clean_error_search"], rel=1e-4)
    _json(rep.to_dict())


# -------------------------------------------------------------------------------- ONNX + errors


_FAST = {
    "neural_cleanse": {"steps": 10, "restarts": 1},
    "featurere": {"steps": 5},
    "anp": {"steps": 5},
    "fine_pruning": {"steps": 3},
    "fine_tuning": {"steps": 3},
}


@pytest.mark.parametrize("name", sorted(_FAST))
def test_every_baseline_runs_on_an_imported_onnx_model(name: str) -> None:
    _, imported, benign = _tiny()
    d = get_defense(name)
    before = _state(imported)
    if d.detect is not None:
        rep = d.detect(imported, benign, TASK, config=_FAST[name])
        assert isinstance(rep, DefenseReport) and len(rep.estimated_target) == 2
    else:
        model, rep = d.mitigate(imported, benign, TASK, holdout=None, config=_FAST[name])
        assert model(benign.images[:2]).shape == (2, 2)
        if name == "anp":
            # the exporter folded BatchNorm into the convs: ANP acts on the conv output channels
            assert rep.details["unit_kind"] == "conv"
            mods = dict(model.named_modules())
            for step, idx in rep.details["pruned"].items():
                assert float(mods[step].c1[idx].abs().max()) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, _state(imported), strict=True))
    d = _json(rep.to_dict())
    assert d["defense"] == name and d["seconds"] > 0


def test_fine_pruning_last_conv_on_imported_model_zeroes_the_conv_weights_and_bias() -> None:
    _, imported, benign = _tiny()
    model, rep = get_defense("fine_pruning").mitigate(
        imported, benign, TASK, config={"steps": 3, "layer": "last_conv", "tolerance": 10.0}
    )
    idx = rep.details["pruned_channels"]
    assert rep.details["layer_kind"] == "conv" and idx
    step = dict(model.named_modules())[rep.details["layer"]]
    assert float(step.c1[idx].abs().max()) == 0.0 and float(step.c2[idx].abs().max()) == 0.0


class _MLP(nn.Module):
    """f = H(F(x)) with no conv and no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 16 * 16, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_defenses_name_what_a_model_lacks() -> None:
    benign = _tiny()[2]
    with pytest.raises(UnsupportedModelError, match="anp needs BatchNorm layers or Conv layers"):
        get_defense("anp").mitigate(_MLP(), benign, TASK, config={"steps": 1})
    with pytest.raises(UnsupportedModelError, match="fine_pruning .*needs a convolution layer"):
        get_defense("fine_pruning").mitigate(_MLP(), benign, TASK, config={"steps": 1, "layer": "last_conv"})
    bare = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 16 * 16, 2))
    with pytest.raises(UnsupportedModelError, match="featurere needs the model split"):
        get_defense("featurere").detect(bare, benign, TASK, config={"steps": 1})
    # Neural Cleanse needs only input gradients: it runs on any f
    rep = get_defense("neural_cleanse").detect(bare, benign, TASK, config={"steps": 2, "restarts": 1})
    assert rep.defense == "neural_cleanse"


def test_cancel_stops_a_defense() -> None:
    model, _, benign = _tiny()
    ev = threading.Event()
    ev.set()
    with pytest.raises(CancelledError):
        get_defense("neural_cleanse").detect(model, benign, TASK, cancel=ev)
    with pytest.raises(CancelledError):
        get_defense("anp").mitigate(model, benign, TASK, cancel=ev)


def test_drmguard_adapter_detects_and_mitigates_through_the_registry() -> None:
    model, _, benign = _tiny()
    scfg = get_profile("fast", TASK, steps=10, probe_steps=10)
    d = get_defense("drmguard")
    seen: list[str] = []
    rep = d.detect(model, benign, TASK, config=scfg, progress=lambda ev: seen.append(ev.phase))
    assert rep.defense == "drmguard" and "perturbation_ratio" in rep.details and "reverse" in seen
    _json(rep.to_dict())
    m2, mrep = d.mitigate(
        model, benign, TASK, holdout=benign, config={"scan": scfg, "mitigation": MitigationConfig(steps=3)}
    )
    assert mrep.details["steps"] == 3 and m2 is not model and not m2.training
    _json(mrep.to_dict())


def test_run_cli_writes_reports_and_a_loadable_mitigated_model(tmp_path) -> None:
    model, _, benign = _tiny()
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(export_onnx(model))
    buf = io.BytesIO()
    np.savez(buf, images=(benign.images.numpy() * 255).round().astype(np.uint8), labels=benign.labels.numpy())
    (tmp_path / "d.npz").write_bytes(buf.getvalue())
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    base = ["--model", str(onnx_path), "--benign", str(tmp_path / "d.npz"), "--task", TASK]
    out = run_cli(
        parser.parse_args(
            base
            + [
                "--defense",
                "fine_tuning",
                "--report",
                str(tmp_path / "ft.json"),
                "--out",
                str(tmp_path / "ft.onnx"),
                "--set",
                "steps=3",
            ]
        )
    )
    assert out["defense"] == "fine_tuning"
    rep = json.loads((tmp_path / "ft.json").read_text())
    assert rep["details"]["steps"] == 3 and rep["out"].endswith("ft.onnx")
    assert load_onnx_model(tmp_path / "ft.onnx")(benign.images[:2]).shape == (2, 2)
    out = run_cli(
        parser.parse_args(
            base
            + [
                "--defense",
                "nc",
                "--report",
                str(tmp_path / "nc.json"),
                "--set",
                "steps=3",
                "--set",
                "restarts=1",
            ]
        )
    )
    assert out["defense"] == "neural_cleanse" and "verdict" in json.loads((tmp_path / "nc.json").read_text())
