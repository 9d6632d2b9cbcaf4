"""The spectral maths against float64 references and planted ground truth (paper App. A.2)."""

import math

import pytest
import torch

from lorascope.scanning.analyze import analyze_matrix
from lorascope.spectral import (
    LowRankDelta,
    Tuned,
    delta_frobenius,
    delta_singular_values,
    effective_rank,
    exact_top_k,
    left_basis,
    max_abs_cos,
    null_max_cos,
    stable_rank,
    top_k,
)


def reference_alg1(W0: torch.Tensor, Wt: torch.Tensor, k: int, epsilon: float):
    """Paper Alg. 1 verbatim, in float64 with full SVDs: for each of the top-k left singular vectors
    of W_t, the max |cos| against every left singular vector of W_0."""
    U0, _, _ = torch.linalg.svd(W0.double(), full_matrices=False)
    Ut, St, _ = torch.linalg.svd(Wt.double(), full_matrices=False)
    sims = []
    for j in range(k):
        sims.append(max(abs(float(U0[:, i] @ Ut[:, j])) for i in range(U0.shape[1])))
    return St[:k], torch.tensor(sims, dtype=torch.float64), sum(s < epsilon for s in sims)


def decaying(m: int, n: int, seed: int, top: float = 10.0, bottom: float = 0.1):
    """W = U diag(σ) Vᵀ with a log-spaced spectrum, like trained weights; returns W, U, σ, V."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(math.log10(top), math.log10(bottom), min(m, n), dtype=torch.float64)
    d = min(m, n)
    return (U[:, :d] * s) @ V[:, :d].T, U[:, :d], s, V[:, :d]


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (80, 80)])
def test_left_basis_matches_svd(shape):
    W, U, s, _ = decaying(*shape, seed=1)
    b = left_basis(W)
    assert torch.allclose(b.S, s, rtol=1e-9, atol=1e-10)
    # singular vectors agree up to sign
    assert torch.allclose((b.U * U).sum(0).abs(), torch.ones(len(s), dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("shape", [(128, 96), (96, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_agrees_with_float64_alg1_on_random_matrices(shape, dtype):
    m, n = shape
    W0, *_ = decaying(m, n, seed=2)
    g = torch.Generator().manual_seed(3)
    delta = LowRankDelta(torch.randn(m, 4, generator=g, dtype=torch.float64),
                         torch.randn(4, n, generator=g, dtype=torch.float64), scale=0.8)
    k, eps = 10, 0.5
    S_ref, cos_ref, n_ref = reference_alg1(W0, W0 + delta.dense(), k, eps)
    (rec,) = analyze_matrix("layers.0.q.weight", "linear", W0.to(dtype), delta.to("cpu", dtype), k, eps)
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    assert torch.allclose(torch.tensor(rec.singular_values, dtype=torch.float64), S_ref, rtol=tol)
    assert torch.allclose(torch.tensor(rec.max_cos, dtype=torch.float64), cos_ref, atol=tol)
    assert rec.n_intruders == n_ref
    assert rec.layer == 0 and rec.module_type == "q"


def planted(m=120, n=100, n_planted=3, seed=4):
    """W_t = W_0 + Σ_j λ_j a_j b_jᵀ with a_j far from every left singular vector of W_0 and λ_j above
    σ_1(W_0), so the planted a_j are exactly the intruders among the top-k."""
    W0, U0, s, _ = decaying(m, n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    # a_j: equal-magnitude mix of all base directions, i.e. |cos| = 1/sqrt(n) with each: far from all
    signs = torch.randint(0, 2, (n, n_planted), generator=g).double() * 2 - 1
    A = torch.linalg.qr(U0 @ signs).Q
    B = torch.linalg.qr(torch.randn(n, n_planted, generator=g, dtype=torch.float64)).Q
    lam = torch.tensor([30.0, 22.0, 15.0][:n_planted], dtype=torch.float64)
    return W0, LowRankDelta(A * lam, B.T, 1.0), A


def test_planted_intruders_are_found_exactly():
    W0, delta, A = planted()
    (rec,) = analyze_matrix("w", "linear", W0.float(), delta.to("cpu", torch.float32), 10, 0.5)
    flagged = [j for j, c in enumerate(rec.max_cos) if c < 0.5]
    assert flagged == [0, 1, 2]
    assert rec.n_intruders == 3
    # the flagged singular values are the planted strengths (planted directions dominate the spectrum)
    assert rec.singular_values[0] == pytest.approx(30.0, rel=0.05)
    # everything else stays matched to a base vector (perturbed by the planted update, not replaced)
    assert min(rec.max_cos[3:]) > 0.7
    # the rank of the update is exactly the number planted
    assert rec.delta_effective_rank <= 3.0 + 1e-6
    assert len([s for s in rec.delta_singular_values if s > 1e-6]) == 3


def test_small_noise_makes_no_intruders():
    W0, *_ = decaying(120, 100, seed=5)
    g = torch.Generator().manual_seed(6)
    noise = 1e-3 * torch.randn(120, 100, generator=g, dtype=torch.float64)
    (rec,) = analyze_matrix("w", "linear", W0.float(), noise.float(), 10, 0.5)
    assert rec.n_intruders == 0
    assert min(rec.max_cos) > 0.99


def test_right_side_is_left_side_of_transpose():
    W0, delta, _ = planted()
    left, right = analyze_matrix("w", "linear", W0, delta, 10, 0.5, sides=("left", "right"))
    (rt,) = analyze_matrix("w", "linear", W0.T.contiguous(), delta.T(), 10, 0.5)
    assert right.side == "right" and left.side == "left"
    assert right.max_cos == pytest.approx(rt.max_cos, abs=1e-6)
    # planted updates live in the left space only as structured directions; right side B is random
    assert left.n_intruders == 3


def test_top_k_dense_and_lowrank_match_exact():
    W0, *_ = decaying(90, 70, seed=7)
    g = torch.Generator().manual_seed(8)
    dense = 0.3 * torch.randn(90, 70, generator=g, dtype=torch.float64)
    for delta in (dense, LowRankDelta(torch.randn(90, 2, generator=g, dtype=torch.float64),
                                      torch.randn(2, 70, generator=g, dtype=torch.float64), 2.0)):
        op = Tuned(W0, delta)
        got, ref = top_k(op, 5), exact_top_k(op.dense(), 5)
        assert torch.allclose(got.S, ref.S, rtol=1e-8)
        assert torch.allclose((got.U * ref.U).sum(0).abs(), torch.ones(5, dtype=torch.float64), atol=1e-6)


def test_a_stack_of_lora_updates_gives_each_its_own_top_k():
    """top_k_stack runs N same-rank LoRA updates of one base together; each gets the triplets of its
    own top_k (members leave the batch at their own step, or fall back to the exact route) and they
    match float64 SVDs of W_t."""
    from lorascope.spectral.decompose import top_k_stack
    from lorascope.spectral.operators import TunedStack

    W0, *_ = decaying(400, 600, seed=3, top=5.0, bottom=0.05)
    W0 = W0.float()
    U0 = left_basis(W0).U
    g = torch.Generator().manual_seed(4)
    deltas = [LowRankDelta(torch.randn(400, 4, generator=g), torch.randn(4, 600, generator=g), scale)
              for scale in (0.02, 0.05, 0.1, 0.3, 1.0)]  # these take 4-6 Krylov steps alone
    for max_iter in (30, 4):  # 4: the members that need more fall back to the exact route
        stacked = top_k_stack(TunedStack(W0, deltas), 10, init=U0, max_iter=max_iter)
        steps = set()
        for d, got in zip(deltas, stacked, strict=True):
            alone = top_k(Tuned(W0, d), 10, init=U0, max_iter=max_iter)
            assert (got.steps, got.exact) == (alone.steps, alone.exact)
            steps.add((got.steps, got.exact))
            assert torch.allclose(got.S, alone.S, rtol=1e-6)
            assert torch.allclose((got.U * alone.U).sum(0).abs(), torch.ones(10), atol=1e-5)
            Ut, St, _ = torch.linalg.svd(Tuned(W0.double(), d.to("cpu", torch.float64)).dense())
            # float32: each σ is within ~eps·σ_max of the truth, so the bound is on σ_max's scale
            assert torch.allclose(got.S.double(), St[:10], rtol=0, atol=2e-6 * float(St[0]))
            assert float((1 - (got.U.double() * Ut[:, :10]).sum(0).abs()).abs().max()) < 1e-5
        if max_iter == 30:  # at 4 every member may fall back, depending on the BLAS thread count
            assert len(steps) > 1  # the members did not all stop at the same step


def test_exact_route_resolves_a_dense_bulk_under_a_large_spike():
    """float32's Gram matrix rotates the bulk vectors among themselves when a LoRA direction is
    ~100× the base's σ_1 (max-cos off by ~1e-2); exact_top_k sees it from the gaps and redoes the
    Gram matrix in float64, so every top-k vector matches a float64 SVD."""
    from lorascope.spectral.decompose import exact_top_k

    W0, *_ = decaying(400, 600, seed=3, top=5.0, bottom=0.05)
    g = torch.Generator().manual_seed(4)
    Wt = W0 + torch.randn(400, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 600, generator=g).double()
    Ut, St, _ = torch.linalg.svd(Wt)
    for threads in (1, 2):  # the float32 error depends on the BLAS blocking; the bound must hold for each
        with torch.inference_mode():
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = exact_top_k(Wt.float(), 10)
            finally:
                torch.set_num_threads(old)
        assert float((1 - (got.U.double() * Ut[:, :10]).sum(0).abs()).max()) < 1e-6
        assert torch.allclose(got.S.double(), St[:10], rtol=1e-6)


def test_lora_core_singular_values_equal_dense_svd():
    g = torch.Generator().manual_seed(9)
    d = LowRankDelta(torch.randn(50, 6, generator=g, dtype=torch.float64),
                     torch.randn(6, 40, generator=g, dtype=torch.float64), scale=0.25)
    ref = torch.linalg.svdvals(d.dense())[:6]
    assert torch.allclose(delta_singular_values(d), ref, rtol=1e-10)
    assert torch.allclose(delta_singular_values(d.dense())[:6], ref, rtol=1e-6)
    assert delta_frobenius(d) == pytest.approx(float(d.dense().norm()), rel=1e-10)


def test_effective_and_stable_rank_formulas():
    # equal singular values: erank = number of them; stable rank too
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert stable_rank(torch.ones(7)) == pytest.approx(7.0)
    s = torch.tensor([3.0, 1.0, 0.0])
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert stable_rank(s) == pytest.approx(10 / 9)


def test_max_abs_cos_and_null_reference():
    X = torch.eye(4, dtype=torch.float64)
    Y = torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    best, idx = max_abs_cos(Y, X)
    assert best.tolist() == pytest.approx([0.8, 1.0]) and idx.tolist() == [1, 2]
    null = null_max_cos(256, 256)
    assert 1 / 16 <= null["mean"] < null["q99"] < 0.5
