"""Feature-space metrics of DRMGuard (Du et al., arXiv 2411.04811, eq. 3) and ROC-AUC.

With f = H o F, h_i = F(x_i) and w_j the j-th row of H's weight, the paper compares poisoned features h^p_i
(trigger applied) with benign ones h_i:

* RNV = var({||h^p_i||_2}) / var({||h_i||_2}), the ratio of norm variance;
* RAV = (1/d) sum_j var({alpha^p_ij}) / var({alpha_ij}), alpha_ij = angle(h_i, w_j), the ratio of angle
  variance.

Variances are population variances (ddof=0, TensorFlow's ``reduce_variance``). The ratios do not depend on
angle units. All functions are differentiable in the features (the scan's FSRT term reuses them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Guards (not in the paper): arccos has an infinite gradient at +-1, and a constant batch has zero variance.
_COS_CLAMP = 1.0 - 1e-6
_EPS = 1e-12


def _as_tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.float() if not t.is_floating_point() else t


def feature_angles(
    features: torch.Tensor | np.ndarray, head_weight: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Angles alpha_ij (radians) between feature h_i (N,m) and each head row w_j (d,m) -> (N,d)."""
    h, w = _as_tensor(features), _as_tensor(head_weight).to(_as_tensor(features).device)
    h = h.to(w.dtype)
    cos = (h @ w.T) / (h.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :] + 1e-8)
    return torch.arccos(cos.clamp(-_COS_CLAMP, _COS_CLAMP))


def rnv(
    poisoned_features: torch.Tensor | np.ndarray, benign_features: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Ratio of norm variance (eq. 3), a 0-d tensor."""
    hp, h = _as_tensor(poisoned_features), _as_tensor(benign_features)
    num = hp.norm(dim=1).var(unbiased=False)
    return num / (h.norm(dim=1).var(unbiased=False).detach() + _EPS)


def rav(
    poisoned_features: torch.Tensor | np.ndarray,
    benign_features: torch.Tensor | np.ndarray,
    head_weight: torch.Tensor | np.ndarray,
) -> torch.Tensor:
    """Ratio of angle variance (eq. 3): the mean over outputs j of the per-output ratios, a 0-d tensor."""
    ap = feature_angles(poisoned_features, head_weight)
    a = feature_angles(benign_features, head_weight)
    return (ap.var(dim=0, unbiased=False) / (a.var(dim=0, unbiased=False).detach() + _EPS)).mean()


def roc_auc(
    scores: Sequence[float] | np.ndarray | torch.Tensor, is_positive: Sequence[bool] | np.ndarray
) -> float:
    """Area under the ROC curve; a higher score means "more likely positive".

    Computed as the Mann-Whitney U statistic with average ranks for ties (so tied scores count 1/2).

    Raises:
        ValueError: lengths differ, a score is not finite, or one class is empty.
    """
    s = np.asarray(
        scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64
    ).ravel()
    y = np.asarray(is_positive, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores contain NaN or Inf")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positive and {n_neg} negative")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Average ranks (1-based) over runs of equal scores.
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


__all__ = ["feature_angles", "rav", "rnv", "roc_auc"]
