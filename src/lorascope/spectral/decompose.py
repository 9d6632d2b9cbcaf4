"""Singular value decompositions, by the cheapest route that is exact enough for Alg. 1.

- ``left_basis(W)``: all left singular vectors of W (thin SVD) from the float64 eigendecomposition
  of the smaller Gram matrix, accumulated in blocks: the one base basis of scan, cache and mitigate.
- ``top_k(op, k)``: the top-k singular triplets of W_t = W_0 + ΔW by block Krylov iteration that
  touches W_t only through products, warm-started from the base's top vectors and the column space
  of the update; a residual check falls back to the exact route when it has not converged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorascope.spectral.operators import Tuned, TunedStack

_GRAM_BLOCK = {"cpu": 1 << 24, "cuda": 1 << 28}  # elements of W made float64 at a time: 128 MB, 2 GB
# On the CPU the Gram eigh of W_t beats the Krylov steps up to about this min(m, n) (2 cores, rank-16
# LoRA, top-10: 576 × 1536 26 vs 34 ms, 768 × 2048 50 vs 43 ms, 1024 × 2816 96 vs 53 ms): the scan's
# ``exact_up_to`` on the CPU.
CPU_EXACT_UP_TO = 640


@dataclass
class SVD:
    """Thin SVD pieces: W ≈ U diag(S) Vᵀ, singular values descending. ``exact`` tells whether the
    triplets came from a full decomposition or from converged subspace iteration; ``steps``: the
    Krylov steps ``top_k`` took (0 when it went to the exact route at once)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor | None = None
    exact: bool = True
    steps: int = 0


