"""lorascope scan against the two-full-SVD method, side by side, on a synthetic LLaMA-shaped model.

The baseline is what the paper's code and PEFT's ``reduce_intruder_dimension`` do per matrix:
``torch.linalg.svd(W_0)`` and ``torch.linalg.svd(W_t)`` (full_matrices=False, float32, on the
device), then ``(U_tᵀ[:k] U_0).abs().max(1)`` (Alg. 1). lorascope runs its public ``scan`` on the
same files in the same process. The script checks that both agree (intruder counts at
ε ∈ {0.3, 0.5, 0.7}, every max-cos within 1e-3) and prints a table of ratios.

The model (written once, then reused): each matrix is W = U diag(σ) Vᵀ with σ_i ∝ (1 + i/10)^(-a)
spanning ``SPANS`` (10³ for q/k, 10² for v/o, 20 for the MLP; entries of rms 0.02) and Haar-like
U, V (one QR per dimension, then a random row permutation, random signs and a random column
permutation per matrix: orthonormal and different for every matrix), stored in bf16 like real
checkpoints. The rank-16 adapter (α = 32) has random orthonormal directions with singular values
g·σ_10·(2, 1.5, 1.2, 1, 0.8, …), g ~ U(0.3, 1.2) per matrix, so some matrices get no intruder and
others several. The full fine-tune is W_0 + a rank-32 update of the same kind + dense noise.

    python benchmarks/scan_bench.py --device cuda --shape 7b --cached --full-ft --out bench.json
    python benchmarks/scan_bench.py --device cpu --shape tiny --layers 2 --cached --full-ft   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8),
    "small": dict(hidden=1024, intermediate=2752, layers=4, heads=8, kv_heads=8),
    "tiny": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=4),
}
SPANS = {"q_proj": 1000.0, "k_proj": 1000.0, "v_proj": 100.0, "o_proj": 100.0,
         "gate_proj": 20.0, "up_proj": 20.0, "down_proj": 20.0}
LORA_PROFILE = [2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.35, 0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03]
RANK, ALPHA, K = 16, 32, 10
EPSILONS = (0.3, 0.5, 0.7)


# -- the synthetic model -----------------------------------------------------------------------
def modules(cfg: dict) -> list[tuple[str, int, int]]:
    """(module path inside a layer, out, in) for every linear module of a LLaMA block."""
    h, f = cfg["hidden"], cfg["intermediate"]
    kv = h // cfg["heads"] * cfg["kv_heads"]
    return [("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f)]


def spectrum(p: int, span: float, m: int, n: int) -> torch.Tensor:
    """σ_i = c·(1 + i/10)^(-a), a so that σ_1/σ_p = span, c so that the entries' rms is 0.02."""
    a = math.log(span) / math.log(1 + (p - 1) / 10)
    s = (1 + torch.arange(p, dtype=torch.float64) / 10) ** (-a)
    return s * (0.02 * math.sqrt(m * n) / float(s.norm()))


class Orthonormal:
    """Random d × p matrices with orthonormal columns: one QR per (d, p), then per draw a random row
    permutation, random row signs and a random column permutation (each keeps orthonormality)."""

    def __init__(self, device: torch.device, gen: torch.Generator):
        self.device, self.gen, self._q = device, gen, {}

    def draw(self, d: int, p: int) -> torch.Tensor:
        if (d, p) not in self._q:
            g = torch.randn(d, p, generator=self.gen).to(self.device)
            self._q[(d, p)] = torch.linalg.qr(g).Q
        rows = torch.randperm(d, generator=self.gen).to(self.device)
        cols = torch.randperm(p, generator=self.gen).to(self.device)
        signs = (torch.randint(0, 2, (d, 1), generator=self.gen) * 2 - 1).to(self.device, torch.float32)
        return self._q[(d, p)][rows][:, cols] * signs


