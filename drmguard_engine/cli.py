"""``drmguard-engine`` (also ``python -m drmguard_engine``): make data, train, evaluate (scan/mitigate live in
``cli_scan.py`` and are registered here when present).

Conventions: ``--json`` makes stdout carry exactly one JSON object and nothing else; logs and progress bars go
to stderr. Bad input exits with status 2 and one line ``drmguard-engine: error: <problem and fix>``; an
unexpected failure exits 1 the same way. ``--debug`` shows the traceback instead.

Adding commands: a module defines ``COMMANDS: list[Command]`` (name, help, add_arguments, run) where
``run(args) -> dict | None`` returns the JSON result (printed with ``--json``, or as ``key: value`` lines
otherwise) and raises :class:`CliError` or an engine error for bad input. ``cli_scan.COMMANDS`` is appended
to :data:`COMMANDS` below.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .errors import ConfigError, DataError, DRMGuardError, UnsupportedModelError

PROG = "drmguard-engine"
logger = logging.getLogger("drmguard_engine.cli")


class CliError(DRMGuardError):
    """Bad command-line input; the message says what is wrong and what to do."""


def parse_overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``OPTION=VALUE`` items as a dict; each value is read as JSON (3, 0.1, true, [1, 0, 0]) or kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"{flag} expects OPTION=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any] | None]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as every other bad input."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers (also for cli_scan.py)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise CliError(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CliError(f"{what} {str(p)!r} does not exist or is not a file; check the path")
    return p


def writable_path(path: str | Path, what: str) -> Path:
    p = Path(path)
    if p.exists() and p.is_dir():
        raise CliError(f"{what} {str(p)!r} is a directory; give a file name")
    if not p.parent.exists():
        raise CliError(f"the folder of {what} {str(p)!r} does not exist; create it first")
    return p


def parse_target(text: str | None, dim: int) -> tuple[float, ...] | None:
    """``"10,-5"`` -> (10.0, -5.0); checks the count against the task's label dimension."""
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise CliError(f"--target must be {dim} comma-separated numbers in degrees, got {text!r}") from None
    if len(vals) != dim or not all(math.isfinite(v) for v in vals):
        raise CliError(f"--target must be {dim} finite comma-separated numbers in degrees, got {text!r}")
    return vals


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are parsed as JSON when possible (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--attack-opt expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


class Progress:
    """A tqdm bar on stderr (auto-disabled when stderr is not a terminal or with --quiet)."""

    def __init__(self, desc: str, quiet: bool = False) -> None:
        self._bar: Any = None
        self._desc, self._quiet = desc, quiet

    def __call__(self, ev: Any) -> None:
        if self._quiet:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=int(getattr(ev, "total", 0)) or None,
                desc=self._desc,
                file=sys.stderr,
                unit="step",
                dynamic_ncols=True,
                disable=None,
            )
        self._bar.n = int(getattr(ev, "step", 0))
        loss = getattr(ev, "loss", None)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _sidecar(model_path: Path, suffix: str) -> Path:
    """M.onnx -> M<suffix> (e.g. M.json, M.attack.npz)."""
    return model_path.with_name(model_path.stem + suffix)


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, sort_keys=True, allow_nan=False) + "\n")
    else:
        for k, v in result.items():
            sys.stdout.write(f"{k}: {round(v, 4) if isinstance(v, float) else v}\n")
    sys.stdout.flush()


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument(
        "--json", action="store_true", help="print exactly one JSON object on stdout (logs go to stderr)"
    )
    g.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks on errors")
    g.add_argument("--quiet", action="store_true", help="no progress bars or info logs on stderr")
    g.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)"
    )


# ---------------------------------------------------------------------------------------------------------
# make-data


