"""Singular value decompositions, by the cheapest route that is exact enough for Alg. 1.

- ``left_basis(W)``: all left singular vectors of W (thin SVD) from the eigendecomposition of the
  smaller Gram matrix, about 10x faster than ``torch.linalg.svd`` on a GPU.
- ``top_k(op, k)``: the top-k singular triplets of W_t = W_0 + ΔW by block subspace iteration that
  touches W_t only through products, warm-started from the base's top vectors and the column space
  of the update; a residual check falls back to the exact route when it has not converged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascope.spectral.operators import LowRankDelta, Tuned


@dataclass
class SVD:
    """Thin SVD pieces: W ≈ U diag(S) Vᵀ, singular values descending. ``exact`` tells whether the
    triplets came from a full decomposition or from converged subspace iteration."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor | None = None
    exact: bool = True


def left_basis(W: torch.Tensor) -> SVD:
    """All min(m, n) left singular vectors of W (m × n), descending, via the Gram matrix.

    m ≤ n: W Wᵀ = U Σ² Uᵀ gives U directly (eigh of an m × m matrix).
    m > n: WᵀW = V Σ² Vᵀ, then u_i = W v_i / ‖W v_i‖ (unit by construction; a column for σ_i = 0
    is set to zero, since the SVD leaves its direction arbitrary).

    The Gram matrix squares the condition number: in float32 the vectors of small σ_i come out
    rotated among themselves (max |cos| errors of ~1e-2 against an SVD on spectra spanning 10³).
    Pass a float64 W (the scan does) and the vectors match ``torch.linalg.svd`` to ~1e-6.
    """
    m, n = W.shape
    if m <= n:
        evals, U = torch.linalg.eigh(W @ W.T)
        evals, U = evals.flip(0), U.flip(1)
        return SVD(U=U, S=evals.clamp_min(0).sqrt())
    evals, V = torch.linalg.eigh(W.T @ W)
    evals, V = evals.flip(0), V.flip(1)
    WV = W @ V
    norms = WV.norm(dim=0)
    tiny = norms <= torch.finfo(W.dtype).eps * norms.max() * max(m, n)
    U = torch.where(tiny, torch.zeros_like(WV), WV / norms.clamp_min(torch.finfo(W.dtype).tiny))
    return SVD(U=U, S=evals.clamp_min(0).sqrt(), V=V)


def full_svd(W: torch.Tensor) -> SVD:
    """Reference route: ``torch.linalg.svd`` (what the paper's code and PEFT use)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return SVD(U=U, S=S, V=Vh.T)


def exact_top_k(W: torch.Tensor, k: int) -> SVD:
    """Top-k triplets of a dense W from the Gram eigendecomposition (exact route)."""
    m, n = W.shape
    if m <= n:
        evals, U = torch.linalg.eigh(W @ W.T)
        U, S = U.flip(1)[:, :k], evals.flip(0)[:k].clamp_min(0).sqrt()
        V = W.T @ U
        V = V / V.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
    else:
        evals, V = torch.linalg.eigh(W.T @ W)
        V, S = V.flip(1)[:, :k], evals.flip(0)[:k].clamp_min(0).sqrt()
        U = W @ V
        U = U / U.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
    return SVD(U=U, S=S, V=V)


def _orth(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def top_k(
    op: Tuned,
    k: int,
    init: torch.Tensor | None = None,
    oversample: int = 8,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> SVD:
    """Top-k singular triplets of W_t by block subspace iteration on W_t W_tᵀ.

    Q spans an l-dimensional guess of the top left subspace (l = k + oversample, plus the update's
    column space). Each step Q ← orth(W_t W_tᵀ Q); then Rayleigh–Ritz: C = Qᵀ W_t = Ũ Σ Vᵀ, u = Q Ũ.
    By construction W_tᵀ u_j = σ_j v_j exactly; the other residual r_j = ‖W_t v_j − σ_j u_j‖ bounds
    the angle error of u_j by r_j / gap_j (Wedin). We stop when r_j ≤ tol·σ_1·gap_j/σ_1 for all
    j ≤ k, i.e. when every top-k vector is accurate to about ``tol``; otherwise the exact route runs.
    """
    m, n = op.shape
    width = min(k + oversample, m, n)
    blocks = [init] if init is not None else []
    if isinstance(op.delta, LowRankDelta):
        blocks.append(op.delta.B)  # intruders appear in the span of B: start there
    if blocks:
        Q = torch.cat(blocks, dim=1)
        if Q.shape[1] < width:
            g = torch.Generator(device="cpu").manual_seed(0)
            extra = torch.randn(m, width - Q.shape[1], generator=g, dtype=Q.dtype).to(Q.device)
            Q = torch.cat([Q, extra], dim=1)
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        Q = torch.randn(m, width, generator=g, dtype=op.W0.dtype).to(op.W0.device)
    Q = _orth(Q[:, : min(Q.shape[1], m, n)])
    for _ in range(max_iter):
        Q = _orth(op.mm(op.rmm(Q)))
        C = op.rmm(Q).T  # Qᵀ W_t, (l', n)
        Ut, S, Vh = torch.linalg.svd(C, full_matrices=False)
        U, V = Q @ Ut[:, :k], Vh[:k].T
        S = S[:k]
        residual = (op.mm(V) - U * S).norm(dim=0)
        ritz = torch.linalg.svdvals(C)
        gaps = _gaps(ritz, k)
        if bool((residual <= tol * gaps.clamp_min(tol * ritz[0])).all()):
            return SVD(U=U, S=S, V=V, exact=False)
    return exact_top_k(op.dense(), k)


def _gaps(s: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each of the top-k values to its nearest other value in ``s`` (descending)."""
    d = (s[:k, None] - s[None, :]).abs()
    idx = torch.arange(k, device=s.device)
    d[idx, idx] = float("inf")
    return d.min(dim=1).values
