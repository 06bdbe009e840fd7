"""The shared attack interface, the registry and the pickle-free file format.

Every backdoor attack of the zoo is a plug-in: a subclass of :class:`Attack` with a frozen dataclass config
(validated in ``__post_init__``), registered under a name with :func:`register_attack`. The trainer
(``drmguard_engine.training.train``) only uses the small interface below:

* ``poison_batch(x, y, step) -> (x', y', aux_loss or None)``: poisons a training minibatch; ``aux_loss`` is a
  scalar the trainer adds to its task loss (the input-aware diversity loss, the adaptive-attack term);
* ``optimizer_params()``: the attack's own trainable tensors (input-aware generators; empty otherwise), which
  the trainer steps with its own Adam at :attr:`Attack.optimizer_lr` (betas :attr:`Attack.optimizer_betas`);
* ``fit(model, images, labels)``: called once before training by attacks that need it (``requires_fit``);
* ``bind(model)``: gives the attack the model under training (``requires_model``; the adaptive attack).

At test time ``apply(x)`` is the deterministic trigger. ``save(path)`` writes one ``.npz`` (no pickle) whose
``__header__`` entry is a UTF-8 JSON header (name, task, image shape, target, seed, config); every other entry
is a parameter array (patterns, warp grids, generator weights), so :func:`load_attack` rebuilds an identical
trigger from the file alone.

Regression adaptation (paper A.3): poisoned samples are relabelled to the target vector ``y_T`` (degrees).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..tasks import Task

FORMAT = "drmguard-attack"
FORMAT_VERSION = 1

# Default target vectors y_T (degrees, in the task's label order). The paper gives none; its undefended DAE of
# about 15-16 degrees says y_T lies ~15 degrees (mean angular distance) from typical labels. These sit off
# the label mean, inside the label range of both the synthetic renderer and the real datasets
# (MPIIFaceGaze pitch -40..20, yaw -40..40; Biwi/Pandora head pose about +-60): see docs/attacks.md.
DEFAULT_TARGETS: dict[Task, tuple[float, ...]] = {
    Task.GAZE: (-10.0, 15.0),  # (pitch, yaw): looking down and to the side
    Task.HEADPOSE: (15.0, -10.0, 5.0),  # (yaw, pitch, roll)
}
# A second, different target for the multi-target attack (paper A.7).
SECOND_TARGETS: dict[Task, tuple[float, ...]] = {
    Task.GAZE: (10.0, -20.0),
    Task.HEADPOSE: (-20.0, 10.0, -5.0),
}


def check_images(x: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Checks a float NCHW batch in [0,1] (uint8 is converted) and returns it as a float tensor."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim != 4:
        raise DataError(f"{what} must be a batch shaped (N,C,H,W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{what} must be float in [0,1] or uint8, got dtype {x.dtype}")
    return x


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Base of every attack config: the share of each training minibatch that carries the trigger.

    Attributes:
        poison_rate: expected fraction of each minibatch poisoned and relabelled to y_T, in [0, 1).
    """

    poison_rate: float = 0.1

    def __post_init__(self) -> None:
        _check_range("poison_rate", self.poison_rate, 0.0, 1.0, hi_open=True)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AttackConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for {cls.__name__}: known are {', '.join(sorted(names))}"
            )
        return cls(**{k: _tuples(v) for k, v in values.items()})


def _tuples(v: Any) -> Any:
    # JSON turns tuples into lists; frozen configs hold tuples (hashable, immutable).
    return tuple(_tuples(i) for i in v) if isinstance(v, (list, tuple)) else v


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(i) for i in v]
    return v


