"""Where a fresh process's first scan spends its time: start-up, a one-layer scan, then the whole
model twice. Run after ``scan_bench.py --workdir DIR`` has written the model.

    python benchmarks/first_scan_probe.py DIR lora      # or: DIR full
    python benchmarks/first_scan_probe.py - parts       # first and second call of each kind of step
"""

from __future__ import annotations

import sys
import time

t_start = time.perf_counter()
import torch  # noqa: E402

root, tuned = sys.argv[1], sys.argv[2]
cache = sys.argv[3] if len(sys.argv) > 3 else None
t = time.perf_counter()
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
print(f"import torch {t - t_start:.2f} s, CUDA context {time.perf_counter() - t:.2f} s", flush=True)


def timed(label: str, fn, reps: int = 2) -> None:
    for i in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        print(f"  {label} #{i + 1}: {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)


if tuned == "parts":
    import threading

    dev = torch.device("cuda")
    timed("pinned 128 MB", lambda: torch.empty(1 << 27, dtype=torch.uint8, pin_memory=True), 3)
    timed("cuda alloc 1 GB", lambda: torch.empty(1 << 30, dtype=torch.uint8, device=dev), 2)
    timed("linalg load (eigvalsh 2x2)", lambda: torch.linalg.eigvalsh(torch.eye(2, device=dev)))
    W = torch.randn(4096, 11008, device=dev)
    timed("matmul fp32", lambda: W @ W[:42].T)
    timed("gram fp64", lambda: W.double() @ W.double().T)
    G = (W.double() @ W.double().T)
    timed("eigh fp64 4096", lambda: torch.linalg.eigh(G))
    timed("eigvalsh fp32 4096", lambda: torch.linalg.eigvalsh(G.float()))
    X = torch.randn(4096, 42, device=dev)
    timed("qr 4096x42", lambda: torch.linalg.qr(X))
    H = (X.T @ X).double()
    timed("eigh fp64 42", lambda: torch.linalg.eigh(H))

    def in_thread() -> None:
        s = torch.cuda.Stream(dev)
        with torch.cuda.stream(s):
            timed("new thread: qr", lambda: torch.linalg.qr(X))
            timed("new thread: eigh fp64 4096", lambda: torch.linalg.eigh(G))
            timed("new thread: matmul", lambda: W @ W[:42].T)

    th = threading.Thread(target=in_thread)
    th.start()
    th.join()
    sys.exit(0)

t = time.perf_counter()
from lorascope import scan  # noqa: E402

print(f"import lorascope {time.perf_counter() - t:.2f} s", flush=True)
for label, modules in [("layer 0 only", r"layers\.0\."), ("whole model", None), ("whole model again", None)]:
    t = time.perf_counter()
    r = scan(f"{root}/base", f"{root}/{tuned}", device="cuda", modules=modules, cache_dir=cache, cache_budget="60GB")
    torch.cuda.synchronize()
    print(f"{tuned}: {label}: {time.perf_counter() - t:.2f} s, {len(r.matrices)} matrices", flush=True)
print(f"process total {time.perf_counter() - t_start:.1f} s", flush=True)
