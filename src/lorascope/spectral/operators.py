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


class TunedStack:
    """N tuned matrices of one base, W_t^(i) = W_0 + ΔW_i, applied together: ``mm`` and ``rmm`` take
    and give (N, ·, c) blocks, one per matrix. For LoRA updates of one rank (``lowrank``) the products
    with W_0 are one matrix product with all N blocks side by side and the low-rank terms one batched
    product, so N adapters cost about the kernel launches of one (the many-adapter scan). Anything
    else (a dense ΔW, mixed ranks) holds one matrix: ``of`` builds the groups."""

    def __init__(self, W0: torch.Tensor, deltas: list[Delta]):
        self.W0, self.deltas = W0, deltas
        self.shape = tuple(W0.shape)
        self.lowrank = all(isinstance(d, LowRankDelta) for d in deltas) and len({d.rank for d in deltas}) == 1
        if len(deltas) > 1 and not self.lowrank:
            raise ValueError("a stack of several updates needs LoRA updates of one rank")
        if self.lowrank:
            self.B = torch.stack([d.B for d in deltas])  # (N, m, r)
            self.A = torch.stack([d.A for d in deltas])  # (N, r, n)
            self.scale = torch.tensor([d.scale for d in deltas], dtype=W0.dtype).to(W0.device)[:, None, None]

    @staticmethod
    def of(W0: torch.Tensor, deltas: list[Delta]) -> list[tuple[list[int], TunedStack]]:
        """The updates grouped into stacks: LoRA updates by rank (in order of first appearance), every
        other update alone; each with the indices of its members in ``deltas``."""
        groups: dict[object, list[int]] = {}
        for i, d in enumerate(deltas):
            groups.setdefault(("lora", d.rank) if isinstance(d, LowRankDelta) else ("dense", i), []).append(i)
        return [(idx, TunedStack(W0, [deltas[i] for i in idx])) for idx in groups.values()]

    def __len__(self) -> int:
        return len(self.deltas)

    def select(self, keep: list[int]) -> TunedStack:
        return TunedStack(self.W0, [self.deltas[i] for i in keep])

    def _w0(self, M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """M @ X_i for every block X_i of X (N, d, c), as one product of M with the blocks side by side."""
        N, d, c = X.shape
        return (M @ X.transpose(0, 1).reshape(d, N * c)).reshape(M.shape[0], N, c).transpose(0, 1)

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        """W_t^(i) @ X_i for each block: (N, n, c) → (N, m, c)."""
        if len(self) > 1:
            return self._w0(self.W0, X) + self.scale * (self.B @ (self.A @ X))
        return Tuned(self.W0, self.deltas[0]).mm(X[0])[None]  # one matrix: exactly the products of Tuned

    def rmm(self, Y: torch.Tensor) -> torch.Tensor:
        """W_t^(i)ᵀ @ Y_i for each block: (N, m, c) → (N, n, c)."""
        if len(self) > 1:
            return self._w0(self.W0.T, Y) + self.scale * (self.A.mT @ (self.B.mT @ Y))
        return Tuned(self.W0, self.deltas[0]).rmm(Y[0])[None]

    def start(self) -> torch.Tensor | None:
        """The updates' column spaces (N, m, r), where intruders appear; None for dense updates."""
        return self.B if self.lowrank else None

    def dense(self, i: int) -> torch.Tensor:
        return Tuned(self.W0, self.deltas[i]).dense()
