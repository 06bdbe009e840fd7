"""The paper's data split (Du et al., arXiv 2411.04811, section 4.1): a random 80/10/10 partition *by image*
(not by subject) into the training set, the benign dataset D_be handed to the defender, and the test set."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def paper_split(
    n: int, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random disjoint index arrays ``(train, benign, test)`` covering ``range(n)``.

    Args:
        n: number of samples (at least 3).
        seed: the permutation seed.
        fractions: train/benign/test shares, summing to 1 (the benign share is the ablation's 5/10/15%).

    Returns:
        Three sorted int64 arrays; the benign and test parts get ``round(n * share)`` samples (at least 1
        each), the training part the rest.
    """
    n = int(n)
    if n < 3:
        raise ConfigError(f"paper_split needs at least 3 samples, got {n}")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"fractions must be three positive shares summing to 1, got {fractions}")
    n_be = max(1, int(round(n * fractions[1])))
    n_te = max(1, int(round(n * fractions[2])))
    if n_be + n_te >= n:
        raise ConfigError(f"{n} samples are too few for a {fractions} split")
    perm = np.random.default_rng(int(seed)).permutation(n)
    be, te, tr = perm[:n_be], perm[n_be : n_be + n_te], perm[n_be + n_te :]
    return np.sort(tr).astype(np.int64), np.sort(be).astype(np.int64), np.sort(te).astype(np.int64)


__all__ = ["paper_split"]
