"""Independent pieces of a scan or a mitigation check, side by side in threads of this process (CPU only).

The scan's reverse engineering and its probe families, the rigidity checks of the flagged families and the folds of
the clean-error check do not depend on each other: each has its own copy of the model (its layout is changed in
place), its own seeded generators and its own parameters to fit. Most of their operations are small, so on a small
CPU two pieces of one torch thread each keep two cores busier than one piece of two threads does (docs/scan.md,
"Speed": measured). Torch releases the GIL inside its kernels, so threads are enough; the results are the same as
one after the other at the same torch thread count (tested to the last bit at one thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from .errors import CancelledError

T = TypeVar("T")


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def side_by_side(threads: int, cores: int | None = None, jobs: int = 1) -> int:
    """How many pieces may run side by side: the cores a job may use (``cores`` / ``jobs``, at least one) over the
    torch threads each piece runs with, at least one. ``cores`` defaults to :func:`cpu_cores`."""
    share = max(1, (cpu_cores() if cores is None else cores) // max(1, jobs))
    return max(1, share // max(1, threads))


class AnySet:
    """Set when any of the events is (``None`` counts as never set): what the loops poll as ``cancel``."""

    def __init__(self, *events: Any) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def run_side_by_side(calls: Sequence[Callable[[Any], T]], workers: int, cancel: Any = None) -> list[T]:
    """``[call(stop) for call in calls]``, with up to ``workers`` calls at a time in threads, started in the order
    given (put the longest first). Each thread runs torch with the caller's thread count (OpenMP's count is per
    calling thread: a new thread would get the default). ``stop`` is set when ``cancel`` is, or when a call fails;
    the calls should poll it and raise :class:`CancelledError`. The first call's own error is raised, never the
    CancelledError it caused in the others."""
    if workers <= 1 or len(calls) <= 1:
        return [call(cancel) for call in calls]
    threads = torch.get_num_threads()
    failed = threading.Event()
    stop = AnySet(cancel, failed)

    def guarded(call: Callable[[Any], T]) -> T:
        torch.set_num_threads(threads)
        try:
            return call(stop)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(workers, len(calls)), thread_name_prefix="drmguard") as pool:
        futures = [pool.submit(guarded, call) for call in calls]
        errors = [f.exception() for f in futures]
    raised = [e for e in errors if e is not None]
    if raised:
        raise next((e for e in raised if not isinstance(e, CancelledError)), raised[0])
    return [f.result() for f in futures]


def one_at_a_time(fn: Callable[..., None] | None) -> Callable[..., None] | None:
    """``fn`` behind a lock, for a progress callback that pieces in several threads call."""
    if fn is None:
        return None
    lock = threading.Lock()

    def locked(*args: Any, **kwargs: Any) -> None:
        with lock:
            fn(*args, **kwargs)

    return locked


__all__ = ["AnySet", "cpu_cores", "one_at_a_time", "run_side_by_side", "side_by_side"]
