"""Spectrum of the update ΔW and the ranks derived from it."""

from __future__ import annotations

import math

import torch

from lorascope.spectral.operators import Delta, LowRankDelta


def delta_singular_values(delta: Delta) -> torch.Tensor:
    """Singular values of ΔW, descending.

    Low-rank ΔW = s·B A (B: m×r, A: r×n): with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR),
    ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ and Q_B, Q_A have orthonormal columns, so the singular values of ΔW
    are exactly those of the r×r core s·R_B R_Aᵀ. The m×n product is never formed.
    Dense ΔW: eigenvalues of the smaller Gram matrix.
    """
    if isinstance(delta, LowRankDelta):
        rb = torch.linalg.qr(delta.B).R
        ra = torch.linalg.qr(delta.A.T).R
        return torch.linalg.svdvals(abs(delta.scale) * (rb @ ra.T))
    m, n = delta.shape
    gram = delta @ delta.T if m <= n else delta.T @ delta
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): erank = exp(H(p)), p_i = σ_i / Σ_j σ_j, H(p) = −Σ p_i log p_i (0 log 0 = 0)."""
    s = s.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖_2² = Σ σ_i² / σ_1²."""
    s = s.double()
    return float((s**2).sum() / s[0] ** 2) if s.numel() and s[0] > 0 else 0.0


def delta_frobenius(delta: Delta) -> float:
    """‖ΔW‖_F, from the r×r Gram factors for a low-rank ΔW: ‖sBA‖_F² = s²·tr((BᵀB)(AAᵀ))."""
    if isinstance(delta, LowRankDelta):
        gram = (delta.B.T @ delta.B) * (delta.A @ delta.A.T)
        return float(abs(delta.scale) * gram.sum().clamp_min(0).sqrt())
    return float(delta.norm())


def delta_kurtosis(delta: Delta, block: int = 1024) -> float | None:
    """Excess kurtosis of the entries x of ΔW (Fisher): m_4 / m_2² − 3, m_p = mean((x − x̄)^p), in
    float64 over row blocks (a LoRA ΔW is formed block by block, never whole). 0 for Gaussian entries;
    heavy tails (a few large entries) give large values. None when ΔW is constant (m_2 = 0)."""
    m, n = delta.shape

    def rows(i: int) -> torch.Tensor:
        if isinstance(delta, LowRankDelta):
            return delta.scale * (delta.B[i:i + block].double() @ delta.A.double())
        return delta[i:i + block].double()

    if isinstance(delta, LowRankDelta):  # Σ_ij ΔW_ij = s (1ᵀB)(A 1): the mean without forming ΔW
        total = delta.scale * float(delta.B.double().sum(0) @ delta.A.double().sum(1))
    else:
        total = float(delta.sum(dtype=torch.float64))
    mean = total / (m * n)
    m2 = m4 = 0.0
    for i in range(0, m, block):
        c2 = (rows(i) - mean) ** 2
        m2, m4 = m2 + float(c2.sum()), m4 + float((c2 * c2).sum())
    m2, m4 = m2 / (m * n), m4 / (m * n)
    k = m4 / m2**2 - 3.0 if m2 > 0 else math.nan
    return k if math.isfinite(k) else None  # m_2 underflowing: undefined, not a number to store
