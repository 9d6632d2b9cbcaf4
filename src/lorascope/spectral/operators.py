"""Weight updates as linear operators, so W_t = W_0 + ΔW is never formed when ΔW is low-rank.

All matrices follow torch.nn.Linear's layout: W has shape (out, in) = (m, n), and its *left*
singular vectors live in the output space R^m (the paper's Alg. 1 compares these).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    """ΔW = scale · B @ A with B: (m, r) and A: (r, n): a LoRA update with scale α/r (α/√r for rsLoRA)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LowRankDelta:
        return LowRankDelta(self.B.to(device, dtype), self.A.to(device, dtype), self.scale)

    def dense(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def T(self) -> LowRankDelta:  # noqa: N802 - mirrors torch's .T
        return LowRankDelta(self.A.T, self.B.T, self.scale)


Delta = LowRankDelta | torch.Tensor


def delta_to(delta: Delta, device: torch.device | str, dtype: torch.dtype) -> Delta:
    return delta.to(device, dtype) if isinstance(delta, LowRankDelta) else delta.to(device, dtype)


def delta_T(delta: Delta) -> Delta:  # noqa: N802
    return delta.T() if isinstance(delta, LowRankDelta) else delta.T


def dense(delta: Delta) -> torch.Tensor:
    return delta.dense() if isinstance(delta, LowRankDelta) else delta


class Tuned:
    """W_t = W_0 + ΔW applied through products only: W_t X and W_tᵀ Y cost O((m+n)·(r+c)) extra for
    a rank-r ΔW instead of materialising an m×n matrix."""

    def __init__(self, W0: torch.Tensor, delta: Delta):
        self.W0, self.delta = W0, delta
        self.shape = tuple(W0.shape)

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        """W_t @ X."""
        d = self.delta
        if isinstance(d, LowRankDelta):
            return self.W0 @ X + d.scale * (d.B @ (d.A @ X))
        return self.W0 @ X + d @ X

    def rmm(self, Y: torch.Tensor) -> torch.Tensor:
        """W_tᵀ @ Y."""
        d = self.delta
        if isinstance(d, LowRankDelta):
            return self.W0.T @ Y + d.scale * (d.A.T @ (d.B.T @ Y))
        return self.W0.T @ Y + d.T @ Y

    def dense(self) -> torch.Tensor:
        return self.W0 + dense(self.delta)
