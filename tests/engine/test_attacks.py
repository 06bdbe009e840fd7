"""Tests of the backdoor attacks (drmguard_engine.attacks): triggers, poisoning, files, one tiny implant."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from drmguard_engine.attacks import (
    DEFAULT_TARGETS,
    get_attack,
    list_attacks,
    load_attack,
    rav_torch,
    register_preset,
)
from drmguard_engine.attacks.base import Attack, _lookup
from drmguard_engine.errors import ConfigError, DataError
from drmguard_engine.tasks import Task

SHAPE = (3, 16, 16)
BASE_ATTACKS = ["adaptive", "badnets", "blend", "clean_label", "input_aware", "sig", "wanet", "wanet_multi"]


@pytest.fixture(autouse=True)
def _keep_rng_one_thread():
    # One intra-op thread: on the two shared cores it is several times faster than oversubscribed ones.
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(state)


def _images(n: int = 8, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Mid-grey noise: no pixel is pure red, so a red patch is unambiguous.
    return 0.2 + 0.6 * torch.rand(n, *shape, generator=g)


def _labels(n: int, task: str = "gaze", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    d = Task.parse(task).dim
    return (torch.rand(n, d, generator=g) * 2 - 1) * 30


class _TinyNet(nn.Module):
    """A RegressionNet-shaped stand-in (features + linear head) for the PGD / adaptive paths."""

    def __init__(self, d: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, d)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _make(name: str, task: str = "gaze", **cfg) -> Attack:
    if name == "clean_label":
        cfg.setdefault("pgd_steps", 5)
    if name == "input_aware":
        cfg.update(channels=4, steps=2)
    a = get_attack(name, task=task, image_shape=SHAPE, seed=3, **cfg)
    if a.requires_fit:
        a.fit(_TinyNet(Task.parse(task).dim), _images(64), _grouped_labels(64, a))
    if a.requires_model:
        a.bind(_TinyNet(Task.parse(task).dim))
    return a


def _grouped_labels(n: int, attack: Attack) -> torch.Tensor:
    # Half of the labels lie within 2 degrees of y_T, so the clean-label target group is never empty.
    y = _labels(n, attack.task.value)
    y[: n // 2] = attack.target + torch.linspace(-1, 1, n // 2).view(-1, 1)
    return y


# ------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_attack_and_presets():
    names = list_attacks()
    for n in BASE_ATTACKS + ["blend_subtle", "sig_subtle", "wanet_subtle"]:
        assert n in names


def test_duplicate_name_raises():
    cls, _, _ = _lookup("badnets")
    with pytest.raises(ConfigError, match="already registered"):
        register_preset("badnets", cls)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("badnets", {"poison_rate": 1.5}),
        ("badnets", {"colour": (2.0, 0.0, 0.0)}),
        ("badnets", {"position": "middle"}),
        ("blend", {"alpha": 0.0}),
        ("sig", {"frequency": 0}),
        ("wanet", {"strength": -1.0}),
        ("wanet", {"poison_rate": 0.5, "cross_ratio": 2.0}),
        ("input_aware", {"channels": 1}),
        ("adaptive", {"base": "nope"}),
        ("badnets", {"no_such_option": 1}),
    ],
)
def test_bad_config_raises(name, cfg):
    with pytest.raises(ConfigError):
        get_attack(name, task="gaze", image_shape=SHAPE, **cfg)


def test_bad_target_and_name_raise():
    with pytest.raises(ConfigError, match="unknown attack"):
        get_attack("nope", task="gaze", image_shape=SHAPE)
    with pytest.raises(ConfigError, match="target"):
        get_attack("badnets", task="gaze", image_shape=SHAPE, target=(1.0, 2.0, 3.0))
    with pytest.raises(ConfigError, match="label range"):
        get_attack("badnets", task="headpose", image_shape=SHAPE, target=(100.0, 0.0, 0.0))


def test_default_targets_inside_label_range():
    from drmguard_engine.data.synthetic import GAZE_RANGE, HEADPOSE_RANGE

    for task, rng in ((Task.GAZE, GAZE_RANGE), (Task.HEADPOSE, HEADPOSE_RANGE)):
        for v, (lo, hi) in zip(DEFAULT_TARGETS[task], rng, strict=True):
            assert lo < v < hi


# ----------------------------------------------------------------------------------------- triggers
@pytest.mark.parametrize("name", BASE_ATTACKS)
def test_apply_is_deterministic_and_changes_the_image(name):
    a = _make(name)
    x = _images()
    a.eval()
    out1, out2 = a.apply(x), a.apply(x)
    assert out1.shape == x.shape
    assert torch.equal(out1, out2)
    assert (out1 - x).abs().max() > 1e-3
    assert out1.min() >= 0 and out1.max() <= 1 + 1e-6
    with pytest.raises(DataError):
        a.apply(torch.rand(2, 3, 8, 8))


def test_badnets_patch_is_red_in_the_bottom_right_corner():
    a = get_attack("badnets", task="gaze", image_shape=(3, 64, 64))
    x = _images(2, (3, 64, 64))
    out = a.apply(x)
    patch = out[:, :, -6:, -6:]  # 20/224 of 64 px = 6 px
    assert torch.equal(patch[:, 0], torch.ones_like(patch[:, 0]))
    assert torch.equal(patch[:, 1:], torch.zeros_like(patch[:, 1:]))
    assert torch.equal(out[:, :, :-6], x[:, :, :-6]) and torch.equal(out[:, :, :, :-6], x[:, :, :, :-6])
    b = get_attack("badnets", task="gaze", image_shape=SHAPE, patch_size=3, position="top_left", colour=(0, 1, 0))
    out = b.apply(_images(1))
    assert torch.equal(out[0, 1, :3, :3], torch.ones(3, 3)) and torch.equal(out[0, 0, :3, :3], torch.zeros(3, 3))


def test_blend_and_sig_follow_their_formulas():
    x = _images()
    b = get_attack("blend", task="gaze", image_shape=SHAPE, alpha=0.25)
    torch.testing.assert_close(b.apply(x), 0.75 * x + 0.25 * b.pattern)
    s = get_attack("sig", task="gaze", image_shape=SHAPE, delta=0.1, frequency=2)
    j = torch.arange(16, dtype=torch.float32)
    expected = (x + 0.1 * torch.sin(2 * math.pi * j * 2 / 16).view(1, 1, 1, -1)).clamp(0, 1)
    torch.testing.assert_close(s.apply(x), expected)


def test_wanet_is_a_small_warp_that_roughly_keeps_the_mean():
    a = get_attack("wanet", task="gaze", image_shape=(3, 32, 32), strength=2.0)
    x = torch.nn.functional.interpolate(_images(4, (3, 8, 8)), size=(32, 32), mode="bilinear", align_corners=True)
    out = a.apply(x)
    assert abs(float(out.mean() - x.mean())) < 0.01
    assert 0 < float((out - x).abs().mean()) < 0.05
    # A different seed draws a different warp; the same seed, the same.
    b = get_attack("wanet", task="gaze", image_shape=(3, 32, 32), seed=1, strength=2.0)
    c = get_attack("wanet", task="gaze", image_shape=(3, 32, 32), seed=0, strength=2.0)
    assert not torch.equal(b.apply(x), out) and torch.equal(c.apply(x), out)


def test_wanet_multi_has_two_triggers_and_targets():
    a = get_attack("wanet_multi", task="headpose", image_shape=SHAPE)
    assert len(a.targets) == 2 and not torch.equal(a.targets[0], a.targets[1])
    x = _images()
    assert not torch.equal(a.apply(x, which=0), a.apply(x, which=1))
    with pytest.raises(ConfigError):
        a.apply(x, which=2)


def test_real_trigger_ratio_matches_hand_computation():
    a = get_attack("blend", task="gaze", image_shape=SHAPE, alpha=0.1)
    x = _images(5)
    diff = (0.1 * (a.pattern - x)).abs().sum(dim=(1, 2, 3))
    expected = float(diff.mean() / x.sum(dim=(1, 2, 3)).max())
    assert a.real_trigger_ratio(x) == pytest.approx(expected, rel=1e-5)
    # A red 4x4 patch on a black image: ||A(x) - x||_1 = 16 per image, over a white image's 3*16*16.
    p = get_attack("badnets", task="gaze", image_shape=SHAPE, patch_size=4)
    xs = torch.cat([torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE)])
    # black: 16 (red channel only), white: 16*2 (green and blue switched off)
    assert p.real_trigger_ratio(xs) == pytest.approx((16 + 32) / 2 / (3 * 256), rel=1e-6)


# ---------------------------------------------------------------------------------------- poisoning
def test_poison_batch_relabels_the_right_fraction_to_the_target():
    a = get_attack("badnets", task="gaze", image_shape=SHAPE, poison_rate=0.125)
    x, y = _images(40), _labels(40)
    total = 0
    for step in range(20):
        xp, yp, aux = a.poison_batch(x, y, step)
        assert aux is None
        bd = a.last_poison_mask
        assert int(bd.sum()) == 5  # 0.125 * 40 exactly
        assert torch.equal(yp[bd], a.target.expand(5, -1))
        assert torch.equal(yp[~bd], y[~bd]) and torch.equal(xp[~bd], x[~bd])
        assert torch.equal(xp[bd], a.apply(x[bd]))
        total += int(bd.sum())
    # Same step, same choice; another step, (almost surely) another.
    a.poison_batch(x, y, 3)
    m3 = a.last_poison_mask.clone()
    a.poison_batch(x, y, 3)
    assert torch.equal(m3, a.last_poison_mask)
    # A rate that is not a whole number of samples is right in expectation.
    b = get_attack("badnets", task="gaze", image_shape=SHAPE, poison_rate=0.05)
    n = sum(int(b.poison_batch(x[:30], y[:30], s)[1].eq(b.target).all(1).sum()) for s in range(200))
    assert n / (200 * 30) == pytest.approx(0.05, abs=0.01)


def test_wanet_cross_samples_keep_their_labels():
    a = get_attack("wanet", task="gaze", image_shape=SHAPE, poison_rate=0.1, cross_ratio=2.0)
    x, y = _images(50), _labels(50)
    xp, yp, _ = a.poison_batch(x, y, 0)
    bd, cr = a.last_poison_mask, a.last_cross_mask
    assert int(bd.sum()) == 5 and int(cr.sum()) == 10 and not (bd & cr).any()
    assert torch.equal(yp[cr], y[cr]) and torch.equal(yp[bd], a.target.expand(5, -1))
    assert not torch.equal(xp[cr], x[cr])  # warped with noise ...
    assert not torch.allclose(xp[cr], a.apply(x[cr]))  # ... not the exact trigger
    clean = ~(bd | cr)
    assert torch.equal(xp[clean], x[clean])


def test_wanet_multi_uses_both_targets():
    a = get_attack("wanet_multi", task="gaze", image_shape=SHAPE, cross_ratio=0.0)
    x, y = _images(40), _labels(40)
    _, yp, _ = a.poison_batch(x, y, 0)
    n0 = int(yp.eq(a.targets[0]).all(1).sum())
    n1 = int(yp.eq(a.targets[1]).all(1).sum())
    assert n0 == 6 and n1 == 6  # 15% of 40 per trigger


def test_clean_label_poisons_the_target_group_with_pgd_on_half():
    a = get_attack("clean_label", task="gaze", image_shape=SHAPE, seed=1, pgd_steps=3, group_fraction=0.25)
    images = _images(64)
    labels = _grouped_labels(64, a)
    a.fit(_TinyNet(), images, labels)
    assert a.group_size >= 16 and len(a.adv_labels) == round(0.5 * a.group_size)
    assert float(np.abs(a.adv_perturbations).max()) <= 8 / 255 + 1e-3
    xp, yp, _ = a.poison_batch(images, labels, 0)
    group = (labels - a.target).norm(dim=1) <= a.delta
    assert torch.equal(a.last_poison_mask, group)
    assert torch.equal(yp[group], a.target.expand(int(group.sum()), -1))
    assert torch.equal(xp[~group], images[~group])
    patch = a.mask.bool().expand(1, 3, 16, 16)[0]
    assert torch.equal(xp[group][:, patch], a.apply(images[group])[:, patch])
    # Off the patch, the PGD half differs from the clean image, the other half does not.
    off = ~patch
    changed = [(xp[i][off] - images[i][off]).abs().max() > 1e-4 for i in torch.nonzero(group).flatten()]
    assert sum(changed) == len(a.adv_labels)
    with pytest.raises(ConfigError, match="fit"):
        get_attack("clean_label", task="gaze", image_shape=SHAPE).poison_batch(images, labels, 0)


def test_input_aware_trains_its_generators_through_poison_batch():
    a = get_attack("input_aware", task="gaze", image_shape=SHAPE, channels=4, steps=2, mask_steps=2)
    params = a.optimizer_params()
    assert params and all(p.requires_grad for p in params)
    x, y = _images(20), _labels(20)
    a.train(True)
    xp, yp, aux = a.poison_batch(x, y, 0)
    assert aux is not None and aux.ndim == 0
    bd, cr = a.last_poison_mask, a.last_cross_mask
    assert torch.equal(yp[bd], a.target.expand(int(bd.sum()), -1)) and torch.equal(yp[cr], y[cr])
    (xp.sum() + aux).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.pattern_gen.parameters())
    for s in (1, 2, 3):
        a.poison_batch(x, y, s)
    assert a.mask_done  # stage 1 over: the mask generator is frozen
    assert not any(p.requires_grad for p in a.mask_gen.parameters())


def test_adaptive_returns_the_rav_loss_and_needs_bind():
    a = get_attack("adaptive", task="gaze", image_shape=SHAPE, base="badnets", base_options=(("poison_rate", 0.25),))
    x, y = _images(32), _labels(32)
    with pytest.raises(ConfigError, match="bind"):
        a.poison_batch(x, y, 0)
    net = _TinyNet()
    a.bind(net)
    xp, yp, aux = a.poison_batch(x, y, 0)
    assert aux is not None
    bd = a.last_poison_mask
    feats = net.features(xp)
    rav = rav_torch(feats[bd], feats[~bd], net.head.weight)
    assert float(aux.detach()) == pytest.approx(0.02 * abs(1 - float(rav.detach())), rel=1e-5)
    aux.backward()
    assert net.head.weight.grad is not None  # the loss trains the model
    assert torch.equal(a.apply(x), get_attack("badnets", task="gaze", image_shape=SHAPE).apply(x))


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("name", BASE_ATTACKS + ["wanet_subtle"])
def test_save_load_round_trip_regenerates_identical_poisoned_inputs(name, tmp_path):
    a = _make(name, task="headpose")
    if name == "input_aware":  # move the generators and BN statistics off their initial values
        a.train(True)
        for s in range(3):
            a.poison_batch(_images(16), _labels(16, "headpose"), s)
    a.eval()
    path = a.save(tmp_path / "attack.npz")
    b = load_attack(path)
    assert type(b) is type(a) and b.config == a.config and torch.equal(b.target, a.target)
    x = _images(6, seed=9)
    assert torch.equal(a.apply(x), b.apply(x))
    if name == "wanet_multi":
        assert torch.equal(a.apply(x, which=1), b.apply(x, which=1))
    # Same bytes from memory; the header is plain JSON and nothing is pickled.
    c = load_attack(path.read_bytes())
    assert torch.equal(c.apply(x), a.apply(x))
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    header = json.loads(np.load(path, allow_pickle=False)["__header__"].tobytes())
    assert header["name"] == a.name and header["task"] == "headpose"


def test_load_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(DataError, match="not an attack file"):
        load_attack(p)
    with pytest.raises(DataError):
        load_attack(b"not a zip")


# ---------------------------------------------------------------------------------------- implant
def test_badnets_implants_on_a_tiny_model():
    from drmguard_engine.data.synthetic import make_dataset
    from drmguard_engine.models import build_model
    from drmguard_engine.training import evaluate, train

    images, labels = make_dataset("gaze", 1200, size=16, seed=0)
    test_x, test_y = make_dataset("gaze", 200, size=16, seed=1)
    attack = get_attack("badnets", task="gaze", image_shape=(3, 16, 16), poison_rate=0.1, patch_size=3)
    model = build_model("tiny", "gaze", input_size=16, seed=0)
    train(model, images, labels, task="gaze", steps=300, lr=3e-3, batch_size=64, attack=attack, seed=0)
    m = evaluate(model, test_x, test_y, "gaze", attack=attack)
    # The backdoor is in: poisoned inputs land near y_T (AE well below the error of the clean-input outputs
    # to y_T), and far from their true labels (DAE).
    clean_to_target = evaluate(model, test_x, np.tile(attack.target.numpy(), (200, 1)), "gaze")["re"]
    assert m["ae"] < 0.5 * clean_to_target
    assert m["ae"] < m["dae"]


@pytest.mark.parametrize("name", BASE_ATTACKS)
def test_every_attack_runs_through_the_trainer(name):
    """The training contract end to end: fit/bind hooks, aux loss, the attack's own optimizer, evaluate."""
    from drmguard_engine.models import build_model
    from drmguard_engine.training import evaluate, train

    images = (_images(96) * 255).to(torch.uint8).numpy()
    a = get_attack(name, task="gaze", image_shape=SHAPE, seed=0,
                   **({"channels": 4, "steps": 2, "mask_steps": 2} if name == "input_aware" else {}),
                   **({"pgd_steps": 2, "group_fraction": 0.2} if name == "clean_label" else {}))
    labels = _grouped_labels(96, a).numpy()
    model = build_model("tiny", "gaze", input_size=16, seed=0)
    if a.requires_fit:
        a.fit(build_model("tiny", "gaze", input_size=16, seed=1), images, labels)
    if a.requires_model:
        a.bind(model)
    before = [p.detach().clone() for p in a.optimizer_params()]
    train(model, images, labels, task="gaze", steps=6, lr=1e-3, batch_size=32, attack=a, seed=0)
    if before:  # the trainer stepped the attack's own parameters
        assert any(not torch.equal(b, p) for b, p in zip(before, a.optimizer_params(), strict=True))
    m = evaluate(model, images[:32], labels[:32], "gaze", attack=a)
    assert all(math.isfinite(m[k]) for k in ("re", "ae", "dae"))


def test_ia_diversity_loss_has_finite_gradients_when_two_patterns_are_equal() -> None:
    from drmguard_engine.attacks.input_aware import diversity_loss

    x1, x2 = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    g = torch.full((3, 3, 8, 8), 0.5, requires_grad=True)  # saturated generators: identical patterns
    loss = diversity_loss(x1, x2, g, g.roll(1, dims=0))
    (grad,) = torch.autograd.grad(loss, g)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