def build_model(root: Path, cfg: dict, layers: int, device: torch.device, full_ft: bool, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16) -> None:
    """Write root/base (sharded safetensors + config.json), root/lora (PEFT adapter) and, with
    ``full_ft``, root/full (a fully fine-tuned checkpoint of the same shape), weights in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    orth = Orthonormal(device, gen)
    targets = sorted({m.split(".")[-1] for m, _, _ in modules(cfg)})
    dirs = {"base": root / "base", "lora": root / "lora"} | ({"full": root / "full"} if full_ft else {})
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    lora: dict[str, torch.Tensor] = {}
    shard_layers = 4
    for start in range(0, layers, shard_layers):
        shard, shard_ft = {}, {}
        fname = f"model-{start // shard_layers + 1:05d}.safetensors"
        for layer in range(start, min(layers, start + shard_layers)):
            for mod, m, n in modules(cfg):
                name = f"model.layers.{layer}.{mod}.weight"
                p = min(m, n)
                sigma = spectrum(p, SPANS[mod.split(".")[-1]], m, n).to(device, torch.float32)
                W0 = (orth.draw(m, p) * sigma) @ orth.draw(n, p).T
                shard[name] = W0.to(dtype).cpu()
                index[name] = fname
                s10 = float(sigma[K - 1])
                g = 0.3 + 0.9 * float(torch.rand((), generator=gen))
                d = torch.tensor(LORA_PROFILE, device=device) * (g * s10 / (ALPHA / RANK))
                Bq, Aq = orth.draw(m, RANK), orth.draw(n, RANK)
                key = f"base_model.model.model.layers.{layer}.{mod}"
                lora[f"{key}.lora_B.weight"] = (Bq * d.sqrt()).contiguous().cpu()
                lora[f"{key}.lora_A.weight"] = (d.sqrt()[:, None] * Aq.T).contiguous().cpu()
                if full_ft:
                    r = 2 * RANK
                    dd = g * s10 * torch.linspace(1.5, 0.05, r, device=device)
                    noise = torch.randn(m, n, generator=gen).to(device) * (0.05 * s10 / (math.sqrt(m) + math.sqrt(n)))
                    Wt = W0 + (orth.draw(m, r) * dd) @ orth.draw(n, r).T + noise
                    shard_ft[name] = Wt.to(dtype).cpu()
        save_file(shard, str(dirs["base"] / fname), metadata={"format": "pt"})
        if full_ft:
            save_file(shard_ft, str(dirs["full"] / fname), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden"],
              "intermediate_size": cfg["intermediate"], "num_hidden_layers": layers,
              "num_attention_heads": cfg["heads"], "num_key_value_heads": cfg["kv_heads"],
              "vocab_size": 32000, "torch_dtype": str(dtype).replace("torch.", ""), "tie_word_embeddings": True}
    for key in ("base", "full") if full_ft else ("base",):
        (dirs[key] / "config.json").write_text(json.dumps(config, indent=2))
        (dirs[key] / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    save_file(lora, str(dirs["lora"] / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dirs["lora"] / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": targets,
        "base_model_name_or_path": str(dirs["base"]), "task_type": "CAUSAL_LM", "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, indent=2))


# -- the two-full-SVD baseline -----------------------------------------------------------------
def baseline(root: Path, tuned: str, names: list[str], device: torch.device) -> tuple[float, dict]:
    """PEFT's detection step per matrix (two full SVDs in float32), timed with its reads."""
    from lorascope.io.checkpoint import Checkpoint

    base = Checkpoint(root / "base")
    lora = Checkpoint(root / "lora" / "adapter_model.safetensors") if tuned == "lora" else None
    full = Checkpoint(root / "full") if tuned == "full" else None
    out = {}
    _sync(device)
    t0 = time.perf_counter()
    for name in names:
        W = base.get(name).to(device, torch.float32)
        if lora is not None:
            key = "base_model.model." + name[: -len(".weight")]
            B = lora.get(f"{key}.lora_B.weight").to(device)
            A = lora.get(f"{key}.lora_A.weight").to(device)
            W_merged = W + (ALPHA / RANK) * (B @ A)
        else:
            W_merged = full.get(name).to(device, torch.float32)
        U_base = torch.linalg.svd(W, full_matrices=False)[0]
        U_merged = torch.linalg.svd(W_merged, full_matrices=False)[0]
        cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values  # PEFT: per tuned vector
        out[name] = cos_sim[:K].cpu()
    _sync(device)
    return time.perf_counter() - t0, out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_max_cos(root: Path, tuned: str, name: str, device: torch.device, svd: bool = True) -> torch.Tensor:
    """Float64 Alg. 1 for one matrix: both SVDs in float64 (``svd``; slow, the arbiter when the two
    disagree) or the float64 Gram eigendecompositions of W_0 and W_t (fast, for every matrix)."""
    from lorascope.io.checkpoint import Checkpoint
    from lorascope.spectral import exact_top_k, left_basis

    W = Checkpoint(root / "base").get(name).to(device, torch.float64)
    if tuned == "lora":
        key = "base_model.model." + name[: -len(".weight")]
        ad = Checkpoint(root / "lora" / "adapter_model.safetensors")
        Wt = W + (ALPHA / RANK) * (ad.get(f"{key}.lora_B.weight").to(device, torch.float64)
                                   @ ad.get(f"{key}.lora_A.weight").to(device, torch.float64))
    else:
        Wt = Checkpoint(root / "full").get(name).to(device, torch.float64)
    if svd:
        U0 = torch.linalg.svd(W, full_matrices=False)[0]
        Ut = torch.linalg.svd(Wt, full_matrices=False)[0][:, :K]
    else:
        U0, Ut = left_basis(W).U, exact_top_k(Wt, K).U
    return (Ut.T @ U0).abs().max(dim=1).values.cpu()