def _add_make_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", required=True, choices=["gaze", "headpose"], help="regression task of the labels"
    )
    p.add_argument("--n", type=int, default=1000, help="number of synthetic images (default 1000)")
    p.add_argument("--size", type=int, default=64, help="square image side in pixels (default 64)")
    p.add_argument(
        "--seed", type=int, default=0, help="dataset seed; the same seed gives the same data (default 0)"
    )
    p.add_argument(
        "--out", required=True, help="output .npz (images uint8 (N,3,S,S), labels float32 (N,d) degrees)"
    )
    p.add_argument(
        "--split",
        action="store_true",
        help="also split 80/10/10 (paper) into OUT-stem.train.npz, .benign.npz and .test.npz",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 split (default 0)")
    p.add_argument(
        "--real",
        choices=["mpiifacegaze", "columbiagaze", "biwi", "pandora"],
        default=None,
        help="read a real dataset from --root instead of rendering synthetic faces",
    )
    p.add_argument("--root", default=None, help="dataset folder for --real")


def _run_make_data(a: argparse.Namespace) -> dict[str, Any]:
    from .data.benign import save_benign_npz
    from .data.split import paper_split

    out = writable_path(a.out, "--out")
    t0 = time.perf_counter()
    if a.real:
        from .data import real

        if a.root is None or not Path(a.root).is_dir():
            raise CliError(f"--real {a.real} needs --root pointing at the dataset folder, got {a.root!r}")
        if real.TASK_OF[a.real] != a.task:
            raise CliError(f"{a.real} is a {real.TASK_OF[a.real]} dataset, but --task is {a.task}")
        images, labels = real.LOADERS[a.real](a.root, size=a.size, max_images=a.n)
    else:
        from .data.synthetic import make_dataset

        images, labels = make_dataset(a.task, a.n, size=a.size, seed=a.seed)
    seconds = time.perf_counter() - t0
    files = {"all": str(out)}
    save_benign_npz(out, images, labels)
    if a.split:
        tr, be, te = paper_split(len(images), seed=a.split_seed)
        base = out.with_suffix("") if out.suffix == ".npz" else out
        for name, idx in (("train", tr), ("benign", be), ("test", te)):
            path = base.with_name(base.name + f".{name}.npz")
            save_benign_npz(path, images[idx], labels[idx])
            files[name] = str(path)
    logger.info("wrote %d images (%.0f images/s) to %s", len(images), len(images) / max(seconds, 1e-9), out)
    return {
        "n": int(len(images)),
        "size": int(images.shape[-1]),
        "task": a.task,
        "files": files,
        "seconds": round(seconds, 3),
    }


# ---------------------------------------------------------------------------------------------------------
# train


def _add_train(p: argparse.ArgumentParser) -> None:
    from .training import DEFAULT_SCHEDULE, SCHEDULES

    p.add_argument("--task", required=True, choices=["gaze", "headpose"], help="regression task")
    p.add_argument("--data", required=True, help="training .npz (images, labels) as written by make-data")
    p.add_argument(
        "--test-data", default=None, help="optional held-out .npz; its metrics go into the sidecar"
    )
    p.add_argument(
        "--arch",
        default="resnet18",
        choices=["resnet18", "resnet34", "mobilenetv1", "tiny"],
        help="network architecture (default resnet18)",
    )
    p.add_argument(
        "--width", type=float, default=0.25, help="channel multiplier (default 0.25: 16-32-64-128 ResNet)"
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="input side the model is built for; must match the data (default: the data's size)",
    )
    p.add_argument(
        "--schedule",
        default=DEFAULT_SCHEDULE,
        choices=sorted(SCHEDULES),
        help=f"training schedule preset (default {DEFAULT_SCHEDULE}); the options below override it",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the schedule's)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the schedule's)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default: the schedule's)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation and batch order (default 0)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--attack", default=None, help="implant a backdoor with this attack (see drmguard_engine.attacks)"
    )
    p.add_argument(
        "--target",
        default=None,
        help="attack target y_T in degrees, comma-separated (e.g. '10,-15'; default: the attack's)",
    )
    p.add_argument(
        "--attack-opt",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="attack option (repeatable), e.g. --attack-opt poison_rate=0.1 --attack-opt patch_size=4",
    )
    p.add_argument(
        "--out", required=True, help="output ONNX model; sidecars M.json and M.attack.npz go beside it"
    )


def _load_training_data(path: str, task: str, option: str = "--data") -> tuple[np.ndarray, np.ndarray]:
    """Validated arrays; uint8 images stay uint8 (the trainer converts per batch)."""
    from .data.benign import validate_arrays

    p = existing_file(path, option)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z.files or "labels" not in z.files:
                raise DataError(f"{p.name}: needs 'images' and 'labels' arrays, found {sorted(z.files)}")
            images, labels = z["images"], z["labels"]
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(
            f"{p.name}: cannot be read without pickle ({exc}); store plain numeric arrays"
        ) from None
    except Exception as exc:  # zip/npz corruption
        raise DataError(
            f"{p.name}: not a readable .npz file ({exc}); write it with make-data or numpy.savez"
        ) from None
    validate_arrays(images[:256], labels[:256], task=task, what=p.name)  # cheap shape/dtype/range check
    if not np.isfinite(labels).all():
        raise DataError(f"{p.name}: 'labels' contain NaN or Inf values; remove or fix those rows")
    if images.dtype != np.uint8:
        if not np.isfinite(images).all():
            raise DataError(f"{p.name}: 'images' contain NaN or Inf values; remove or fix those images")
        if images.min() < 0 or images.max() > 1:
            raise DataError(
                f"{p.name}: float images must be in [0, 1]; divide 0-255 data by 255 or store uint8"
            )
    return images, labels.astype(np.float32)


