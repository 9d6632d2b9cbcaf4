"""Where a fresh process's first scan spends its time: start-up, a one-layer scan, then the whole
model twice. Run after ``scan_bench.py --workdir DIR`` has written the model.

    python benchmarks/first_scan_probe.py DIR lora      # or: DIR full
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
t = time.perf_counter()
from lorascope import scan  # noqa: E402

print(f"import lorascope {time.perf_counter() - t:.2f} s", flush=True)
for label, modules in [("layer 0 only", r"layers\.0\."), ("whole model", None), ("whole model again", None)]:
    t = time.perf_counter()
    r = scan(f"{root}/base", f"{root}/{tuned}", device="cuda", modules=modules, cache_dir=cache, cache_budget="60GB")
    torch.cuda.synchronize()
    print(f"{tuned}: {label}: {time.perf_counter() - t:.2f} s, {len(r.matrices)} matrices", flush=True)
print(f"process total {time.perf_counter() - t_start:.1f} s", flush=True)
