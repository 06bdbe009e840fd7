"""Backdoor attacks on deep regression models (the red team of the zoo and the tests).

Every attack is a plug-in :class:`Attack` built by name through the registry::

    attack = get_attack("badnets", task="gaze", image_shape=(3, 64, 64), target=(-15, 20), seed=0)
    x_poisoned = attack.apply(x)                    # test-time trigger, float NCHW in [0,1]
    xb, yb, aux = attack.poison_batch(xb, yb, step)  # training-time poisoning (trainer)
    attack.save("attack.npz"); same = load_attack("attack.npz")

Registered: ``badnets``, ``clean_label``, ``wanet``, ``wanet_multi``, ``input_aware``, ``blend``, ``sig``,
``adaptive`` and presets (``list_attacks()``). See docs/attacks.md for settings and measured ratios.
"""

from __future__ import annotations

from . import adaptive, blend, input_aware, patch, warp  # noqa: F401  (registration side effects)
from .adaptive import AdaptiveAttack, rav_torch
from .base import (
    DEFAULT_TARGETS,
    SECOND_TARGETS,
    Attack,
    AttackConfig,
    attack_info,
    get_attack,
    list_attacks,
    load_attack,
    register_attack,
    register_preset,
)
from .blend import BlendAttack, SigAttack
from .input_aware import InputAwareAttack
from .patch import BadNetsAttack, CleanLabelAttack
from .warp import MultiTargetWaNetAttack, WaNetAttack

__all__ = [
    "DEFAULT_TARGETS",
    "SECOND_TARGETS",
    "AdaptiveAttack",
    "Attack",
    "AttackConfig",
    "BadNetsAttack",
    "BlendAttack",
    "CleanLabelAttack",
    "InputAwareAttack",
    "MultiTargetWaNetAttack",
    "SigAttack",
    "WaNetAttack",
    "attack_info",
    "get_attack",
    "list_attacks",
    "load_attack",
    "rav_torch",
    "register_attack",
    "register_preset",
]