def _export(model: Any, path: Path, size: int) -> None:
    try:
        from .onnx_io import export_onnx
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.onnx_io":
            raise
        export_onnx = None
    if export_onnx is not None:
        export_onnx(model, path, input_shape=(3, size, size))
        return
    # onnx_io not present yet: the same export it does (legacy exporter, standard ops, dynamic batch).
    import torch

    model = model.cpu().eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )


def _run_train(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .models import build_model
    from .tasks import Task
    from .training import evaluate, resolve_schedule, train

    task = Task.parse(a.task)
    device = check_device(a.device or default_device())
    out = writable_path(a.out, "--out")
    images, labels = _load_training_data(a.data, task.value)
    size = int(images.shape[-1])
    if images.shape[-1] != images.shape[-2]:
        raise DataError(f"{a.data}: images must be square, got {images.shape[-2]}x{images.shape[-1]}")
    if a.size is not None and a.size != size:
        raise CliError(f"--size {a.size} does not match the data's {size}x{size} images; regenerate the data")
    sched = resolve_schedule(a.schedule, steps=a.steps, lr=a.lr, batch_size=a.batch_size)
    model = build_model(a.arch, task, input_size=size, width=a.width, seed=a.seed)
    attack = None
    target = parse_target(a.target, task.dim)
    if a.attack:
        try:
            from .attacks import get_attack
        except ImportError as exc:
            raise CliError(f"attacks are not available in this build ({exc})") from None
        attack = get_attack(
            a.attack,
            task=task,
            image_shape=tuple(images.shape[1:]),
            target=target,
            seed=a.seed,
            **parse_options(a.attack_opt),
        )
        if getattr(attack, "requires_fit", False):
            logger.info("attack %s needs a clean surrogate model: training it first", a.attack)
            bar = Progress("surrogate", a.quiet)
            surrogate = build_model(a.arch, task, input_size=size, width=a.width, seed=a.seed + 1)
            train(
                surrogate,
                images,
                labels,
                task=task,
                schedule=sched,
                device=device,
                seed=a.seed + 1,
                progress=bar,
            )
            bar.close()
            attack.fit(surrogate, images, labels)
    elif a.attack_opt or target is not None:
        raise CliError("--target and --attack-opt need --attack")
    bar = Progress("train", a.quiet)
    t0 = time.perf_counter()
    try:
        train(
            model,
            images,
            labels,
            task=task,
            schedule=sched,
            attack=attack,
            device=device,
            seed=a.seed,
            progress=bar,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"model": str(out), "train_seconds": round(seconds, 2)}
    n_eval = min(len(images), 1000)
    result["train_metrics"] = evaluate(
        model, images[:n_eval], labels[:n_eval], task, attack=attack, device=device
    )
    if a.test_data:
        te_x, te_y = _load_training_data(a.test_data, task.value, "--test-data")
        if te_x.shape[1:] != images.shape[1:]:
            raise DataError(
                f"--test-data images are {te_x.shape[1:]}, the training images {images.shape[1:]}"
            )
        result["test_metrics"] = evaluate(model, te_x, te_y, task, attack=attack, device=device)
    model = model.cpu().eval()
    _export(model, out, size)
    files = {"model": str(out)}
    if attack is not None:
        if hasattr(attack, "to"):
            attack.to(torch.device("cpu"))
        attack_path = _sidecar(out, ".attack.npz")
        attack.save(attack_path)
        files["attack"] = str(attack_path)
    meta = {
        **model.describe(),
        "schedule": {
            "name": a.schedule,
            "steps": sched.steps,
            "lr": sched.lr,
            "batch_size": sched.batch_size,
            "milestones": list(sched.milestones),
            "gamma": sched.gamma,
        },
        "seed": a.seed,
        "device": device,
        "data": str(a.data),
        "attack": None
        if attack is None
        else {
            "name": a.attack,
            "target": [float(v) for v in attack.target],
            "options": parse_options(a.attack_opt),
        },
        **{k: v for k, v in result.items() if k != "model"},
    }
    side = _sidecar(out, ".json")
    side.write_text(json.dumps(meta, indent=2, sort_keys=True))
    files["sidecar"] = str(side)
    result["files"] = files
    return result


# ---------------------------------------------------------------------------------------------------------
# evaluate


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="ONNX model to evaluate")
    p.add_argument("--data", required=True, help=".npz with images and labels (degrees)")
    p.add_argument(
        "--task",
        choices=["gaze", "headpose"],
        default=None,
        help="regression task (default: from the model's .json sidecar)",
    )
    p.add_argument(
        "--attack-file",
        default=None,
        help="saved attack (default: MODEL-stem.attack.npz beside the model, when present)",
    )
    p.add_argument("--no-attack", action="store_true", help="ignore any attack sidecar; report only re")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")