# -- lorascope ---------------------------------------------------------------------------------
def run_lorascope(root: Path, tuned: str, device: torch.device, cache_dir: Path | None,
                  streams: int | None = None, modules: str | None = None) -> tuple[float, object]:
    from lorascope import scan

    _sync(device)
    t0 = time.perf_counter()
    result = scan(str(root / "base"), str(root / tuned), k=K, device=str(device),
                  cache_dir=str(cache_dir) if cache_dir else None, cache_budget="60GB", streams=streams,
                  modules=modules)
    _sync(device)
    return time.perf_counter() - t0, result


_FP64: dict = {}  # float64 SVD references already computed, by (tuned, name)
_GRAM64: dict = {}  # float64 Gram references, likewise


def agreement(result, base_cos: dict, root: Path, tuned: str, device: torch.device) -> dict:
    """Counts at each ε and max-cos differences over the matrices the baseline covered."""
    recs = {r.name: r for r in result.matrices if r.side == "left"}
    diffs, mismatches, worst = [], {e: 0 for e in EPSILONS}, []
    for name, ref in base_cos.items():
        got = torch.tensor(recs[name].max_cos, dtype=torch.float64)
        d = float((got - ref.double()).abs().max())
        diffs.append(d)
        for e in EPSILONS:
            mismatches[e] += int(int((got < e).sum()) != int((ref < e).sum()))
        if d > 1e-3:
            worst.append((d, name))
    arbiter = []
    for d, name in sorted(worst, reverse=True)[:2]:  # who is right? float64 decides
        if (tuned, name) not in _FP64:
            _FP64[(tuned, name)] = reference_max_cos(root, tuned, name, device).double()
        ref64 = _FP64[(tuned, name)]
        arbiter.append({"name": name, "diff": d,
                        "lorascope_vs_fp64": float((torch.tensor(recs[name].max_cos) - ref64).abs().max()),
                        "baseline_vs_fp64": float((base_cos[name].double() - ref64).abs().max())})
    for n in base_cos:
        if (tuned, n) not in _GRAM64:
            _GRAM64[(tuned, n)] = reference_max_cos(root, tuned, n, device, svd=False).double()
    gram_ref = {n: _GRAM64[(tuned, n)] for n in base_cos}
    vs64 = {"lorascope": max(float((torch.tensor(recs[n].max_cos, dtype=torch.float64) - r).abs().max())
                             for n, r in gram_ref.items()),
            "baseline": max(float((base_cos[n].double() - r).abs().max()) for n, r in gram_ref.items())}
    counts = {str(e): sum(sum(1 for c in recs[n].max_cos if c < e) for n in base_cos) for e in EPSILONS}
    return {"n_matrices": len(diffs), "max_abs_diff": max(diffs) if diffs else None,
            "median_abs_diff": statistics.median(diffs) if diffs else None,
            "n_over_1e-3": len(worst), "count_mismatches": {str(e): v for e, v in mismatches.items()},
            "intruders_at_eps": counts, "exact_fallbacks": sum(1 for n in base_cos if recs[n].exact),
            "max_abs_err_vs_fp64_gram_reference": vs64, "arbiter_fp64_svd": arbiter}


