"""``drmguard-server``: flags > ``GUARD_*`` environment > config file > defaults (see settings.py)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import fields
from typing import Any

from .settings import ServerSettings, build_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="drmguard-server",
                                description="DRMGuard guard service: vets driver-monitoring regression models for "
                                            "backdoors and serves the admitted ones (gRPC). Every flag can also be "
                                            "set as GUARD_<NAME> in the environment or in --config (TOML/JSON).")
    p.add_argument("--config", help="TOML or JSON config file (keys are the flag names)")
    # Defaults stay None here so the one default in ServerSettings applies unless a flag is given.
    help_ = {f.name: f"(default: {f.default!r})" for f in fields(ServerSettings)}
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_[f.name])
        elif isinstance(f.default, tuple):
            p.add_argument(flag, dest=f.name, default=None, help="comma-separated " + help_[f.name])
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=help_[f.name])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    try:
        settings = build_settings(overrides, config_file=args.config)
    except (ValueError, OSError) as exc:
        print(f"drmguard-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import GuardServer

    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("signal %d: draining (grace %.0fs)", signum, settings.shutdown_grace)
        done.set()

    # installed before the server starts, so a signal during start-up drains it as soon as it is up
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = GuardServer(settings).start()
    except (ValueError, OSError) as exc:
        print(f"drmguard-server: {exc}", file=sys.stderr)
        return 2
    print(f"drmguard-server listening on {server.address}; metrics on port {server.metrics_port}", flush=True)
    # Python runs signal handlers in the main thread only; when the kernel delivers the signal to one of gRPC's
    # threads, a wait without a timeout is never interrupted and the handler never runs (seen once in CI: no drain
    # 30 s after SIGTERM). Waking every 0.2 s lets it run.
    while not done.wait(0.2):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