def _run_evaluate(a: argparse.Namespace) -> dict[str, Any]:
    from .data.benign import load_benign_npz
    from .tasks import Task
    from .training import evaluate

    model_path = existing_file(a.model, "--model")
    data_path = existing_file(a.data, "--data")
    device = check_device(a.device or default_device())
    task_name = a.task
    side = _sidecar(model_path, ".json")
    if task_name is None and side.is_file():
        try:
            task_name = json.loads(side.read_text()).get("task")
        except (ValueError, AttributeError):
            task_name = None
    if task_name is None:
        raise CliError("--task is needed (gaze or headpose): the model has no readable .json sidecar")
    task = Task.parse(task_name)
    from .onnx_io import load_onnx_model  # lazy: pulls in onnx only for this command

    model = load_onnx_model(model_path)
    c, h, w = (int(s) for s in getattr(model, "input_shape", (3, 0, 0)))
    checks: dict[str, Any] = {"channels": c} if c else {}
    if h and w:
        checks["size"] = (h, w)
    data = load_benign_npz(data_path, task=task, require_labels=True, **checks)
    attack = None
    if not a.no_attack:
        attack_path = Path(a.attack_file) if a.attack_file else _sidecar(model_path, ".attack.npz")
        if a.attack_file and not attack_path.is_file():
            raise CliError(f"--attack-file {str(attack_path)!r} does not exist; check the path")
        if attack_path.is_file():
            from .attacks import load_attack

            attack = load_attack(attack_path)
            logger.info("using attack %s from %s", type(attack).__name__, attack_path)
    result = evaluate(
        model, data.images, data.labels, task, attack=attack, batch_size=a.batch_size, device=device
    )
    result_out: dict[str, Any] = dict(result)
    result_out["n"] = len(data)
    return result_out


# ---------------------------------------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command(
        "make-data",
        "render a synthetic dataset (or read a real one) into an .npz",
        _add_make_data,
        _run_make_data,
    ),
    Command(
        "train",
        "train a regression model (optionally backdoored) and export it to ONNX",
        _add_train,
        _run_train,
    ),
    Command(
        "evaluate",
        "regression error of an ONNX model (and ae/dae/rnv/rav with its attack)",
        _add_evaluate,
        _run_evaluate,
    ),
]


def _load_plugin_commands() -> None:
    """scan/mitigate are owned by cli_scan.py; a missing module is fine, a broken one is an error."""
    import importlib

    try:
        mod = importlib.import_module(f"{__package__}.cli_scan")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.cli_scan":
            raise
        return
    COMMANDS.extend(mod.COMMANDS)
    from .defenses import registry as _baselines

    COMMANDS.append(
        Command(
            "baseline",
            "run a baseline defense (neural_cleanse, featurere, anp, fine_pruning, fine_tuning, drmguard) "
            "on an ONNX model and write a JSON report (--out: the mitigated ONNX)",
            _baselines.add_cli_arguments,
            _baselines.run_cli,
        )
    )


_load_plugin_commands()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="DRMGuard engine: data, training, evaluation and backdoor scans of "
        "gaze and head-pose regression models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        _common(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _fail(message: str, code: int) -> int:
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {one_line}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 internal error, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise CliError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        result = args._run(args)
        if result is not None:
            emit(result, args.json)
        return 0
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (DRMGuardError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if args.debug:
            traceback.print_exc()
        kind = (
            ""
            if isinstance(exc, (CliError, ConfigError, DataError, UnsupportedModelError))
            else f"{type(exc).__name__}: "
        )
        return _fail(f"{kind}{exc}", 2)
    except Exception as exc:  # a bug or an unexpected environment problem
        if args.debug:
            traceback.print_exc()
        return _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback", 1)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
