"""A dependency-free progress line for ``drmguard vet --wait`` and ``drmguard watch`` (stderr only)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .types import ScanEvent

_BAR = 24


def _fmt_losses(losses: dict[str, float]) -> str:
    # The total first (if the engine reports one), then the terms in a stable order.
    keys = sorted(losses, key=lambda k: (k not in ("total", "loss"), k))
    return " ".join(f"{k}={losses[k]:.4g}" for k in keys[:4])


class ProgressLine:
    """Renders scan events as one live line on a terminal, or as sparse plain lines otherwise.

    On a terminal the line is redrawn in place (carriage return); when stderr is a file or pipe
    (CI logs) a line is written per state or phase change and at most every ``log_every`` seconds,
    so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, *, log_every: float = 5.0) -> None:
        self._out = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._out, "isatty", lambda: False)())
        self._log_every = log_every
        self._last_key: tuple[str, str] | None = None
        self._last_t = 0.0
        self._width = 0

    def render(self, ev: ScanEvent) -> str:
        """The text of one progress line for ``ev``."""
        parts = [f"[{ev.state}]"]
        if ev.phase:
            parts.append(ev.phase)
        if ev.total > 0:
            frac = min(max(ev.step / ev.total, 0.0), 1.0)
            fill = int(round(frac * _BAR))
            parts.append(f"|{'#' * fill}{'.' * (_BAR - fill)}| {ev.step}/{ev.total}")
        elif ev.step:
            parts.append(f"step {ev.step}")
        if ev.losses:
            parts.append("losses " + _fmt_losses(ev.losses))
        if ev.perturbation_ratio is not None:
            parts.append(f"ratio {ev.perturbation_ratio:.4f}")
        if ev.verdict:
            parts.append(f"verdict {ev.verdict}")
        if ev.message and not ev.total:
            parts.append(ev.message)
        return " ".join(parts)

    def update(self, ev: ScanEvent) -> None:
        """Shows one event."""
        line = self.render(ev)
        key = (ev.state, ev.phase)
        now = time.monotonic()
        if self._tty:
            if key != self._last_key and self._width:
                # Keep the finished phase's last line on screen; start a new live line.
                self._out.write("\n")
                self._width = 0
            pad = max(self._width - len(line), 0)
            self._out.write("\r" + line + " " * pad)
            self._width = len(line)
        elif key != self._last_key or ev.final or now - self._last_t >= self._log_every:
            self._out.write(line + "\n")
            self._last_t = now
        self._last_key = key
        self._out.flush()

    def close(self) -> None:
        """Ends the live line (a newline on a terminal)."""
        if self._tty and self._width:
            self._out.write("\n")
            self._out.flush()
            self._width = 0
