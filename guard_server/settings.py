"""Server settings: one frozen dataclass, built once in ``cli.main()`` from (lowest to highest priority)
the defaults below, an optional TOML/JSON config file, ``GUARD_*`` environment variables and flags.

This module and ``cli.py`` are the only readers of argv and the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu`` (imported lazily: torch is slow to import)."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - no torch means no CUDA for scans
        return "cpu"


@dataclass(frozen=True)
class ServerSettings:
    """Every server setting with its one default. See docs/service.md for the meaning of each."""

    listen: str = "127.0.0.1:50051"
    metrics_port: int = 9464  # 0 = pick a free port; -1 = no metrics endpoint
    metrics_host: str = ""  # "" = the host part of --listen
    data_dir: str = "./guard-data"
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    workers: int = 0  # scan workers; 0 = one per GPU, or 1 on the CPU
    queue_size: int = 16  # scans waiting for a worker; more -> RESOURCE_EXHAUSTED
    scan_threads: int = 0  # torch threads per scan process; 0 = torch's default
    # on the CPU, how many independent pieces of one job run side by side in threads of its process, each with
    # scan_threads torch threads: the scan's reverse engineering, probe families and rigidity checks, and the folds
    # of the clean-error check (drmguard_engine.parallel). 0 = as many as the job's share of the cores (cores /
    # workers) holds; 1 = one after the other. Verdicts and numbers do not depend on it
    scan_parallel: int = 0
    grpc_threads: int = 32
    inference_threads: int = 0  # ONNX Runtime intra-op threads per served session; 0 = ORT's default (all cores)
    # ORT worker threads busy-wait between runs (ORT's default). Measured on 2 cores (docs/benchmarks-predict.md):
    # off costs +0.5 ms at batch 1 (thread wake-up) and gains nothing at batch 32
    inference_spinning: bool = True
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set -> mutual TLS (client certificates required)
    tokens_file: str = ""  # JSON/TOML {"tokens": [{"token": "...", "role": "registry|vehicle|admin"}]}
    allow_mitigated: bool = True
    # a probe-decided backdoor is repaired only if its probe collapsed the outputs this far (guard_server.policy):
    # above it, a mitigation can fail while the re-scan reads benign (docs/scan.md); 1.0 = repair every detection
    mitigate_max_probe_ratio: float = 0.01
    # after a backdoored verdict, mitigation also fits the probes without the scan's eye-region exclusion and
    # unlearns what they find when the deciding probe's ratio is above this (MitigationConfig.unmasked_above): its
    # trigger was found only approximately. 0 = always, which also looks for a second backdoor read through the
    # eyes behind one found precisely, at some clean-error cost (more triggers unlearned; docs/service.md)
    mitigate_unmasked_above: float = 0.01
    # below that ratio, fit the unmasked probes on the repaired model instead, and where one still collapses it (the
    # backdoor survived, read through the eyes) repair the submitted model again with them (MitigationConfig.
    # unmasked_check; measured: gaze Blend at 0.0068 repaired and admitted, the other zoo repairs unchanged)
    mitigate_unmasked_check: bool = True
    # more fits of the deciding probe family, from this many other seeds, before unlearning; a distinct collapse
    # point joins D_rp (a second trigger of a multi-target backdoor; MitigationConfig.extra_seeds; 0 = off)
    mitigate_extra_seeds: int = 2
    # a backdoored model that does not fit its benign set's labels (the scan's benign_fit warning) is not repaired:
    # the repair and its clean-error check would be fitted on data the model was not made for (fail closed)
    mitigate_require_fit: bool = True
    # a mitigated version is served only if its re-scan reads benign with a margin: score at most this (the scan's
    # score, 1 = its threshold). Measured (docs/scan.md, "A re-scan that reads benign only narrowly"): a held-out
    # LeNet whose backdoor unlearning only weakened re-scanned at 0.82; over 30 models, removed backdoors at
    # 0.195-0.502, surviving ones at 0.69-0.82
    mitigate_max_rescan_score: float = 0.5
    tolerance: float = 0.10  # allowed relative rise of clean error after mitigation
    # how the clean-error rise of a mitigation is measured: k-fold cross-validation over every benign image (the
    # model is mitigated k more times, each without one part, and read on it; drmguard_engine.clean_cost), or, with
    # 0, one split that holds back holdout_fraction of the benign set. Measured on the zoo (docs/scan.md, "The
    # clean-error check"): the 80 images one split holds back of 400 read +10-13% for repairs that cost 2-7%
    mitigate_cv_folds: int = 5
    holdout_fraction: float = 0.20  # with mitigate_cv_folds=0: of the benign set, held back to measure clean error
    default_profile: str = "default"
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    require_gpu: bool = False  # refuse to serve when no GPU provider is in use
    max_model_bytes: int = 128 * 1024 * 1024
    max_benign_bytes: int = 320 * 1024 * 1024  # 5,000 x 3x64x64 float32 = 246 MB, plus labels and zip
    max_message_bytes: int = 64 * 1024 * 1024
    max_batch: int = 256
    max_served_models: int = 64
    max_watchers: int = 256
    shutdown_grace: float = 20.0
    reflection: bool = True
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0.0 <= self.mitigate_max_probe_ratio <= 1.0:
            raise ValueError(f"mitigate_max_probe_ratio must be in [0, 1], got {self.mitigate_max_probe_ratio}")
        if not 0.0 <= self.mitigate_unmasked_above < 1.0:
            raise ValueError(f"mitigate_unmasked_above must be a variance ratio in [0, 1) (0 = always fit the unmasked "
                             f"probes), got {self.mitigate_unmasked_above}")
        if not 0.0 < self.mitigate_max_rescan_score <= 1.0:
            raise ValueError(f"mitigate_max_rescan_score must be in (0, 1] (1 = the re-scan's own threshold), got "
                             f"{self.mitigate_max_rescan_score}")
        if not 0.0 <= self.tolerance <= 10.0:
            raise ValueError(f"tolerance must be in [0, 10] (a fraction; 0.1 = 10%), got {self.tolerance}")
        if self.mitigate_cv_folds != 0 and not 2 <= self.mitigate_cv_folds <= 20:
            raise ValueError(f"mitigate_cv_folds must be 0 (one hold-out split) or 2-20, got {self.mitigate_cv_folds}")
        if not 0 <= self.mitigate_extra_seeds <= 16:
            raise ValueError(f"mitigate_extra_seeds must be 0 (off) or 1-16, got {self.mitigate_extra_seeds}")
        if not 0 <= self.scan_parallel <= 64:
            raise ValueError(f"scan_parallel must be 0 (as many as the cores hold) or 1-64, got {self.scan_parallel}")
        if not 0.05 <= self.holdout_fraction <= 0.5:
            raise ValueError(f"holdout_fraction must be in [0.05, 0.5], got {self.holdout_fraction}")
        if self.inference_threads < 0:
            raise ValueError(f"inference_threads must be >= 0 (0 = ONNX Runtime's default), got {self.inference_threads}")
        if self.queue_size < 1 or self.max_batch < 1 or self.workers < 0 or self.grpc_threads < 4:
            raise ValueError("queue_size and max_batch must be >= 1, workers >= 0, grpc_threads >= 4")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")

    @property
    def resolved_device(self) -> str:
        return default_device() if self.device == "auto" else self.device

    @property
    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        if self.resolved_device == "cuda":
            import torch

            return max(1, torch.cuda.device_count())
        return 1

    @property
    def auth_configured(self) -> bool:
        return bool(self.tokens_file or self.tls_client_ca)

    def replace(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Converts a config/env string to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if isinstance(default, tuple):
        if isinstance(value, list | tuple):
            return tuple(str(v) for v in value)
        return tuple(p.strip() for p in str(value).split(",") if p.strip())
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {type(default).__name__}, got {value!r}") from None


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a TOML (``.toml``) or JSON config file; keys are field names (``-`` or ``_``)."""
    p = Path(path)
    text = p.read_bytes()
    data = tomllib.loads(text.decode()) if p.suffix.lower() == ".toml" else json.loads(text)
    if "server" in data and isinstance(data["server"], dict):
        data = data["server"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Merges defaults < config file < ``GUARD_*`` environment < explicit overrides (flags).

    Raises:
        ValueError: an unknown key or a value of the wrong type, naming the key.
    """
    env = os.environ if environ is None else environ
    defaults = {f.name: f.default for f in fields(ServerSettings)}
    values: dict[str, Any] = {}
    cfg = config_file or env.get("GUARD_CONFIG", "")
    if cfg:
        for k, v in load_config_file(cfg).items():
            if k not in defaults:
                raise ValueError(f"config file {cfg}: unknown setting {k!r}; known: {', '.join(sorted(defaults))}")
            values[k] = _coerce(k, v, defaults[k])
    for k, default in defaults.items():
        ev = env.get("GUARD_" + k.upper())
        if ev is not None and ev != "":
            values[k] = _coerce("GUARD_" + k.upper(), ev, default)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in defaults:
            raise ValueError(f"unknown setting {k!r}")
        values[k] = _coerce(k, v, defaults[k])
    return ServerSettings(**values)


__all__ = ["DEFAULT_PROVIDERS", "ServerSettings", "build_settings", "load_config_file"]
