"""The λ intervention of paper §5 on one matrix, and its exact LoRA form.

For one weight matrix in (out, in) layout, W_t = W_0 + ΔW with SVD W_t = Σ_j σ_j u_j v_jᵀ, and
the intruders I ⊆ {0..k-1}: top-k left vectors u_j with max_i |cos(u_j, x_i)| < ε over all left
singular vectors x_i of W_0 (Alg. 1). The intervention of §5 sets σ_j ← λσ_j for j ∈ I:

    W_t' = W_t + (λ − 1) Σ_{j∈I} σ_j u_j v_jᵀ                                       (1)

``which="top1"`` takes I = {the highest-ranked intruder} (the paper's experiment), ``which="all"``
every intruder in the top-k (PEFT's ``reduce_intruder_dimension``). λ = 0 removes the directions,
λ = 1 is the identity, λ ∈ [0, 2].

Control (``control="neighbour"``): for each chosen intruder j, the pre-trained singular triplet it
matches best, i* = argmax_i |cos(u_j, x_i)|, is scaled instead (each i* once):

    W_t' = W_t + (λ − 1) Σ_{i*} σ⁰_{i*} x_{i*} y_{i*}ᵀ,   y_{i*} = W_0ᵀ x_{i*} / σ⁰_{i*}          (2)

i.e. W_0's own σ⁰_{i*} becomes λσ⁰_{i*} and ΔW is untouched, so the same λ hits a direction the
fine-tune did not create.

Both corrections are rank p = |I| and are applied as C D with C = (λ−1) U_I Σ_I^½, D = Σ_I^½ V_Iᵀ.
A LoRA update ΔW = s·B A then stays exact as a LoRA of rank r + p:

    s·B' A' = s·B A + C D,   B' = [B | C / s],   A' = [A ; D]                        (3)

with the module's rank and alpha in ``rank_pattern`` / ``alpha_pattern`` (α' = s·r', or s·√r' with
rsLoRA) so that PEFT's scaling is s again; B and A are kept bit for bit. ``compress=R`` re-factorises
s·B'A' to rank R by the SVD of its (r+p)×(r+p) core (QR of both factors; never an m×n SVD).

All decompositions run in float64: the base basis by ``left_basis``, and the top-k of W_t by block
Krylov in float64 (``top_k`` with ``tol=EDIT_TOL``: it stops only when every residual
‖W_t v_j − σ_j u_j‖ ≤ 1e-10·gap_j, which bounds each u_j's angle error by 1e-10 (Wedin), and runs
the exact Gram route itself where that is not reached). So u_j, σ_j, v_j are the SVD's triplets to
float64 accuracy and (1) is exact, at the cost of a few products with W_t instead of a second
float64 eigendecomposition of an m×m Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascope.errors import InputError
from lorascope.schema import ScaledDirection
from lorascope.spectral.decompose import SVD, left_basis, top_k
from lorascope.spectral.intruders import max_abs_cos
from lorascope.spectral.operators import Delta, Tuned

EDIT_TOL = 1e-10  # Krylov stop: angle error of each edited u_j at most this (float64)


@dataclass
class Plan:
    """What to do to one matrix: W_t' = W_t + C @ D (Eqs. 1-2), plus Alg. 1's numbers."""

    C: torch.Tensor  # (m, p)
    D: torch.Tensor  # (p, n)
    directions: list[ScaledDirection]
    tuned: SVD  # top-k of W_t
    max_cos: torch.Tensor
    best_match: torch.Tensor
    n_intruders: int


# On the CPU the float64 Gram eigh of W_t beats Krylov to EDIT_TOL up to at least this min(m, n) (2 cores,
# rank-16 LoRA, top-10: 576 × 1536 45 vs 105 ms, 768 × 2048 90 vs 145 ms, 1024 × 2816 168 vs 187 ms;
# below ~600 the Krylov basis outgrows min(m, n)/2 before 1e-10 and falls back to it anyway).
_CPU_EXACT_UP_TO = 1024


def plan_matrix(
    W0: torch.Tensor,
    Wt: torch.Tensor,
    k: int,
    epsilon: float,
    lam: float,
    which: str = "top1",
    control: str | None = None,
    delta: Delta | None = None,
) -> Plan:
    """Find the intruders of W_t against W_0 (Alg. 1) and the rank-p correction of Eq. (1) or (2).

    W0 and Wt are dense (out, in) matrices; pass float64 for exact triplets. ``delta`` (ΔW = W_t − W_0,
    e.g. a LoRA's factors) lets the Krylov start in the update's column space, where intruders live.
    """
    base = left_basis(W0)
    op = Tuned(W0, delta if delta is not None else Wt - W0)
    exact_up_to = _CPU_EXACT_UP_TO if W0.device.type == "cpu" else 0
    tuned = top_k(op, k, init=base.U, tol=EDIT_TOL, max_iter=60, exact_up_to=exact_up_to)
    cos, match = max_abs_cos(tuned.U, base.U)
    intruders = [j for j in range(k) if cos[j] < epsilon]
    chosen = intruders[:1] if which == "top1" else intruders
    directions: list[ScaledDirection] = []
    if control is None:
        cols = chosen
        U, S, V = tuned.U[:, cols], tuned.S[cols], tuned.V[:, cols]
        for j in chosen:
            directions.append(ScaledDirection("intruder", j, float(cos[j]), int(match[j]),
                                              float(tuned.S[j]), float(lam * tuned.S[j])))
    else:  # the neighbour control, Eq. (2): each best-matching base triplet once
        cols = []
        for j in chosen:
            i = int(match[j])
            if i not in cols:
                cols.append(i)
                directions.append(ScaledDirection("neighbour", j, float(cos[j]), i, float(base.S[i]),
                                                  float(lam * base.S[i])))
        U, S = base.U[:, cols], base.S[cols]
        V = (W0.T @ U) / S.clamp_min(torch.finfo(W0.dtype).tiny)
    root = S.clamp_min(0).sqrt()
    C = (lam - 1.0) * U * root
    D = (V * root).T
    return Plan(C=C, D=D, directions=directions, tuned=tuned, max_cos=cos, best_match=match,
                n_intruders=len(intruders))


def extend_factors(
    B: torch.Tensor, A: torch.Tensor, scale: float, C: torch.Tensor, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3): B' = [B | C/s], A' = [A ; D], so that s·B'A' = s·BA + CD exactly."""
    if scale == 0:
        raise InputError("the adapter's scaling α/r is 0: it changes nothing, there is nothing to mitigate")
    return torch.cat([B, C / scale], dim=1), torch.cat([A, D], dim=0)


def compress_factors(
    B: torch.Tensor, A: torch.Tensor, scale: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-R factors of s·B A (Eckart–Young) without forming it.

    s·B = Q_B R_B and Aᵀ = Q_A R_A (thin QR) give s·BA = Q_B (R_B R_Aᵀ) Q_Aᵀ; with the core's SVD
    R_B R_Aᵀ = Ũ Σ Ṽᵀ, the factors are B_R = Q_B Ũ_R Σ_R^½ and A_R = Σ_R^½ Ṽ_Rᵀ Q_Aᵀ (scale 1).
    Returns (B_R, A_R, ‖Σ_{>R}‖ / ‖Σ‖), the relative Frobenius error of the truncation.
    """
    qb, rb = torch.linalg.qr(scale * B)
    qa, ra = torch.linalg.qr(A.T)
    Uc, Sc, Vhc = torch.linalg.svd(rb @ ra.T)
    R = min(rank, Sc.numel())
    root = Sc[:R].sqrt()
    total = float(Sc.norm())
    err = float(Sc[R:].norm()) / total if total > 0 else 0.0
    return qb @ (Uc[:, :R] * root), (root[:, None] * Vhc[:R]) @ qa.T, err
