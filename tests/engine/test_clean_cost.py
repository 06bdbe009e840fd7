"""The pieces of the cross-validated clean-error cost (drmguard_engine.clean_cost) against hand computations; the
whole estimate on a real mitigation is in test_scan_e2e.py."""

from __future__ import annotations

import pytest
import torch

from drmguard_engine.clean_cost import bootstrap_rise, fold_indices
from drmguard_engine.errors import ConfigError


def test_folds_partition_the_images_evenly_and_reproducibly() -> None:
    parts = fold_indices(11, 3, seed=4)
    assert sorted(torch.cat(parts).tolist()) == list(range(11))  # every image in exactly one part
    assert sorted(len(p) for p in parts) == [3, 4, 4]
    assert all(torch.equal(a, b) for a, b in zip(parts, fold_indices(11, 3, seed=4), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(parts, fold_indices(11, 3, seed=5), strict=True))
    for bad in (1, 12):
        with pytest.raises(ConfigError, match="folds"):
            fold_indices(11, bad, seed=0)


def test_bootstrap_interval_of_the_relative_rise() -> None:
    before = torch.tensor([2.0, 4.0, 6.0, 8.0])
    lo, hi = bootstrap_rise(before, 1.1 * before)  # every image 10% worse: no spread to resample
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # one image carries the whole rise (sum 20 -> 24): the interval holds the estimate +20% and reaches 0 (resamples
    # without that image), and cannot go below 0 or above what one image drawn every time gives (+50%)
    after = torch.tensor([2.0, 4.0, 6.0, 12.0])
    lo, hi = bootstrap_rise(before, after, draws=4000)
    assert lo == pytest.approx(0.0) and 0.2 < hi <= 0.5

