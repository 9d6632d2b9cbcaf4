"""Other exact routes to the base basis (issue "What the user waits for": the exact first-scan floor).

A first scan is bound by one float64 ``eigh`` of the Gram matrix G = W Wᵀ per base matrix
(``spectral.left_basis``). A route replaces it only if it is faster with a max-cos error ≤ 1e-5 on every
spectrum family. This script plants the truth: W = U diag(σ) Vᵀ in float64 with random orthogonal U, V
and σ from ``bench_spectra.family_spectrum`` (smooth, power law with outliers, SmolLM2 and MiniLM
profiles), so U is known exactly. For each route it prints the time and the largest max-cos error
against U over two sets of unit test vectors: random directions, and random combinations of the
smallest 30 % of U's columns (the tail, where an intruder's largest cosine often lies and where
float32 routes rotate vectors among themselves).

Routes:
- ``gram64``: float64 Gram, float64 ``eigh`` (what the scan does; the reference cost);
- ``gram32``: float32 ``eigh`` of the float64 Gram (the cheaper solver alone, for contrast);
- ``polar+eigh32``: polar decomposition first. With Wᵀ = Q R (float64 QR), R = P H by scaled Newton
  iterations X ← (μX + (μX)⁻ᵀ)/2 in float64, H = Pᵀ R = (W Wᵀ)^½, then a float32 ``eigh`` of H: its
  eigenvalues are σ, not σ², so the condition number is not squared;
- ``oa2``: Ogita–Aishima refinement (2018; clusters as in their 2019 part II) of a float32 ``eigh``:
  two float64 steps X ← X + X E from R = I − XᵀX and S = XᵀGX, pairs closer than δ = 2(‖S − D‖₂ +
  ‖G‖₂‖R‖₂) treated as one cluster, each cluster then rotated by a float64 ``eigh`` of its block of S.

    python benchmarks/exact_routes.py [--m 1024 --n 2816] [--device cpu] [--out routes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_spectra  # noqa: E402

FAMILIES = {"smooth": "q_proj", "powerlaw": "q_proj", "smollm2": "q_proj", "minilm": "q_proj"}  # q: the widest span


def planted(family: str, m: int, n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = bench_spectra.family_spectrum(family, FAMILIES[family], m, n).to(torch.float64)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    return ((U * s) @ V.T).to(device), U.to(device)


def test_vectors(U: torch.Tensor, seed: int = 1) -> torch.Tensor:
    m = U.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = torch.randn(m, 20, generator=g, dtype=torch.float64)
    tail = U[:, -int(0.3 * m):].cpu() @ torch.randn(int(0.3 * m), 20, generator=g, dtype=torch.float64)
    Y = torch.cat([rand, tail], 1).to(U.device)
    return Y / Y.norm(dim=0)


def max_cos_error(X: torch.Tensor, U: torch.Tensor, Y: torch.Tensor) -> float:
    truth = (U.T @ Y).abs().max(0).values
    X = X.double()
    X = X / X.norm(dim=0).clamp_min(1e-300)
    return float(((X.T @ Y).abs().max(0).values - truth).abs().max())


def gram64(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(W @ W.T).eigenvectors


def gram32(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh((W @ W.T).float()).eigenvectors


def polar_eigh32(W: torch.Tensor, max_iter: int = 40) -> torch.Tensor:
    R = torch.linalg.qr(W.T).R  # W Wᵀ = Rᵀ R
    X = R
    for _ in range(max_iter):
        Xi = torch.linalg.inv(X)
        mu = (torch.linalg.matrix_norm(Xi) / torch.linalg.matrix_norm(X)).sqrt()
        nxt = 0.5 * (mu * X + Xi.T / mu)
        done = torch.linalg.matrix_norm(nxt - X) <= 1e-14 * torch.linalg.matrix_norm(nxt)
        X = nxt
        if bool(done):
            break
    H = X.T @ R  # = (Rᵀ R)^½ = (W Wᵀ)^½
    H = 0.5 * (H + H.T)
    return torch.linalg.eigh(H.float()).eigenvectors


CLUSTERS: list[int] = []  # oa2's largest cluster per step, for the report


def oa2(W: torch.Tensor, steps: int = 2) -> torch.Tensor:
    CLUSTERS.clear()
    G = W @ W.T
    X = torch.linalg.eigh(G.float()).eigenvectors.double()
    m = G.shape[0]
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    normG = float(torch.linalg.matrix_norm(G, 2))
    for _ in range(steps):
        R = eye - X.T @ X
        S = X.T @ G @ X
        lam = S.diagonal() / (1 - R.diagonal())
        D = torch.diag(lam)
        delta = 2 * (float(torch.linalg.matrix_norm(S - D, 2)) + normG * float(torch.linalg.matrix_norm(R, 2)))
        diff = lam[None, :] - lam[:, None]  # λ_j − λ_i
        far = diff.abs() > delta
        E = torch.where(far, (S + lam[None, :] * R) / torch.where(far, diff, torch.ones_like(diff)), R / 2)
        X = X + X @ E
        # clusters (part II): consecutive sorted λ closer than δ; rotate each by its block of XᵀGX
        order = torch.argsort(lam)
        X = X[:, order]
        ls = lam[order]
        breaks = [0, *(int(i) + 1 for i in torch.nonzero(ls[1:] - ls[:-1] > delta).flatten()), m]
        CLUSTERS.append(max(b - a for a, b in zip(breaks[:-1], breaks[1:], strict=True)))
        for a, b in zip(breaks[:-1], breaks[1:], strict=True):
            if b - a > 1:
                block = X[:, a:b]
                block = torch.linalg.qr(block).Q
                _, Z = torch.linalg.eigh(block.T @ G @ block)
                X[:, a:b] = block @ Z
    return X


ROUTES = {"gram64": gram64, "gram32": gram32, "polar+eigh32": polar_eigh32, "oa2": oa2}


def timed(fn, W: torch.Tensor, reps: int) -> tuple[float, torch.Tensor]:
    out = fn(W)
    times = []
    for _ in range(reps):
        if W.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(W)
        if W.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--n", type=int, default=2816)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = []
    for family in FAMILIES:
        W, U = planted(family, args.m, args.n, dev)
        Y = test_vectors(U)
        for name, fn in ROUTES.items():
            seconds, X = timed(fn, W, args.reps)
            rows.append({"family": family, "route": name, "seconds": round(seconds, 4),
                         "max_cos_error": max_cos_error(X, U, Y)})
            if name == "oa2":
                rows[-1]["largest_cluster_per_step"] = list(CLUSTERS)
            print(f"{family:9s} {name:13s} {seconds * 1e3:9.1f} ms   max-cos error {rows[-1]['max_cos_error']:.2e}"
                  + (f"   largest cluster per step {CLUSTERS}" if name == "oa2" else ""), flush=True)
    report = {"m": args.m, "n": args.n, "device": str(dev), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