def stage_times(root: Path, cfg: dict, device: torch.device, reps: int = 3) -> dict:
    """Median seconds of each step of one matrix per distinct shape (layer 0): base basis (float64
    Gram eigh), top-k of W_t (block Krylov, LoRA and full), Alg. 1 end to end, and the two SVDs."""
    from lorascope.pipeline import gram_left_basis
    from lorascope.scan import analyze_matrix

    from lorascope.io.checkpoint import Checkpoint
    from lorascope.spectral import LowRankDelta, Tuned, top_k

    def med(fn) -> float:
        fn()
        out = []
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    base = Checkpoint(root / "base")
    ad = Checkpoint(root / "lora" / "adapter_model.safetensors")
    full = Checkpoint(root / "full") if (root / "full").exists() else None
    out, seen = {}, set()
    for mod, m, n in modules(cfg):
        if (m, n) in seen:
            continue
        seen.add((m, n))
        name = f"model.layers.0.{mod}.weight"
        W = base.get(name).to(device, torch.float32)
        key = "base_model.model." + name[: -len(".weight")]
        d = LowRankDelta(ad.get(f"{key}.lora_B.weight").to(device), ad.get(f"{key}.lora_A.weight").to(device),
                         ALPHA / RANK)
        U0 = gram_left_basis(W).U
        row = {"read_to_device": med(lambda name=name: base.get(name).to(device, torch.float32)),
               "base_basis_fp64_gram_eigh": med(lambda W=W: gram_left_basis(W)),
               "top_k_lora": med(lambda W=W, d=d, U0=U0: top_k(Tuned(W, d), K, init=U0)),
               "alg1_lora_given_basis": med(lambda W=W, d=d, U0=U0, name=name: analyze_matrix(
                   name, "linear", W, d, K, 0.5, basis=lambda key, X, U0=U0: gram_left_basis_cached(U0))),
               "two_svds_baseline": med(lambda W=W: (torch.linalg.svd(W, full_matrices=False),
                                                    torch.linalg.svd(W, full_matrices=False)))}
        if full is not None:
            dW = full.get(name).to(device, torch.float32) - W
            row["top_k_full"] = med(lambda W=W, dW=dW, U0=U0: top_k(Tuned(W, dW), K, init=U0))
        out[f"{m}x{n}"] = row
        print(f"stages {m}x{n}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items()), flush=True)
    return out


def eigh_floor(root: Path, names: list[str], device: torch.device, threads: int) -> float:
    """Seconds per matrix of the float64 ``eigh`` of the base Gram matrices alone (the step no exact
    first scan can skip), ``threads`` at a time, each thread on its own CUDA stream as in the scan."""
    from concurrent.futures import ThreadPoolExecutor

    from lorascope.io.checkpoint import Checkpoint

    base = Checkpoint(root / "base")
    grams = []
    for name in names:
        W = base.get(name).to(device, torch.float64)
        grams.append(W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W)

    def one(G: torch.Tensor) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            torch.linalg.eigh(G)
        _sync(device)

    one(grams[0])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, grams))
    _sync(device)
    return (time.perf_counter() - t0) / len(grams)