def left_basis(W: torch.Tensor, block: int | None = None) -> SVD:
    """All min(m, n) left singular vectors of W (m × n), descending, by the float64 Gram route.

    m ≤ n: W Wᵀ = Σ_b W[:, b] W[:, b]ᵀ accumulated over column blocks b in float64, then eigh:
    W Wᵀ = U Σ² Uᵀ. m > n: WᵀW = V Σ² Vᵀ from row blocks, then u_i = W v_i / ‖W v_i‖ row block by
    row block (columns with ‖W v_i‖ ≤ eps·max·max(m, n) are set to zero, as in ``left_basis``).
    Only blocks of W are ever float64; U is returned in W's dtype, S in float64.

    Why float64: the Gram matrix squares the condition number, so in float32 the vectors of small
    σ_i come out rotated among themselves (max |cos| errors of ~1e-2 against an SVD on spectra
    spanning 10³); in float64 they match ``torch.linalg.svd`` to ~1e-6. About 10x faster than
    ``torch.linalg.svd`` on a GPU.
    """
    m, n = W.shape
    f64 = torch.float64
    block = block or _GRAM_BLOCK.get(W.device.type, 1 << 24)
    if m <= n:
        G = torch.zeros(m, m, dtype=f64, device=W.device)
        step = max(1, block // max(m, 1))
        for j in range(0, n, step):
            Wb = W[:, j:j + step].to(f64)
            G.addmm_(Wb, Wb.T)
        evals, U = torch.linalg.eigh(G)
        del G
        return SVD(U=U.flip(1).to(W.dtype), S=evals.flip(0).clamp_min(0).sqrt())
    G = torch.zeros(n, n, dtype=f64, device=W.device)
    step = max(1, block // max(n, 1))
    for i in range(0, m, step):
        Wb = W[i:i + step].to(f64)
        G.addmm_(Wb.T, Wb)
    evals, V = torch.linalg.eigh(G)
    del G
    V = V.flip(1)
    S = evals.flip(0).clamp_min(0).sqrt()
    sq = torch.zeros(n, dtype=f64, device=W.device)
    U = torch.empty(m, n, dtype=W.dtype, device=W.device)
    for i in range(0, m, step):  # W V row block by row block; normalise the columns at the end
        P = W[i:i + step].to(f64) @ V
        sq += P.square().sum(0)
        U[i:i + step] = P.to(W.dtype)
    norms = sq.sqrt()
    tiny = norms <= torch.finfo(f64).eps * norms.max() * max(m, n)
    inv = torch.where(tiny, torch.zeros_like(norms), 1 / norms.clamp_min(torch.finfo(f64).tiny))
    U.mul_(inv.to(W.dtype))
    return SVD(U=U, S=S, V=V)


def exact_top_k(W: torch.Tensor, k: int, tol: float = 1e-4) -> SVD:
    """Top-k triplets of a dense W from the Gram eigendecomposition (exact route).

    The Gram matrix squares the condition: in float32, a LoRA direction ~100× σ_1(W_0) above a dense
    bulk rotates the bulk's vectors among themselves (max-cos off by 1e-2). So the triplets pass the
    test the Krylov route stops on, each residual r_j = max(‖W v_j − σ_j u_j‖, ‖Wᵀu_j − σ_j v_j‖)
    within max(tol·gap_j, eps·√max(m, n)·σ_1) (Wedin: the angle error is at most r_j / gap_j), and
    where one does not, the Gram matrix is formed and decomposed again in float64.
    """
    svd, S_all = _gram_top_k(W, k, W.dtype)
    if W.dtype != torch.float64 and not _resolved(W, svd, S_all, k, tol):
        svd, _ = _gram_top_k(W, k, torch.float64)
        svd = SVD(U=svd.U.to(W.dtype), S=svd.S.to(W.dtype), V=svd.V.to(W.dtype))
    return svd


def _gram_top_k(W: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[SVD, torch.Tensor]:
    """The top-k triplets by the Gram route in ``dtype``, and every singular value it found."""
    m, n = W.shape
    W = W.to(dtype)
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
    return SVD(U=U, S=S, V=V), evals.flip(0).clamp_min(0).sqrt()


def _resolved(W: torch.Tensor, svd: SVD, S_all: torch.Tensor, k: int, tol: float) -> bool:
    """Whether every top-k triplet meets ``top_k``'s stopping test (``exact_top_k``)."""
    if S_all.numel() < 2 or float(S_all[0]) == 0.0:
        return True
    U, S, V = svd.U, svd.S, svd.V
    residual = torch.maximum((W @ V - U * S).norm(dim=0), (W.T @ U - V * S).norm(dim=0)).double()
    return bool(_stops(residual, S_all.double(), min(k, S_all.numel()), tol, tuple(W.shape), W.dtype))


def _orth(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(X).Q


def top_k(
    op: Tuned,
    k: int,
    init: torch.Tensor | None = None,
    oversample: int = 16,
    max_iter: int = 30,
    tol: float = 1e-4,
    exact_up_to: int = 0,
) -> SVD:
    """Top-k singular triplets of W_t by block Krylov iteration on W_t W_tᵀ (products only).

    The start block Q_0 (l = k + oversample columns, plus the update's column space B for a LoRA
    ΔW: intruders appear in its span) is the base's top vectors when given. Step i adds the block
    Q_i = orth((W_t W_tᵀ) Q_{i-1} ⟂ all earlier blocks), so after q steps the basis Q spans the block
    Krylov space K_q = span{Q_0, (W_t W_tᵀ) Q_0, …, (W_t W_tᵀ)^q Q_0}, which converges like a Chebyshev
    polynomial in the gaps, much faster than subspace iteration (Musco & Musco 2015). Each step
    does Rayleigh–Ritz: with Z = W_tᵀ Q, ZᵀZ = Ũ Σ² Ũᵀ (eigh in float64), u_j = Q ũ_j and
    v_j = Z ũ_j / σ_j, so W_tᵀ u_j = σ_j v_j exactly; the other residual r_j = ‖W_t v_j − σ_j u_j‖
    bounds the angle error of u_j by r_j / gap_j (Wedin). We stop when every top-k r_j is at most
    max(tol · gap_j, floor), floor = eps·√max(m, n)·σ_1 being where rounding in W_t's dtype stops
    further progress (the exact route in that dtype is no more accurate there). Otherwise, or once
    the Krylov basis would exceed min(m, n)/2 columns, the exact route runs. It also runs at once where
    it is cheaper: when 2·l ≥ min(m, n), or min(m, n) ≤ ``exact_up_to`` (the scan passes
    ``CPU_EXACT_UP_TO`` on the CPU).

    Tuning (LLaMA-2-7B-shaped matrices, rank-16 LoRA and a full fine-tune; docs/performance.md):
    oversample 16 takes 3-6 Krylov steps and oversample 4 one more; every top-k vector converged,
    max-cos within 1e-5 of float64. Wider blocks cost little more on a GPU, where the products are
    bound by reading W_0 once per step.
    """
    return top_k_stack(TunedStack(op.W0, [op.delta]), k, init, oversample, max_iter, tol, exact_up_to)[0]


def top_k_stack(
    stack: TunedStack,
    k: int,
    init: torch.Tensor | None = None,
    oversample: int = 16,
    max_iter: int = 30,
    tol: float = 1e-4,
    exact_up_to: int = 0,
) -> list[SVD]:
    """``top_k`` of each matrix of a stack (N LoRA updates of one base and rank, or one matrix), all
    N iterations run together: every step is one product with W_0 for all N blocks, batched low-rank
    products, batched QR and ``eigh``, and one look at the residuals. A matrix leaves the batch at the
    step where its own test is met, so its triplets are those of its own run (to float32 rounding of
    the batched products; one matrix runs exactly ``Tuned``'s products)."""
    m, n = stack.shape
    N = len(stack)
    width = min(k + oversample, m, n)
    W0 = stack.W0
    dtype, device = W0.dtype, W0.device
    if 2 * width >= min(m, n) or min(m, n) <= exact_up_to:
        return [exact_top_k(stack.dense(i), k) for i in range(N)]  # small matrices: cheap and certain
    blocks = [init[:, :width].expand(N, m, width)] if init is not None else []
    if stack.start() is not None:
        blocks.append(stack.start().to(dtype))  # intruders appear in the span of B: start there
    Q = torch.cat(blocks, dim=2) if blocks else torch.empty(N, m, 0, dtype=dtype, device=device)
    if Q.shape[2] < width:
        g = torch.Generator(device="cpu").manual_seed(0)
        extra = torch.randn(m, width - Q.shape[2], generator=g, dtype=dtype).to(device)
        Q = torch.cat([Q, extra.expand(N, m, extra.shape[1])], dim=2)
    Q = _orth(Q)
    Qs, Zs, Ys = [Q], [], []
    out: list[SVD | None] = [None] * N
    active = list(range(N))  # members of ``stack`` still iterating, as indices into the original stack
    step = 0
    for step in range(1, max_iter + 1):
        Zs.append(stack.rmm(Qs[-1]))  # W_tᵀ Q_i
        Ys.append(stack.mm(Zs[-1]))  # W_t W_tᵀ Q_i
        Qb, Z, Y = torch.cat(Qs, 2), torch.cat(Zs, 2), torch.cat(Ys, 2)
        Z64 = Z.double()
        evals, Ug = torch.linalg.eigh(Z64.mT @ Z64)  # Rayleigh–Ritz on span(Qb): Ritz values σ²
        evals, Ug = evals.flip(-1).clamp_min(0), Ug.flip(-1)
        ritz = evals.sqrt()
        S = ritz[:, :k]
        Uk = Ug[:, :, :k].to(dtype)
        Sk = S.clamp_min(torch.finfo(torch.float64).tiny).to(dtype)[:, None, :]
        U = Qb @ Uk
        residual = ((Y @ Uk) / Sk - U * Sk).norm(dim=1).double()
        done = _stops(residual, ritz, k, tol, (m, n), dtype).tolist()  # one sync
        for j, ok in enumerate(done):
            if ok:
                out[active[j]] = SVD(U=U[j], S=S[j].to(dtype), V=(Z[j] @ Uk[j]) / Sk[j], exact=False, steps=step)
        if all(done):
            return out
        if Qb.shape[2] + width > min(m, n) // 2:
            break
        if any(done):  # the converged leave the batch
            keep = [j for j, ok in enumerate(done) if not ok]
            stack = stack.select(keep)
            active = [active[j] for j in keep]
            idx = torch.tensor(keep, device=device)
            Qs, Zs, Ys = ([t.index_select(0, idx) for t in ts] for ts in (Qs, Zs, Ys))
            Qb = Qb.index_select(0, idx)
        nxt = _orth(Ys[-1] - Qb @ (Qb.mT @ Ys[-1]))  # block Gram–Schmidt, repeated after normalising
        Qs.append(_orth(nxt - Qb @ (Qb.mT @ nxt)))  # so the new block stays orthogonal in float32
    for j, i in enumerate(active):
        fallback = exact_top_k(stack.dense(j), k)
        fallback.steps = step
        out[i] = fallback
    return out


def _stops(residual: torch.Tensor, s: torch.Tensor, k: int, tol: float, shape: tuple[int, int],
           dtype: torch.dtype) -> torch.Tensor:
    """``top_k``'s stopping test, per row: every top-k residual r_j within max(tol·gap_j, floor·σ_1),
    floor = eps·√max(m, n) in the products' ``dtype`` (Wedin: the angle error is at most r_j / gap_j);
    ``s`` holds every Ritz / singular value found, descending."""
    floor = torch.finfo(dtype).eps * max(shape) ** 0.5
    return (residual <= torch.maximum(tol * _gaps(s, k), floor * s[..., :1])).all(dim=-1)


def _gaps(s: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each of the top-k values to its nearest other value in ``s`` (descending; a
    leading batch dimension allowed)."""
    d = (s[..., :k, None] - s[..., None, :]).abs()
    idx = torch.arange(k, device=s.device)
    d[..., idx, idx] = float("inf")
    return d.min(dim=-1).values
