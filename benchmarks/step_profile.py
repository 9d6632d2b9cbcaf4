"""Where the time of one matrix goes: small-operation latencies and a profiler table per shape.

Builds one LLaMA-2-7B-shaped layer (scan_bench.build_model), then times the small dense-algebra
steps that block Krylov top-k repeats (QR of a tall block, Cholesky-QR, eigh of the Rayleigh-Ritz
Gram on the device and on the host), profiles ``analyze_matrix`` per shape, and checks whether the
base decomposition of the next matrix overlaps with Alg. 1 on the current one when run on a second
CUDA stream from a second thread.

    python benchmarks/step_profile.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import scan_bench  # noqa: E402


def med(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    out = []
    for _ in range(reps):
        scan_bench._sync(device)
        t = time.perf_counter()
        fn()
        scan_bench._sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def cholqr2(X: torch.Tensor) -> torch.Tensor:
    for _ in range(2):
        X64 = X.double()
        R = torch.linalg.cholesky(X64.T @ X64, upper=True)
        X = torch.linalg.solve_triangular(R, X64, upper=True, left=False).to(X.dtype)
    return X


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    args = ap.parse_args()
    dev = torch.device(args.device)
    from lorascope.pipeline import gram_left_basis
    from lorascope.scan import analyze_matrix

    from lorascope.io.checkpoint import Checkpoint
    from lorascope.spectral import SVD, LowRankDelta

    for m in (args.hidden, args.intermediate):
        for lw in (42, 84):
            X = torch.randn(m, lw, device=dev)
            print(f"qr {m}x{lw}: {med(lambda X=X: torch.linalg.qr(X), dev) * 1e3:.2f} ms   "
                  f"cholqr2: {med(lambda X=X: cholqr2(X), dev) * 1e3:.2f} ms", flush=True)
    for L in (42, 84, 168, 252):
        A = torch.randn(L, L, device=dev, dtype=torch.float64)
        G = A @ A.T
        print(f"eigh fp64 {L}: device {med(lambda G=G: torch.linalg.eigh(G), dev) * 1e3:.2f} ms   host (with "
              f"transfers) {med(lambda G=G: torch.linalg.eigh(G.cpu())[1].to(dev), dev) * 1e3:.2f} ms", flush=True)
    B = torch.randn(11008, 16, device=dev)
    print(f"qr 11008x16 {med(lambda: torch.linalg.qr(B), dev) * 1e3:.2f} ms; "
          f"svdvals 16x16 {med(lambda: torch.linalg.svdvals(B[:16]), dev) * 1e3:.2f} ms", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="lorascope-prof-")
    root = Path(tmp.name)
    cfg = dict(scan_bench.SHAPES["7b"], hidden=args.hidden, intermediate=args.intermediate)
    scan_bench.build_model(root, cfg, 1, dev, full_ft=False)
    base = Checkpoint(root / "base")
    ad = Checkpoint(root / "lora" / "adapter_model.safetensors")
    mats = {}
    for mod, _, _ in scan_bench.modules(cfg):
        name = f"model.layers.0.{mod}.weight"
        key = "base_model.model." + name[: -len(".weight")]
        W = base.get(name).to(dev, torch.float32)
        d = LowRankDelta(ad.get(f"{key}.lora_B.weight").to(dev), ad.get(f"{key}.lora_A.weight").to(dev), 2.0)
        mats[mod] = (name, W, d, gram_left_basis(W))
    from torch.profiler import ProfilerActivity, profile

    for mod in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        name, W, d, b = mats[mod]
        analyze_matrix(name, "linear", W, d, 10, 0.5, basis=lambda key, X, b=b: b)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            analyze_matrix(name, "linear", W, d, 10, 0.5, basis=lambda key, X, b=b: b)
            scan_bench._sync(dev)
        sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(f"== analyze_matrix {mod} {tuple(W.shape)}", flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=40))
        print(prof.key_averages().table(sort_by=sort, row_limit=8, max_name_column_width=40), flush=True)

    if dev.type == "cuda":  # does the next matrix's base decomposition overlap with Alg. 1 of this one?
        order = list(mats.values())

        def sequential() -> None:
            for name, W, d, _ in order:
                b = gram_left_basis(W)
                analyze_matrix(name, "linear", W, d, 10, 0.5, basis=lambda key, X, b=b: b)

        def overlapped() -> None:
            side = torch.cuda.Stream()
            results: dict[int, SVD] = {}
            ready = [threading.Event() for _ in order]

            def worker() -> None:
                with torch.cuda.stream(side):
                    for i, (_, W, _, _) in enumerate(order):
                        results[i] = gram_left_basis(W)
                        side.synchronize()
                        ready[i].set()

            th = threading.Thread(target=worker)
            th.start()
            for i, (name, W, d, _) in enumerate(order):
                ready[i].wait()
                b = results.pop(i)
                analyze_matrix(name, "linear", W, d, 10, 0.5, basis=lambda key, X, b=b: b)
            th.join()

        print(f"7 matrices: sequential {med(sequential, dev, 3):.3f} s, basis on a second stream "
              f"{med(overlapped, dev, 3):.3f} s", flush=True)


if __name__ == "__main__":
    main()