def gram_left_basis_cached(U0: torch.Tensor):
    from lorascope.spectral import SVD

    return SVD(U=U0, S=torch.ones(U0.shape[1], dtype=torch.float64, device=U0.device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="layers to build and scan (default: all)")
    ap.add_argument("--baseline-layers", type=int, default=None,
                    help="layers the baseline runs on (default: all when ≤ 4 layers, else 4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full-ft", action="store_true", help="also compare on a full fine-tune")
    ap.add_argument("--cached", action="store_true", help="also time a second scan from the basis cache")
    ap.add_argument("--stages", action="store_true", help="also time each step on one matrix per shape")
    ap.add_argument("--no-cache-scan", action="store_true",
                    help="also time a LoRA first scan that writes no basis cache (what a one-off scan costs)")
    ap.add_argument("--streams", default="",
                    help="comma-separated stream counts: time each (cached scan; first scan without a cache "
                         "too with --no-cache-scan) against the default, in this process")
    ap.add_argument("--eigh-floor", action="store_true",
                    help="also time the float64 eigh of the base Gram matrices alone (1 and 8 threads)")
    ap.add_argument("--cli", action="store_true",
                    help="also time `lorascope scan BASE LORA` (no cache) in a fresh process, wall clock")
    ap.add_argument("--build-only", action="store_true", help="write the model files to --workdir and stop")
    ap.add_argument("--workdir", default=None, help="where the model files go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write every number here as JSON")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    layers = args.layers or cfg["layers"]
    base_layers = min(layers, args.baseline_layers or 4)
    device = torch.device(args.device)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lorascope-bench-"))
    report: dict = {"shape": args.shape, "layers": layers, "baseline_layers": base_layers,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "matrices_per_layer": len(modules(cfg))}
    try:
        t = time.perf_counter()
        wanted = ("base", "full") if args.full_ft else ("base",)
        missing = [d for d in wanted if not (root / d / "config.json").exists()]
        if missing:
            build_model(root, cfg, layers, device, args.full_ft)
        report["build_seconds"] = round(time.perf_counter() - t, 1)
        print(f"model in {root} ({report['build_seconds']} s)", flush=True)
        if args.build_only:
            return
        _warm_up(device)
        t = time.perf_counter()
        run_lorascope(root, "lora", device, None, modules=r"layers\.0\.")  # imports, CUDA libraries
        report["warm_up_scan_seconds"] = round(time.perf_counter() - t, 2)
        print(f"warm-up scan of layer 0 (imports, library loads; not timed below): "
              f"{report['warm_up_scan_seconds']} s", flush=True)
        if args.cli:
            cmd = [sys.executable, "-m", "lorascope", "scan", str(root / "base"), str(root / "lora"),
                   "--device", str(device), "--out", str(root / "cli-out")]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            report["cli_first_scan_wall_seconds"] = round(time.perf_counter() - t, 2)
            print(f"[lora] `lorascope scan` in a fresh process, no cache, wall clock: "
                  f"{report['cli_first_scan_wall_seconds']} s", flush=True)
        if args.stages:
            report["stages"] = stage_times(root, cfg, device)
        names = [f"model.layers.{i}.{m}.weight" for i in range(base_layers) for m, _, _ in modules(cfg)]
        if args.eigh_floor:
            floor = {th: eigh_floor(root, names, device, th) for th in (1, 8, 1, 8)}
            report["eigh_floor_s_per_matrix"] = floor
            print(f"float64 eigh of the base Gram alone: {json.dumps(floor)} s per matrix", flush=True)
        n_all = layers * len(modules(cfg))
        rows = []
        cache = root / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        for tuned in ["lora"] + (["full"] if args.full_ft else []):
            # lorascope first (a failure shows early). The LoRA scan fills the basis cache (hashing
            # and writing included in its time); the full fine-tune's first scan runs without one.
            streams = [int(x) for x in args.streams.split(",") if x]
            if tuned == "lora" and args.no_cache_scan:
                tn, _ = run_lorascope(root, tuned, device, None)
                print(f"[{tuned}] lorascope full scan without a cache: {tn:.1f} s for {n_all} matrices", flush=True)
                report["no_cache_by_streams"] = {}
                for st in streams:
                    t_s, _ = run_lorascope(root, tuned, device, None, streams=st)
                    report["no_cache_by_streams"][st] = t_s
                    print(f"[{tuned}] ... without a cache, streams={st}: {t_s:.1f} s", flush=True)
            tl, res = run_lorascope(root, tuned, device, cache if tuned == "lora" else None)
            print(f"[{tuned}] lorascope full scan: {tl:.1f} s for {n_all} matrices", flush=True)
            if args.cached:
                tc, res_c = run_lorascope(root, tuned, device, cache)
                print(f"[{tuned}] lorascope cached scan: {tc:.1f} s", flush=True)
                report[f"{tuned}_cached_by_streams"] = {}
                for st in streams:
                    t_s, _ = run_lorascope(root, tuned, device, cache, streams=st)
                    report[f"{tuned}_cached_by_streams"][st] = t_s
                    print(f"[{tuned}] ... cached, streams={st}: {t_s:.1f} s", flush=True)
            tb, cos = baseline(root, tuned, names, device)
            per_matrix = tb / len(names)
            print(f"[{tuned}] baseline: {tb:.1f} s for {len(names)} matrices ({per_matrix:.3f} s each)", flush=True)
            agree = agreement(res, cos, root, tuned, device)
            print(f"[{tuned}] agreement: {json.dumps(agree)}", flush=True)
            entry = {"tuned": tuned, "baseline_seconds": tb, "baseline_matrices": len(names),
                     "baseline_per_matrix": per_matrix, "baseline_projected_all": per_matrix * n_all,
                     "lorascope_seconds": tl, "lorascope_matrices": n_all,
                     "ratio": per_matrix * n_all / tl, "agreement": agree}
            if tuned == "lora" and args.no_cache_scan:
                entry |= {"no_cache_seconds": tn, "no_cache_ratio": per_matrix * n_all / tn}
                rows.append(("lora: full scan, no cache", entry["baseline_projected_all"], tn, 20))
            rows.append((f"{tuned}: full scan", entry["baseline_projected_all"], tl, 20 if tuned == "lora" else 10))
            if tuned == "lora" and args.cli:
                rows.append(("lora: CLI, new process", entry["baseline_projected_all"],
                             report["cli_first_scan_wall_seconds"], None))
            if args.cached:
                same = max(abs(a - b) for r, rc in zip(res.matrices, res_c.matrices, strict=True)
                           for a, b in zip(r.max_cos, rc.max_cos, strict=True))
                ag_c = agreement(res_c, cos, root, tuned, device)
                entry |= {"cached_seconds": tc, "cached_ratio": per_matrix * n_all / tc,
                          "cached_vs_uncached_max_cos_diff": same, "cached_agreement": ag_c}
                print(f"[{tuned}] cached: max-cos differs from the uncached scan by at most {same:.1e} "
                      f"(float16 bases); agreement: {json.dumps(ag_c)}", flush=True)
                rows.append((f"{tuned}: base cached", entry["baseline_projected_all"], tc,
                             100 if tuned == "lora" else None))
            report[tuned] = entry
            if args.out:  # after every mode, so a run cut short still leaves its numbers
                Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print_table(rows, base_layers, layers)
        report["table"] = [dict(zip(("mode", "baseline_s", "lorascope_s", "target"), r, strict=True)) for r in rows]
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _warm_up(device: torch.device) -> None:
    """Create the solver handles and kernels once, outside every timed region."""
    x = torch.randn(64, 48, device=device)
    torch.linalg.svd(x, full_matrices=False)
    torch.linalg.eigh((x @ x.T).double())
    torch.linalg.eigh(x @ x.T)
    _sync(device)


def print_table(rows: list, base_layers: int, layers: int) -> None:
    note = "" if base_layers == layers else f" (baseline: {base_layers} of {layers} layers measured, × per matrix)"
    print(f"\n{'mode':22s} {'two-SVD s':>10s} {'lorascope s':>12s} {'ratio':>8s} {'target':>8s}{note}")
    for mode, tb, tl, target in rows:
        ratio = tb / tl
        ok = "" if target is None else ("  met" if ratio >= target else "  MISSED")
        print(f"{mode:22s} {tb:10.1f} {tl:12.2f} {ratio:7.1f}x {('≥' + str(target) + 'x') if target else '':>8s}{ok}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
