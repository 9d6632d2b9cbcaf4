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
        return lowrank_singular_values(delta.B, delta.A, abs(delta.scale))
    m, n = delta.shape
    gram = delta @ delta.T if m <= n else delta.T @ delta
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def lowrank_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``delta_singular_values`` of s·B A from its factors, for one update or a stack of them
    (B: (…, m, r), A: (…, r, n), scale ≥ 0 of shape (…, 1, 1)): the singular values of the core
    s·R_B R_Aᵀ."""
    rb = torch.linalg.qr(B).R
    ra = torch.linalg.qr(A.mT).R
    return torch.linalg.svdvals(scale * (rb @ ra.mT))


def lowrank_frobenius(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """‖s_i B_i A_i‖_F for a stack (B: (N, m, r), A: (N, r, n), scale: (N, 1, 1)), as in ``delta_frobenius``."""
    gram = (B.mT @ B) * (A @ A.mT)
    return scale.abs().flatten() * gram.sum(dim=(1, 2)).clamp_min(0).sqrt()


def lowrank_kurtosis(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``delta_kurtosis`` of each update s_i B_i A_i of a stack (B: (N, m, r), A: (N, r, n), scale:
    (N, 1, 1)), float64, NaN where undefined; ΔW formed ``block`` entries-rows at a time for all N,
    the sums kept on the device (one transfer for the caller, not one per block)."""
    N, m, _ = B.shape
    n = A.shape[-1]
    s = scale.double()
    A64 = A.double()
    total = s.flatten() * (B.double().sum(1)[:, None, :] @ A64.sum(2)[:, :, None]).flatten()  # s (1ᵀB)(A 1)
    mean = (total / (m * n))[:, None, None]
    m2 = torch.zeros(N, dtype=torch.float64, device=B.device)
    m4 = torch.zeros_like(m2)
    rows = max(1, block // N)
    for i in range(0, m, rows):
        c2 = (s * (B[:, i:i + rows].double() @ A64) - mean).square()
        m2 += c2.sum(dim=(1, 2))
        m4 += c2.square().sum(dim=(1, 2))
    m2, m4 = m2 / (m * n), m4 / (m * n)
    return torch.where(m2 > 0, m4 / m2.square() - 3.0, torch.nan)


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
    if isinstance(delta, LowRankDelta):  # Σ_ij ΔW_ij = s (1ᵀB)(A 1): the mean without forming ΔW
        scale = torch.tensor(delta.scale, dtype=torch.float64).to(delta.B.device).reshape(1, 1, 1)
        k = float(lowrank_kurtosis(delta.B[None], delta.A[None], scale, block)[0])
    else:
        m, n = delta.shape
        mean = delta.sum(dtype=torch.float64) / (m * n)
        m2 = m4 = torch.zeros((), dtype=torch.float64, device=delta.device)
        for i in range(0, m, block):
            c2 = (delta[i:i + block].double() - mean).square()
            m2, m4 = m2 + c2.sum(), m4 + c2.square().sum()
        m2, m4 = float(m2) / (m * n), float(m4) / (m * n)
        k = m4 / m2**2 - 3.0 if m2 > 0 else math.nan
    return k if math.isfinite(k) else None  # m_2 underflowing: undefined, not a number to store
