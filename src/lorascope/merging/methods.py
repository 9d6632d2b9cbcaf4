"""Merge methods: one pure function per method on the updates of ONE matrix, plus one registry line.

Every function takes the stacked updates ``deltas`` (N, m, n) = [ΔW_1 … ΔW_N] of one base matrix
in the (out, in) layout, the weights w (N,) and the ``Params`` (density d, a random generator) and
returns the merged ΔW (m, n) (EMR: one ΔW per input, (N, m, n)). No I/O, no file names: the api
streams matrices through them. Definitions follow mergekit 0.1.5 (``generalized_task_arithmetic``,
``sparsify``), which tests/test_merge.py checks to 1e-6; docs/merge.md lists where PEFT differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Params:
    density: float = 1.0
    generator: torch.Generator | None = None  # a CPU generator: the same masks on any device


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the k = max(1, ⌊d·numel⌋) entries of largest |δ|, zero the rest."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[delta.abs().reshape(-1).argsort(descending=True)[:k]] = 1
    return delta * keep.reshape(delta.shape)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's random drop with mergekit's L1 rescaling: m ~ Bernoulli(d) element-wise and
    δ' = (m ⊙ δ) · ‖δ‖₁ / ‖m ⊙ δ‖₁ (no rescale when either norm is below 1e-7).

    The mask is drawn in float32 on the CPU from ``generator``, as mergekit's ``bernoulli`` draws it
    on the CPU, so a seed gives the same merge on a GPU too. (The DARE paper and PEFT rescale by 1/d
    instead; in expectation both keep δ.)
    """
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
    kept = delta * mask.to(delta.device, delta.dtype)
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _weighted(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return deltas * weights.to(deltas).reshape(-1, *([1] * (deltas.dim() - 1)))


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """TIES' sign election ("sum"): γ = sign(Σ_i w_i τ_i), with 0 counted as +; returns the mask
    [sign(w_i τ_i) = γ] per input (entries that are 0 never agree)."""
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted)
    return weighted.sign() == majority


def linear(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
    """ΔW = Σ_i w_i ΔW_i / Σ_i w_i  (mergekit ``linear`` on W_i = W_0 + ΔW_i, normalised)."""
    return _weighted(deltas, weights).sum(0) / weights.sum().to(deltas)


def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
    """ΔW = Σ_i w_i ΔW_i  (Ilharco et al. 2023)."""
    return _weighted(deltas, weights).sum(0)


def ties(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
    """TIES (Yadav et al. 2023): τ_i = trim_d(ΔW_i), γ = sign(Σ_i w_i τ_i), M_i = [sign(w_i τ_i) = γ],
    ΔW = Σ_i M_i w_i τ_i / Σ_i M_i w_i (a 0 divisor counts as 1)."""
    t = _weighted(torch.stack([magnitude_trim(d, p.density) for d in deltas]), weights)
    mask = elect_sign(t)
    divisor = (_weighted(torch.ones_like(t), weights) * mask).sum(0)
    divisor[divisor == 0] = 1
    return (t * mask).sum(0) / divisor


def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
    """DARE (Yu et al. 2024): ΔW = Σ_i w_i dare_d(ΔW_i), with ``dare_drop``'s L1 rescaling."""
    return _weighted(torch.stack([dare_drop(d, p.density, p.generator) for d in deltas]), weights).sum(0)


def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
    """DARE-TIES: τ_i = dare_d(ΔW_i), M_i the TIES sign mask of w_i τ_i, ΔW = Σ_i M_i w_i τ_i
    (mergekit's default: no division by Σ M_i w_i)."""
    t = _weighted(torch.stack([dare_drop(d, p.density, p.generator) for d in deltas]), weights)
    return (t * elect_sign(t)).sum(0)


def knots_split(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KnOTS' alignment (Stoica et al., ICLR 2025): the thin SVD of the concatenation
    [ΔW_1 … ΔW_N] (m × N·n) = U Σ [V_1ᵀ … V_Nᵀ], kept to its numerical rank R (σ_j > σ_1·max(m, Nn)·eps),
    so ΔW_i = U Σ V_iᵀ exactly. Returns U (m, R), Σ (R,) and the blocks V_iᵀ stacked (N, R, n)."""
    N, m, n = deltas.shape
    U, S, Vh = torch.linalg.svd(deltas.permute(1, 0, 2).reshape(m, N * n), full_matrices=False)
    tol = (S[0] if S.numel() else 0) * max(m, N * n) * torch.finfo(S.dtype).eps
    R = max(1, int((S > tol).sum()))
    return U[:, :R], S[:R], Vh[:R].reshape(R, N, n).permute(1, 0, 2)


def _knots(merge_blocks: Callable) -> Callable:
    def method(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
        U, S, Vt = knots_split(deltas)
        return (U * S) @ merge_blocks(Vt, weights, p)

    return method


knots_ties = _knots(ties)
knots_ties.__doc__ = "KnOTS-TIES: ΔW = U Σ ties(V_1ᵀ … V_Nᵀ), the blocks of ``knots_split`` merged by ``ties``."
knots_dare = _knots(dare_ties)
knots_dare.__doc__ = ("KnOTS-DARE: ΔW = U Σ dare_ties(V_1ᵀ … V_Nᵀ), the blocks of ``knots_split`` merged by "
                      "DARE with TIES' sign election (the paper's DARE-TIES).")


def emr(deltas: torch.Tensor, weights: torch.Tensor, p: Params) -> torch.Tensor:
    """EMR-merging (Huang et al., NeurIPS 2024), one update per input from a shared one:
    elect γ = sign(Σ_i τ_i), ε = max_i |τ_i| over the i with sign(τ_i) = γ (element-wise), τ_uni = γ ⊙ ε;
    masks M_i = [τ_i ⊙ τ_uni > 0]; rescalers λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni|; ΔW_i = λ_i M_i ⊙ τ_uni.
    Tuning-free: no weights, no density. Returns (N, m, n)."""
    uni = emr_unified(deltas)
    masks = deltas * uni > 0
    kept = (masks * uni).abs().sum((1, 2))
    lam = deltas.abs().sum((1, 2)) / torch.where(kept > 0, kept, 1)
    return lam[:, None, None] * masks * uni


def emr_unified(deltas: torch.Tensor) -> torch.Tensor:
    """EMR's τ_uni = γ ⊙ max_i {|τ_i| : sign(τ_i) = γ}, γ = sign(Σ_i τ_i) (0 counted as +)."""
    gamma = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas)
    agree = deltas.sign() == gamma
    return gamma * (deltas.abs() * agree).amax(0)


@dataclass(frozen=True)
class Method:
    fn: Callable[[torch.Tensor, torch.Tensor, Params], torch.Tensor]
    density: bool = False  # takes --density
    weights: bool = True  # takes --weights
    per_input: bool = False  # one output per input (EMR)


METHODS: dict[str, Method] = {
    "linear": Method(linear),
    "task_arithmetic": Method(task_arithmetic),
    "ties": Method(ties, density=True),
    "dare_linear": Method(dare_linear, density=True),
    "dare_ties": Method(dare_ties, density=True),
    "knots_ties": Method(knots_ties, density=True),
    "knots_dare": Method(knots_dare, density=True),
    "emr": Method(emr, weights=False, per_input=True),
}
