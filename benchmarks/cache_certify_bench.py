"""What certifying a cached basis costs, next to reading it (docs/performance.md, cache section).

Builds one m × n float32 base matrix with an LLM-like spectrum (a few large singular values over a
Marchenko–Pastur bulk), computes its basis with ``left_basis`` (timed: what a miss costs), writes
it to a fresh ``BasisCache`` and then times, median of ``--reps``:

- read: ``BasisCache.load`` (safetensors read from the page cache) and U to the compute dtype, i.e.
  what an uncertified hit cost before;
- read + certify: what a hit costs now (``certify`` hands the scan U in the compute dtype, so the
  conversion is not paid twice);
- certify alone (all five checks, float32 arithmetic on the device);

and prints them side by side with their ratio.

    python benchmarks/cache_certify_bench.py [--shape 4096x4096] [--device cpu|cuda] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from lorascope.scanning.cache import BasisCache, certify
from lorascope.spectral import left_basis


def llm_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian bulk (singular values spread as Marchenko–Pastur) plus a rank-8 spike 3–10× its edge."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n**0.5
    edge = 1 + (min(m, n) / max(m, n)) ** 0.5
    u = torch.linalg.qr(torch.randn(m, 8, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, 8, generator=g)).Q
    return W + (u * torch.linspace(10, 3, 8) * edge) @ v.T


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device: torch.device, reps: int) -> list[float]:
    """Median seconds of each function, run in turns (so a busy machine slows all of them alike)."""
    for fn in fns:
        fn()
    _sync(device)
    out = [[] for _ in fns]
    for _ in range(reps):
        for fn, times in zip(fns, out, strict=True):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    return [statistics.median(t) for t in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    m, n = (int(x) for x in args.shape.lower().split("x"))
    device = torch.device(args.device)
    W = llm_like(m, n).to(device)
    t = time.perf_counter()
    svd = left_basis(W)
    _sync(device)
    t_basis = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as root:
        cache = BasisCache(root)
        cache.store("bench", svd.U, svd.S)
        hit = cache.load("bench", (m, n))

        def read():  # an uncertified hit, as before: read the entry, U to the compute dtype on the device
            h = cache.load("bench", (m, n))
            return h.U.to(device).to(W.dtype), h.S.to(device)

        def read_certified():  # a hit now: read, then certify (which hands the scan U in the compute dtype)
            h = cache.load("bench", (m, n))
            cert = certify(W, h.U.to(device), h.S.to(device))
            assert cert.ok, cert.reason
            return cert.U

        U16, S = hit.U.to(device), hit.S.to(device)
        cert = certify(W, U16, S)
        t_read, t_hit, t_cert = timed([read, read_certified, lambda: certify(W, U16, S)], device, args.reps)
        cache.close()
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    print(f"{m} x {n} float32 on {device} ({torch.get_num_threads()} threads{load}), median of {args.reps}:")
    print(f"  read entry + U to float32 (uncertified hit)  {t_read * 1e3:9.1f} ms")
    print(f"  read entry + certify (a hit now)             {t_hit * 1e3:9.1f} ms   ({t_hit / t_read:.2f} x)")
    print(f"  certify alone (includes U to float32)        {t_cert * 1e3:9.1f} ms")
    print(f"  left_basis (a miss)                          {t_basis * 1e3:9.1f} ms   "
          f"(certify = {t_cert / t_basis:.2%} of it)")
    print(f"  tightest check: {cert.reason}, {cert.ratio:.2f} x its tolerance; all: "
          + ", ".join(f"{k} {v:.2f}" for k, v in cert.checks.items()))


if __name__ == "__main__":
    main()
