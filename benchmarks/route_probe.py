"""Time and check the candidate routes to the base decomposition on one device.

Prints one line per route: median seconds per 4096-Gram decomposition, and the max-cos error it
causes against a float64 reference on a synthetic 4096 x 11008 matrix whose spectrum spans 10^3
(the regime where the float32 Gram route is known to fail). Used to choose scan's base route; the
numbers are in docs/performance.md.

    python benchmarks/route_probe.py --device cuda [--size 4096]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def timed(fn, device: torch.device, reps: int = 3) -> float:
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def spectrum_matrix(m: int, n: int, span: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """W = U diag(σ) Vᵀ with σ_i = (1 + i/10)^(-a), a chosen so that σ_1/σ_p = span (float64)."""
    import math

    g = torch.Generator(device="cpu").manual_seed(seed)
    p = min(m, n)
    a = math.log(span) / math.log(1 + (p - 1) / 10)
    s = (1 + torch.arange(p, dtype=torch.float64) / 10) ** (-a)
    U = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64).to(device)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64).to(device)).Q
    return (U * s.to(device)) @ V.T


def concurrent(fn, n_threads: int, n_jobs: int) -> float:
    """Wall time of n_jobs calls of fn spread over n_threads threads, each on its own CUDA stream."""
    jobs = list(range(n_jobs))
    lock = threading.Lock()

    def worker() -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            while True:
                with lock:
                    if not jobs:
                        break
                    jobs.pop()
                fn()
            stream.synchronize()

    torch.cuda.synchronize()
    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--wide", type=int, default=11008)
    args = ap.parse_args()
    dev = torch.device(args.device)
    m, n = args.size, args.wide
    rows: list[tuple[str, float, str]] = []

    W64 = spectrum_matrix(m, n, 1000.0, dev)
    W32 = W64.float()
    G64 = W64 @ W64.T
    G32 = W32 @ W32.T
    rows.append(("gram fp32 (m x n @ n x m)", timed(lambda: W32 @ W32.T, dev), ""))
    rows.append(("gram fp64", timed(lambda: W64 @ W64.T, dev), ""))
    rows.append(("eigh fp32", timed(lambda: torch.linalg.eigh(G32), dev), ""))
    rows.append(("eigh fp64", timed(lambda: torch.linalg.eigh(G64), dev), ""))
    rows.append(("eigvalsh fp32", timed(lambda: torch.linalg.eigvalsh(G32), dev), ""))
    rows.append(("eigvalsh fp64", timed(lambda: torch.linalg.eigvalsh(G64), dev), ""))
    rows.append(("svd fp32 m x n (baseline)", timed(lambda: torch.linalg.svd(W32, full_matrices=False), dev), ""))
    Wt32 = W32.T.contiguous()
    rows.append(("svd fp32 n x m (baseline)", timed(lambda: torch.linalg.svd(Wt32, full_matrices=False), dev), ""))
    Wsq = W32[:, :m].contiguous()
    rows.append(("svd fp32 m x m (baseline)", timed(lambda: torch.linalg.svd(Wsq, full_matrices=False), dev), ""))
    if dev.type == "cuda":
        for dt, G in (("fp32", G32), ("fp64", G64)):
            for nt in (1, 2, 4):
                t = concurrent(lambda G=G: torch.linalg.eigh(G), nt, 8) / 8
                rows.append((f"eigh {dt}, {nt} threads/streams, per matrix", t, ""))
            Gb = G.expand(4, m, m).contiguous()
            rows.append((f"eigh {dt} batched x4, per matrix", timed(lambda Gb=Gb: torch.linalg.eigh(Gb), dev) / 4, ""))
        host = torch.randn(m, n).to(torch.bfloat16)
        pinned = host.pin_memory()
        rows.append(("H2D pageable bf16 m x n", timed(lambda: host.to(dev), dev), f"{host.nbytes / 1e6:.0f} MB"))
        rows.append(("H2D pinned bf16 m x n", timed(lambda: pinned.to(dev, non_blocking=True), dev), ""))
        rows.append(("host copy into pinned", timed(lambda: pinned.copy_(host), dev), ""))
        from lorascope.spectral import LowRankDelta, Tuned, top_k

        B = torch.randn(m, 16, device=dev) * 0.5
        A = torch.randn(16, n, device=dev) / n**0.5
        op = Tuned(W32, LowRankDelta(B, A, 2.0))
        U0 = torch.linalg.eigh(G64).eigenvectors.flip(1)[:, :18].float()
        rows.append(("top_k k=10 low-rank (warm start)", timed(lambda: top_k(op, 10, init=U0), dev),
                     f"exact={top_k(op, 10, init=U0).exact}"))
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            rows.append(("eigh fp64 magma", timed(lambda: torch.linalg.eigh(G64), dev), ""))
            rows.append(("eigh fp32 magma", timed(lambda: torch.linalg.eigh(G32), dev), ""))
        except Exception as e:  # magma is not in every build
            rows.append(("magma", float("nan"), f"unavailable: {type(e).__name__}"))
        finally:
            torch.backends.cuda.preferred_linalg_library("default")

    # accuracy: max-cos of random-ish top vectors (an adapter's directions) against each basis
    ref = torch.linalg.eigh(G64).eigenvectors
    g = torch.Generator(device="cpu").manual_seed(1)
    Y = torch.linalg.qr(torch.randn(m, 10, generator=g, dtype=torch.float64).to(dev)).Q
    truth = (ref.T @ Y).abs().max(0).values

    def err(X: torch.Tensor) -> str:
        c = (X.double().T @ Y).abs().max(0).values
        return f"max-cos err {float((c - truth).abs().max()):.1e}"

    rows.append(("acc: eigh fp32 of fp32 gram", float("nan"), err(torch.linalg.eigh(G32).eigenvectors)))
    rows.append(("acc: eigh fp32 of fp64 gram", float("nan"), err(torch.linalg.eigh(G64.float()).eigenvectors)))
    rows.append(("acc: fp64 basis stored fp16", float("nan"), err(ref.half())))
    U32 = torch.linalg.svd(W32, full_matrices=False).U
    rows.append(("acc: svd fp32 (baseline)", float("nan"), err(U32)))
    for name, t, note in rows:
        print(f"{name:45s} {t:9.4f} s  {note}", flush=True)


if __name__ == "__main__":
    main()