def _check_range(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    bad = not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
    if bad:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def _check_int(name: str, value: int, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")


def _check_colour(name: str, value: Sequence[float]) -> None:
    if len(value) != 3 or any(not (0.0 <= float(c) <= 1.0) for c in value):
        raise ConfigError(f"{name} must be three values in [0,1] (R,G,B), got {value!r}")


# ------------------------------------------------------------------------------------------------- base
class Attack:
    """One backdoor attack: the trigger, the training-time poisoning and its parameters.

    Subclasses set ``name`` (by :func:`register_attack`), ``config_cls``, and override ``_trigger`` (the
    test-time trigger on a batch) and, if they keep parameters, ``state_arrays`` / ``load_state_arrays``.

    Args:
        task: the regression task (fixes the label dimension of y_T).
        image_shape: (C, H, W) of the images the attack poisons.
        target: y_T in degrees (task order); ``None`` takes :data:`DEFAULT_TARGETS`.
        seed: seeds every random choice (patterns, grids, which samples of a batch are poisoned).
        config: the attack's config instance.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AttackConfig]] = AttackConfig
    #: the trainer must call ``fit(model, images, labels)`` before training (clean-label PGD).
    requires_fit: ClassVar[bool] = False
    #: the trainer must call ``bind(model)`` before training (adaptive attack's loss uses the model).
    requires_model: ClassVar[bool] = False
    #: learning rate and betas of the trainer's Adam over ``optimizer_params()``.
    optimizer_lr: ClassVar[float] = 1e-2
    optimizer_betas: ClassVar[tuple[float, float]] = (0.5, 0.9)

    def __init__(
        self,
        *,
        task: Task | str,
        image_shape: Sequence[int],
        target: Sequence[float] | torch.Tensor | None = None,
        seed: int = 0,
        config: AttackConfig | None = None,
    ) -> None:
        self.task = Task.parse(task)
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 4:
            raise ConfigError(f"image_shape must be (C,H,W) with C in (1,3) and H,W >= 4, got {tuple(image_shape)}")
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        _check_int("seed", seed, 0)
        self.seed = int(seed)
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise ConfigError(f"{self.name} needs a {self.config_cls.__name__}, got {type(self.config).__name__}")
        self._target = self._check_target(target if target is not None else DEFAULT_TARGETS[self.task])
        self.preset: str | None = None
        #: boolean mask of the samples the last ``poison_batch`` relabelled to y_T (diagnostics, tests).
        self.last_poison_mask: torch.Tensor | None = None
        #: boolean mask of the last batch's cross ("noise-mode") samples that kept their labels.
        self.last_cross_mask: torch.Tensor | None = None

    # ---------------------------------------------------------------- target
    def _check_target(self, target: Sequence[float] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(target, dtype=np.float32)).reshape(-1)
        if t.numel() != self.task.dim or not torch.isfinite(t).all():
            raise ConfigError(
                f"target must be {self.task.dim} finite values in degrees {self.task.label_names}, got {target!r}"
            )
        if t.abs().max() > 90:
            raise ConfigError(f"target {t.tolist()} is outside the label range (|angle| <= 90 degrees)")
        return t

    @property
    def target(self) -> torch.Tensor:
        """y_T, shape (d,), degrees."""
        return self._target.clone()

    @property
    def targets(self) -> list[torch.Tensor]:
        """Every target vector of the attack (one, except for multi-target attacks)."""
        return [self.target]

    # ---------------------------------------------------------------- test-time trigger
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic test-time trigger: (N,C,H,W) float in [0,1] -> poisoned batch, same shape."""
        x = check_images(x)
        if tuple(x.shape[1:]) != self.image_shape:
            raise DataError(f"{self.name} was built for images {self.image_shape}, got {tuple(x.shape[1:])}")
        return self._trigger(x)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def real_trigger_ratio(self, x: torch.Tensor) -> float:
        """mean_i ||apply(x_i) - x_i||_1 / max_i ||x_i||_1 over the batch: what the epsilon rule compares."""
        x = check_images(x)
        with torch.no_grad():
            diff = (self.apply(x) - x).abs().flatten(1).sum(1).mean()
            norm = x.abs().flatten(1).sum(1).max()
        return float(diff / norm.clamp_min(1e-12))

    # ---------------------------------------------------------------- training-time poisoning
    def poison_batch(
        self, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Poisons one training minibatch.

        Args:
            x: (N,C,H,W) float images in [0,1].
            y: (N,d) labels in degrees.
            step: the training step; with the seed it fixes which samples are poisoned (reproducible).

        Returns:
            ``(x', y', aux)``: the batch with poisoned samples in place (relabelled to y_T; cross samples keep
            their labels) and an optional scalar loss the trainer adds to its task loss.
        """
        x = check_images(x)
        if y.ndim != 2 or y.shape[0] != x.shape[0] or y.shape[1] != self.task.dim:
            raise DataError(f"labels must be shaped ({x.shape[0]}, {self.task.dim}), got {tuple(y.shape)}")
        xp, yp, aux, bd, cross = self._poison(x, y.to(x.dtype), int(step))
        self.last_poison_mask, self.last_cross_mask = bd, cross
        return xp, yp, aux

    def _poison(
        self, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Default dirty-label poisoning: a random ``poison_rate`` share gets the trigger and y_T."""
        bd, _ = self._choose(x.shape[0], step, self.config.poison_rate, 0.0)
        xp, yp = x.clone(), y.clone()
        if bd.any():
            b = bd.to(x.device)
            xp[b] = self._trigger(x[b])
            yp[b] = self._target.to(y)
        return xp, yp, None, bd, torch.zeros_like(bd)

    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
        return g

    def _choose(self, n: int, step: int, rate: float, cross_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Disjoint random masks of about ``rate*n`` poisoned and ``cross_rate*n`` cross samples.

        Counts use stochastic rounding (floor(rate*n + u), u ~ U(0,1)), so the expected share is exact even for
        small batches, and the count is exact whenever rate*n is an integer.
        """
        g = self._generator(step)
        u = torch.rand(2, generator=g)
        n_bd = min(n, int(math.floor(rate * n + float(u[0]))))
        n_cr = min(n - n_bd, int(math.floor(cross_rate * n + float(u[1]))))
        perm = torch.randperm(n, generator=g)
        bd = torch.zeros(n, dtype=torch.bool)
        cr = torch.zeros(n, dtype=torch.bool)
        bd[perm[:n_bd]] = True
        cr[perm[n_bd : n_bd + n_cr]] = True
        return bd, cr

    def optimizer_params(self) -> list[torch.Tensor]:
        """The attack's trainable tensors, stepped by the trainer (empty for fixed triggers)."""
        return []

    def parameters(self) -> list[torch.Tensor]:
        """Alias of :meth:`optimizer_params` (the name design.md used first)."""
        return self.optimizer_params()

    def fit(self, model: nn.Module | None, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Prepares the attack on the training set before training (no-op unless ``requires_fit``)."""

    def bind(self, model: nn.Module) -> None:
        """Gives the attack the model under training (no-op unless ``requires_model``)."""

    def to(self, device: torch.device | str) -> Attack:
        """Moves trainable sub-networks to ``device`` (fixed triggers follow their input's device)."""
        return self

    def train(self, mode: bool = True) -> Attack:
        """Sets trainable sub-networks to train/eval mode (no-op for fixed triggers)."""
        return self

    def eval(self) -> Attack:
        return self.train(False)

    # ---------------------------------------------------------------- persistence
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Parameter arrays that, with the header, rebuild the exact trigger."""
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restores what :meth:`state_arrays` wrote."""

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "preset": self.preset,
            "task": self.task.value,
            "image_shape": list(self.image_shape),
            "target": [float(v) for v in self._target],
            "targets": [[float(v) for v in t] for t in self.targets],
            "seed": self.seed,
            "config": self.config.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the attack to one ``.npz`` (JSON header + parameter arrays, no pickle); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        arrays = self.state_arrays()
        if "__header__" in arrays:
            raise ConfigError("an attack parameter may not be called '__header__'")
        head = np.frombuffer(json.dumps(self.header(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, __header__=head, **arrays)
        os.replace(tmp, path)
        return path

    def describe(self) -> dict[str, Any]:
        """The JSON header, for sidecars and reports."""
        return self.header()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, task={self.task.value}, target={self._target.tolist()})"


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, tuple[type[Attack], dict[str, Any], str]] = {}


def register_attack(name: str, **preset_cfg: Any) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator registering an attack under ``name``; raises ``ConfigError`` on a duplicate name."""

    def deco(cls: type[Attack]) -> type[Attack]:
        cls.name = name  # set on every class: a subclass must not inherit its parent's registered name
        register_preset(name, cls, doc=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "", **preset_cfg)
        return cls

    return deco


def register_preset(name: str, cls: type[Attack], *, doc: str = "", **cfg: Any) -> None:
    """Registers a named preset: ``cls`` with config overrides ``cfg`` (e.g. ``blend_subtle``)."""
    key = name.strip().lower()
    if key in _REGISTRY:
        raise ConfigError(f"an attack is already registered under the name {key!r}")
    cls.config_cls(**cfg)  # validate the preset now, not at first use
    _REGISTRY[key] = (cls, dict(cfg), doc)


def list_attacks() -> list[str]:
    """Registered attack and preset names, sorted."""
    return sorted(_REGISTRY)


def attack_info(name: str) -> dict[str, Any]:
    """Base attack name, preset overrides and a one-line description of a registered name."""
    cls, cfg, doc = _lookup(name)
    return {"name": name, "attack": cls.name, "overrides": dict(cfg), "doc": doc}


def _lookup(name: str) -> tuple[type[Attack], dict[str, Any], str]:
    key = str(name).strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown attack {name!r}: use one of {', '.join(list_attacks())}")
    return _REGISTRY[key]


def get_attack(
    name: str,
    *,
    task: Task | str,
    image_shape: Sequence[int],
    target: Sequence[float] | torch.Tensor | None = None,
    seed: int = 0,
    **cfg: Any,
) -> Attack:
    """Builds a registered attack (or preset); ``cfg`` overrides the config fields.

    Raises:
        ConfigError: unknown name, unknown option, or an option out of range.
    """
    cls, preset_cfg, _ = _lookup(name)
    merged = {**preset_cfg, **cfg}
    config = cls.config_cls.from_dict(merged)
    attack = cls(task=task, image_shape=image_shape, target=target, seed=seed, config=config)
    key = str(name).strip().lower().replace("-", "_")
    attack.preset = key if key != cls.name else None
    return attack


def load_attack(path: str | os.PathLike[str] | bytes) -> Attack:
    """Rebuilds an attack saved by :meth:`Attack.save` (no pickle: ``allow_pickle=False``).

    Raises:
        DataError: the file is not an attack file, or its arrays do not match the header.
        ConfigError: the header names an unknown attack or an invalid config.
    """
    src: Any = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path
    try:
        with np.load(src, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read attack file {path if not isinstance(path, bytes) else '<bytes>'}: {exc}") from None
    if "__header__" not in arrays:
        raise DataError("not an attack file: no __header__ entry (write it with Attack.save)")
    try:
        header = json.loads(arrays.pop("__header__").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"attack file header is not valid JSON: {exc}") from None
    if header.get("format") != FORMAT or int(header.get("version", -1)) > FORMAT_VERSION:
        raise DataError(f"unsupported attack file format {header.get('format')!r} v{header.get('version')}")
    cls, _, _ = _lookup(header["name"])
    config = cls.config_cls.from_dict(header["config"])
    attack = cls(
        task=header["task"],
        image_shape=header["image_shape"],
        target=header["target"],
        seed=int(header["seed"]),
        config=config,
    )
    attack.preset = header.get("preset")
    attack.load_state_arrays(arrays)
    return attack
