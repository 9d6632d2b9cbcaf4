"""Intruder dimensions (Shuttleworth et al. 2025, Alg. 1).

For the top-k left singular vectors y_j of W_t and all left singular vectors x_i of W_0, the
similarity of y_j to the base is  max_i |cos(y_j, x_i)| = max_i |x_iᵀ y_j|  (unit vectors), and
y_j is an intruder dimension when that maximum is below ε.
"""

from __future__ import annotations

import torch


def max_abs_cos(Y: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column y_j of Y (d × k): max_i |x_iᵀ y_j| over the columns x_i of X, and the argmax.

    Columns are normalised first, so the result is a cosine even if Y or X is not exactly unit.
    """
    Yn = Y / Y.norm(dim=0).clamp_min(torch.finfo(Y.dtype).tiny)
    Xn = X / X.norm(dim=0).clamp_min(torch.finfo(X.dtype).tiny)
    cos = (Xn.T @ Yn).abs()  # (n_base, k)
    best, idx = cos.max(dim=0)
    return best.clamp_max(1.0), idx


def null_max_cos(dim: int, n_basis: int, samples: int = 512, seed: int = 0) -> dict[str, float]:
    """Chance level: max |cos| of a uniformly random unit vector in R^dim against n_basis orthonormal
    vectors. The distribution is rotation invariant, so the projections are the first n_basis
    coordinates of a random unit vector. Returns the mean and the 99th percentile (``q99``).

    When n_basis = dim every unit vector has max |cos| ≥ 1/√dim; a y_j whose similarity is near
    these values is as unlike the base as a random direction can be.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, dim, generator=g, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    m = z[:, :n_basis].abs().max(dim=1).values
    return {"mean": float(m.mean()), "q99": float(torch.quantile(m, 0.99))}
