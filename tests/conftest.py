"""Shared pytest setup: ``--run-slow``, auto-skipped ``slow``/``gpu`` markers, and RNG isolation.

Default runs are fast and CPU-only; ``slow`` tests need ``--run-slow`` and ``gpu`` tests a CUDA device. They
are skipped (not deselected) so that a run says "N skipped". The RNG fixture restores the python, numpy and
torch generators after every test, so no test depends on another's draws.

Torch runs single-threaded in tests (``DRMGUARD_TEST_THREADS`` overrides): the tests' tensors are tiny, and on
a shared 2-core machine multi-threaded kernels spin against each other. Measured under load (~14): the same
150-step tiny training took 12 s with one thread and 174 s with two.

``make test`` runs the suite in two pytest-xdist workers, whole files to a worker (``--dist loadfile``, so a
module's fixtures are built once) in collection order (``--no-loadscope-reorder``). Modules marked
``heavy(seconds)`` (minutes of real training and scanning) are collected first, longest first, so that the workers
finish together instead of one starting the longest module last. The trained fixture pair of ``tiny_models`` is
shared between the workers through a folder of the run's (``DRMGUARD_TEST_SHARED``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the client tests run without torch
        return
    torch.set_num_threads(int(os.environ.get("DRMGUARD_TEST_THREADS", "1")))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # the client tests run without torch
        return False
    return bool(torch.cuda.is_available())


def _heavy_seconds(item: pytest.Item) -> float:
    mark = item.get_closest_marker("heavy")
    return float(mark.args[0]) if mark is not None else 0.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda it: -_heavy_seconds(it))  # stable: the rest keep their order
    run_slow = config.getoption("--run-slow")
    has_cuda: bool | None = None
    for item in items:
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow; pass --run-slow"))
        if item.get_closest_marker("gpu"):
            if has_cuda is None:
                has_cuda = _cuda_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session", autouse=True)
def _shared_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``DRMGUARD_TEST_SHARED``: a folder this run's pytest-xdist workers share (the parent of their own base
    temporary folders), or this process's own when the suite runs in one process."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    shared.mkdir(exist_ok=True)
    os.environ["DRMGUARD_TEST_SHARED"] = str(shared)


@pytest.fixture(autouse=True)
def _restore_rng_state() -> Iterator[None]:
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    torch_state = torch.random.get_rng_state() if torch is not None else None
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    if torch is not None and torch_state is not None:
        torch.random.set_rng_state(torch_state)
