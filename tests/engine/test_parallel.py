"""drmguard_engine.parallel: how many pieces fit, and running them side by side (plain callables; the scan and the
clean-error check through it are in test_scan_e2e.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from drmguard_engine.errors import CancelledError
from drmguard_engine.parallel import AnySet, one_at_a_time, run_side_by_side, side_by_side


def test_side_by_side_shares_the_cores_among_jobs_and_threads() -> None:
    assert side_by_side(1, cores=2) == 2 and side_by_side(2, cores=2) == 1 and side_by_side(1, cores=16, jobs=4) == 4
    assert side_by_side(4, cores=16, jobs=2) == 2 and side_by_side(3, cores=2) == 1 and side_by_side(1, cores=1) == 1
    assert side_by_side(1, cores=2, jobs=3) == 1  # more jobs than cores: still one piece at a time, never none
    assert side_by_side(1) >= 1


def _waits_for_stop(stop: Any) -> str:
    for _ in range(500):
        if stop is not None and stop.is_set():
            raise CancelledError("stopped")
        time.sleep(0.01)
    return "never stopped"


def test_results_come_back_in_order_from_threads_with_the_callers_torch_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen: list[tuple[int, int]] = []

        def piece(stop: Any, k: int) -> int:
            seen.append((threading.get_ident(), torch.get_num_threads()))
            time.sleep(0.05 * (3 - k))  # the first finishes last
            return k * k

        calls = [lambda stop, k=k: piece(stop, k) for k in range(3)]
        assert run_side_by_side(calls, 3) == [0, 1, 4]
        assert {n for _, n in seen} == {1}  # not OpenMP's default for a new thread
        assert len({t for t, _ in seen} - {threading.get_ident()}) == 3
        seen.clear()
        assert run_side_by_side(calls, 1) == [0, 1, 4] and {t for t, _ in seen} == {threading.get_ident()}
    finally:
        torch.set_num_threads(before)


def test_a_failing_piece_stops_the_others_and_its_own_error_is_raised() -> None:
    def fails(stop: Any) -> None:
        time.sleep(0.05)
        raise ValueError("piece 2 failed")

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="piece 2 failed"):
        run_side_by_side([_waits_for_stop, fails, _waits_for_stop], 3)
    assert time.monotonic() - t0 < 3.0  # the others stopped at their next poll, not after their 5 s


def test_cancel_reaches_every_piece() -> None:
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    with pytest.raises(CancelledError):
        run_side_by_side([_waits_for_stop, _waits_for_stop], 2, cancel)
    assert AnySet(None).is_set() is False and AnySet(None, cancel).is_set() is True


def test_one_at_a_time_serialises_a_callback() -> None:
    inside, most = [0], [0]

    def cb(_: Any) -> None:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.001)
        inside[0] -= 1

    locked = one_at_a_time(cb)
    assert locked is not None and one_at_a_time(None) is None
    threads = [threading.Thread(target=lambda: [locked(i) for i in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
