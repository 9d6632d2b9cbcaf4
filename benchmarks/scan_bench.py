"""lorascope against the paper's two-full-SVD method on synthetic LLaMA-shaped models: one run that
measures every speed target of the issue and prints them, met or MISSED.

Full run on one H200: the 7B shape (~45 GB of disk in --workdir; about 15 minutes in all) in three
commands that share --workdir and --out (``--append`` keeps the earlier commands' rows; the model is
built once), then the 70B slice (~20 GB: free the 7B files first on a 64 GB disk):

    B="python benchmarks/scan_bench.py --device cuda --shape 7b --workdir /tmp/bench --out bench7b.json"
    $B --rows lora,fill,cached,full --baseline-layers 2            # builds 26 GB first
    $B --rows many,mitigate --baseline-layers 2 --append
    $B --rows families --families smooth,powerlaw,real --family-layers 2 --append
    rm -rf /tmp/bench
    python benchmarks/scan_bench.py --device cuda --shape 70b --layers 4 --workdir /tmp/bench70 --out bench70b.json
    python benchmarks/scan_bench.py --device cpu --shape tiny --layers 4 --adapters 3 --out smoke.json  # CPU smoke

``$B --baseline-layers 2`` alone runs all of the first three. ``--rows`` picks rows (default: all
but stages,eigh-floor; 70b: lora,fill,cached,full).

**Timing.** Every lorascope row is one ``lorascope scan`` / ``lorascope mitigate`` command in a NEW
PROCESS, wall clock from spawn to exit (``--in-process``: the old style, ``lorascope.scan`` in this
process after a warm-up scan). One untimed CLI call on layer 0 warms the OS file caches first. The
**baseline** is the paper's and PEFT's detection step, per matrix ``torch.linalg.svd`` of W_0 and of
W_t (float32, full_matrices=False, on the device, reads included) and Alg. 1, timed per matrix on
the first ``--baseline-layers`` layers (70b: a q, a v and a gate matrix, ``--baseline-matrices``)
and projected to the whole model by shape (every matrix counts the mean time of its shape, a
transposed shape counting as the same).

**Rows** (names for ``--rows``):
- fixed cost (every CLI row): wall clock minus the scan's own ``timing.seconds`` from its
  scan.json / mitigation.json (start-up, imports, output). Target ≤ 3 s.
- ``lora``: first scan of the rank-16 LoRA, no cache. Target ≥ 15× the projected baseline.
- ``fill``: the same scan filling a fresh ``--cache-dir`` (hashing, float16 bases written). Target
  ≤ 1.2× the ``lora`` wall.
- ``cached``: the same scan again, bases from that cache. Target ≥ 60×.
- ``full``: first scan of the full fine-tune, no cache. Target ≥ 10×.
- ``many``: ``lorascope scan BASE A1 … An`` (``--adapters`` rank-16 adapters, seeds 0..n−1, A1 being
  the ``lora`` adapter), one call, no cache. Adapters per minute after the first:
  60·(n − 1) / (wall − ``lora`` wall). Target ≥ 30.
- ``mitigate``: ``lorascope mitigate BASE LORA --lam 0.75 --out …``, wall against the ``lora`` wall
  (target ≤ 1.2×) and against PEFT's ``reduce_intruder_dimension`` (target ≥ 15× faster), timed on
  a PeftModel of the first ``--baseline-layers`` layers and projected per matrix. PEFT's function,
  per LoRA module: W_t = W + scaling·B A in float32; full SVDs of W and W_t; max |cos| of each of
  W_t's left vectors against all of W's; intruders = top-k (10) with max |cos| < ε (0.5); if any:
  W_t' = W_t + (λ − 1)·Σ_I σ_j u_j v_jᵀ (all intruders), ΔW' = (W_t' − W)/scaling, a third full SVD
  of the m × n ΔW', truncated to the adapter's rank r as the new B, A (lossy: ΔW' has rank up to
  r + |I|); in memory, nothing written. lorascope writes an exact rank-(r + p) adapter (Eq. 3),
  by default scaling only the top intruder (``--which top1``); both detect with k = 10, ε = 0.5.
- ``families``: the lora / fill / cached / full ratios on other singular-value spectra
  (``--families``: smooth, powerlaw, smollm2, minilm; real = smollm2,minilm; bench_spectra.py says how
  each is built), each on a model of ``--family-layers`` layers. Whole-model time is projected from
  two CLI calls per row, layer 0 alone (s₁) and all L layers (wall_L, s_L):
  wall_L + (layers − L)·(s_L − s₁)/(L − 1) (affine in the layer count; for ``smooth`` the projection is
  checked against the measured whole-model rows). Per family also: the Krylov steps of ``top_k``
  (histogram over the matrices, LoRA and full), the max-cos error against float64 (Gram route,
  every matrix of the slice) and the power-law fit of the ESD of W Wᵀ per module type.
- ``stages``, ``eigh-floor``: per-step times on one matrix per shape; the float64 ``eigh`` alone.

The --out JSON is rewritten after every row (a run cut short keeps its numbers) and ends with the
table of targets against measurements. The smooth model (``build_model``'s defaults) is bit-identical
to the one earlier results were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spectra  # noqa: E402
from bench_spectra import SPANS, family_spectrum, spectrum  # noqa: E402, F401 (SPANS, spectrum: for other scripts)

SHAPES = {
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8),
    "small": dict(hidden=1024, intermediate=2752, layers=4, heads=8, kv_heads=8),
    "tiny": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=4),
}
LORA_PROFILE = [2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.35, 0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03]
RANK, ALPHA, K = 16, 32, 10
EPSILONS = (0.3, 0.5, 0.7)
ROWS = ("lora", "fill", "cached", "full", "many", "mitigate", "stages", "eigh-floor", "families")
DEFAULT_ROWS = {"70b": "lora,fill,cached,full"}
DEFAULT_ROWS_OTHER = "lora,fill,cached,full,many,mitigate,families"
TARGETS = dict(fixed_s=3.0, lora=15.0, cached=60.0, full=10.0, fill=1.2, many_per_min=30.0,
               mitigate_vs_lora=1.2, mitigate_vs_peft=15.0)
CACHE_BUDGET = "60GB"


# -- the synthetic model -----------------------------------------------------------------------
def modules(cfg: dict) -> list[tuple[str, int, int]]:
    """(module path inside a layer, out, in) for every linear module of a LLaMA block."""
    h, f = cfg["hidden"], cfg["intermediate"]
    kv = h // cfg["heads"] * cfg["kv_heads"]
    return [("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f)]


def matrix_names(cfg: dict, layers: int, only: set[str] | None = None) -> list[str]:
    """Checkpoint names of the first ``layers`` layers' matrices (``only``: those module types)."""
    return [f"model.layers.{i}.{m}.weight" for i in range(layers) for m, _, _ in modules(cfg)
            if only is None or m.split(".")[-1] in only]


def layer_regex(layers: int) -> str:
    """A ``--modules`` regex for the matrices of layers 0..layers−1."""
    return r"layers\.(" + "|".join(str(i) for i in range(layers)) + r")\."


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


def lora_factors(orth: Orthonormal, gen: torch.Generator, s10: float, m: int, n: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A rank-16 update with random orthonormal directions and singular values g·σ_10·LORA_PROFILE,
    g ~ U(0.3, 1.2): (lora_B, lora_A, g), B A·α/r being the update."""
    g = 0.3 + 0.9 * float(torch.rand((), generator=gen))
    d = torch.tensor(LORA_PROFILE, device=device) * (g * s10 / (ALPHA / RANK))
    Bq, Aq = orth.draw(m, RANK), orth.draw(n, RANK)
    return (Bq * d.sqrt()).contiguous().cpu(), (d.sqrt()[:, None] * Aq.T).contiguous().cpu(), g


def write_adapter(out: Path, tensors: dict, cfg: dict, base: Path) -> None:
    """A PEFT LoRA folder: adapter_model.safetensors and adapter_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({m.split(".")[-1] for m, _, _ in modules(cfg)})
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": targets,
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}, indent=2))


def build_model(root: Path, cfg: dict, layers: int, device: torch.device, full_ft: bool, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16, family: str = "smooth") -> None:
    """Write root/base (sharded safetensors + config.json), root/lora (PEFT adapter) and, with
    ``full_ft``, root/full (a fully fine-tuned checkpoint of the same shape), weights in ``dtype``.

    Each W_0 = U diag(σ) Vᵀ, σ from ``family`` (bench_spectra.family_spectrum), U, V from
    ``Orthonormal``. The adapter's update (``lora_factors``) has singular values g·σ_10·(2, 1.5, …),
    so some matrices get no intruder and others several; the full fine-tune is W_0 + a rank-32
    update of the same kind + dense noise."""
    gen = torch.Generator().manual_seed(seed)
    orth = Orthonormal(device, gen)
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
                sigma = family_spectrum(family, mod.split(".")[-1], m, n).to(device, torch.float32)
                W0 = (orth.draw(m, p) * sigma) @ orth.draw(n, p).T
                shard[name] = W0.to(dtype).cpu()
                index[name] = fname
                s10 = float(sigma[K - 1])
                key = f"base_model.model.model.layers.{layer}.{mod}"
                B, A, g = lora_factors(orth, gen, s10, m, n, device)
                lora[f"{key}.lora_B.weight"], lora[f"{key}.lora_A.weight"] = B, A
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
    write_adapter(dirs["lora"], lora, cfg, dirs["base"])


def built_with(root: Path, layers: int, parts: tuple[str, ...]) -> bool:
    """Whether root holds a model of ``layers`` layers with every one of ``parts`` (base, full)."""
    configs = [root / p / "config.json" for p in parts]
    return all(c.exists() and json.loads(c.read_text())["num_hidden_layers"] == layers for c in configs) and \
        (root / "lora" / "adapter_config.json").exists()


def clear_model(root: Path) -> None:
    for part in ("base", "full", "lora"):
        shutil.rmtree(root / part, ignore_errors=True)


def build_adapter(out: Path, cfg: dict, layers: int, device: torch.device, seed: int, base: Path,
                  family: str = "smooth") -> None:
    """Another rank-16 adapter of the same base, like ``build_model``'s but drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    orth = Orthonormal(device, gen)
    lora = {}
    for layer in range(layers):
        for mod, m, n in modules(cfg):
            s10 = float(family_spectrum(family, mod.split(".")[-1], m, n).to(torch.float32)[K - 1])
            key = f"base_model.model.model.layers.{layer}.{mod}"
            lora[f"{key}.lora_B.weight"], lora[f"{key}.lora_A.weight"], _ = lora_factors(orth, gen, s10, m, n, device)
    write_adapter(out, lora, cfg, base)


# -- the two-full-SVD baseline and float64 references -----------------------------------------
def tuned_weight(root: Path, tuned: str, name: str, W: torch.Tensor) -> torch.Tensor:
    """W_t of ``name`` (the LoRA merged, or the full fine-tune's) in W's dtype and device."""
    from lorascope.io.checkpoint import Checkpoint

    if tuned == "lora":
        key = "base_model.model." + name[: -len(".weight")]
        ad = Checkpoint(root / "lora" / "adapter_model.safetensors")
        B = ad.get(f"{key}.lora_B.weight").to(W.device, W.dtype)
        A = ad.get(f"{key}.lora_A.weight").to(W.device, W.dtype)
        return W + (ALPHA / RANK) * (B @ A)
    return Checkpoint(root / "full").get(name).to(W.device, W.dtype)


def baseline(root: Path, tuned: str, names: list[str], device: torch.device) -> dict:
    """PEFT's detection step per matrix (two full SVDs in float32), each matrix timed with its reads.
    Returns {"seconds", "per_matrix_s": {name: s}, "cos": {name: top-k max-cos}}."""
    from lorascope.io.checkpoint import Checkpoint

    base = Checkpoint(root / "base")
    per, cos = {}, {}
    for name in names:
        _sync(device)
        t0 = time.perf_counter()
        W = base.get(name).to(device, torch.float32)
        W_merged = tuned_weight(root, tuned, name, W)
        U_base = torch.linalg.svd(W, full_matrices=False)[0]
        U_merged = torch.linalg.svd(W_merged, full_matrices=False)[0]
        cos_sim = (U_merged.T @ U_base).abs().max(dim=1).values  # PEFT: per tuned vector
        cos[name] = cos_sim[:K].cpu()
        _sync(device)
        per[name] = time.perf_counter() - t0
    return {"seconds": sum(per.values()), "per_matrix_s": per, "cos": cos}


def shape_of(cfg: dict, name: str) -> tuple[int, int]:
    """(min, max) of the matrix's shape: an m × n and an n × m SVD count as one shape."""
    mod = name.split(".layers.")[1].split(".", 1)[1][: -len(".weight")]
    m, n = next((m, n) for mm, m, n in modules(cfg) if mm == mod)
    return (min(m, n), max(m, n))


def project(cfg: dict, per_matrix_s: dict, names: list[str]) -> dict:
    """Baseline seconds for ``names``: each counts the mean measured time of its shape."""
    by_shape: dict = {}
    for name, s in per_matrix_s.items():
        by_shape.setdefault(shape_of(cfg, name), []).append(s)
    mean = {sh: statistics.mean(v) for sh, v in by_shape.items()}
    missing = {shape_of(cfg, n) for n in names} - set(mean)
    if missing:
        raise SystemExit(f"the baseline measured no matrix of shape {sorted(missing)}: add it to --baseline-matrices")
    return {"seconds": sum(mean[shape_of(cfg, n)] for n in names), "n_matrices": len(names),
            "per_shape_s": {f"{a}x{b}": s for (a, b), s in mean.items()}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_max_cos(root: Path, tuned: str, name: str, device: torch.device, svd: bool = True) -> torch.Tensor:
    """Float64 Alg. 1 for one matrix: both SVDs in float64 (``svd``; slow, the arbiter when the two
    disagree) or the float64 Gram eigendecompositions of W_0 and W_t (fast, for every matrix)."""
    from lorascope.io.checkpoint import Checkpoint
    from lorascope.spectral import exact_top_k, left_basis

    W = Checkpoint(root / "base").get(name).to(device, torch.float64)
    Wt = tuned_weight(root, tuned, name, W)
    if svd:
        U0 = torch.linalg.svd(W, full_matrices=False)[0]
        Ut = torch.linalg.svd(Wt, full_matrices=False)[0][:, :K]
    else:
        U0, Ut = left_basis(W).U, exact_top_k(Wt, K).U
    return (Ut.T @ U0).abs().max(dim=1).values.cpu()


_FP64: dict = {}  # float64 SVD references already computed, by (root, tuned, name)
_GRAM64: dict = {}  # float64 Gram references, likewise


def gram_reference(root: Path, tuned: str, name: str, device: torch.device) -> torch.Tensor:
    key = (str(root), tuned, name)
    if key not in _GRAM64:
        _GRAM64[key] = reference_max_cos(root, tuned, name, device, svd=False).double()
    return _GRAM64[key]


def left_records(result) -> dict:
    return {r.name: r for r in result.matrices if r.side == "left"}


def max_err_vs_fp64(result, root: Path, tuned: str, device: torch.device) -> float:
    """Largest |max-cos − float64 max-cos| over every matrix of a scan result."""
    errs = [torch.tensor(r.max_cos, dtype=torch.float64) - gram_reference(root, tuned, n, device)
            for n, r in left_records(result).items()]
    return max(float(e.abs().max()) for e in errs)


def agreement(result, base_cos: dict, root: Path, tuned: str, device: torch.device, n_arbiter: int = 2) -> dict:
    """Counts at each ε and max-cos differences over the matrices the baseline covered; for the
    ``n_arbiter`` largest differences above 1e-3, both against two float64 SVDs."""
    recs = left_records(result)
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
    for d, name in sorted(worst, reverse=True)[:n_arbiter]:  # who is right? float64 decides
        if (str(root), tuned, name) not in _FP64:
            _FP64[(str(root), tuned, name)] = reference_max_cos(root, tuned, name, device).double()
        ref64 = _FP64[(str(root), tuned, name)]
        arbiter.append({"name": name, "diff": d,
                        "lorascope_vs_fp64": float((torch.tensor(recs[name].max_cos) - ref64).abs().max()),
                        "baseline_vs_fp64": float((base_cos[name].double() - ref64).abs().max())})
    gram_ref = {n: gram_reference(root, tuned, n, device) for n in base_cos}
    vs64 = {"lorascope": max(float((torch.tensor(recs[n].max_cos, dtype=torch.float64) - r).abs().max())
                             for n, r in gram_ref.items()),
            "baseline": max(float((base_cos[n].double() - r).abs().max()) for n, r in gram_ref.items())}
    counts = {str(e): sum(sum(1 for c in recs[n].max_cos if c < e) for n in base_cos) for e in EPSILONS}
    return {"n_matrices": len(diffs), "max_abs_diff": max(diffs) if diffs else None,
            "median_abs_diff": statistics.median(diffs) if diffs else None,
            "n_over_1e-3": len(worst), "count_mismatches": {str(e): v for e, v in mismatches.items()},
            "intruders_at_eps": counts, "exact_fallbacks": sum(1 for n in base_cos if recs[n].exact),
            "max_abs_err_vs_fp64_gram_reference": vs64, "arbiter_fp64_svd": arbiter}


# -- per-matrix probes: Krylov steps, ESD power-law fits, stages --------------------------------
def krylov_steps(root: Path, cfg: dict, layers: int, device: torch.device) -> dict:
    """Krylov steps ``top_k`` takes on every matrix of the first ``layers`` layers (LoRA and full,
    started as in the scan from the float32 base basis): histograms {steps: matrices}, and how
    many fell back to the exact route."""
    from lorascope.io.checkpoint import Checkpoint
    from lorascope.spectral import LowRankDelta, Tuned, left_basis, top_k

    base = Checkpoint(root / "base")
    ad = Checkpoint(root / "lora" / "adapter_model.safetensors")
    full = Checkpoint(root / "full") if (root / "full").exists() else None
    hist: dict = {"lora": Counter(), "full": Counter()}
    exact = {"lora": 0, "full": 0}
    for name in matrix_names(cfg, layers):
        W = base.get(name).to(device, torch.float32)
        U0 = left_basis(W).U.to(W.dtype)
        key = "base_model.model." + name[: -len(".weight")]
        deltas = {"lora": LowRankDelta(ad.get(f"{key}.lora_B.weight").to(device),
                                       ad.get(f"{key}.lora_A.weight").to(device), ALPHA / RANK)}
        if full is not None:
            deltas["full"] = full.get(name).to(device, torch.float32) - W
        for kind, delta in deltas.items():
            r = top_k(Tuned(W, delta), K, init=U0)
            hist[kind][r.steps] += 1
            exact[kind] += int(r.exact)
    return {kind: {"histogram": {str(s): c for s, c in sorted(h.items())}, "exact_route": exact[kind]}
            for kind, h in hist.items() if h}


def esd_fits(root: Path, cfg: dict, device: torch.device) -> dict:
    """Power-law fit (bench_spectra.fit_powerlaw) of the eigenvalues of W Wᵀ of each layer-0 matrix,
    as stored (bf16), by module type."""
    from lorascope.io.checkpoint import Checkpoint

    base = Checkpoint(root / "base")
    out = {}
    for name in matrix_names(cfg, 1):
        W = base.get(name).to(device, torch.float64)
        G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        fit = bench_spectra.fit_powerlaw(torch.linalg.eigvalsh(G).cpu().numpy())
        out[name.split(".")[-2]] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in fit.items()}
    return out


def stage_times(root: Path, cfg: dict, device: torch.device, reps: int = 3) -> dict:
    """Median seconds of each step of one matrix per distinct shape (layer 0): base basis (float64
    Gram eigh), top-k of W_t (block Krylov, LoRA and full), Alg. 1 end to end, and the two SVDs."""
    from lorascope.io.checkpoint import Checkpoint
    from lorascope.scanning.analyze import analyze_matrix
    from lorascope.spectral import LowRankDelta, Tuned, top_k
    from lorascope.spectral import left_basis as gram_left_basis

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


def gram_left_basis_cached(U0: torch.Tensor):
    from lorascope.spectral import SVD

    return SVD(U=U0, S=torch.ones(U0.shape[1], dtype=torch.float64, device=U0.device))


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


# -- PEFT's reduce_intruder_dimension ----------------------------------------------------------
def peft_reduce(root: Path, cfg: dict, layers: int, device: torch.device) -> dict:
    """Time ``peft.tuners.lora.intruders.reduce_intruder_dimension`` (λ = 0.75, k = 10, ε = 0.5) on a
    PeftModel of the first ``layers`` layers (bf16 base from root/base, the root/lora factors of
    those layers); building the model is not timed. Returns seconds, matrices and the intruder
    count PEFT logged per matrix."""
    import logging
    import warnings

    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorascope.io.checkpoint import Checkpoint

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    names = matrix_names(cfg, layers)
    sliced = root / f"peft-adapter-{layers}-layers"
    ad = Checkpoint(root / "lora" / "adapter_model.safetensors")
    keys = [k for k in ad.keys() if any(f"model.{n[: -len('.weight')]}." in k for n in names)]
    write_adapter(sliced, {k: ad.get(k) for k in keys}, cfg, root / "base")
    config = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"], num_hidden_layers=layers,
                         num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], vocab_size=256,
                         tie_word_embeddings=True)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = Checkpoint(root / "base")
    missing, _ = model.load_state_dict({n: base.get(n) for n in names}, strict=False)
    assert not [m for m in missing if m in names], missing
    peft_model = PeftModel.from_pretrained(model, str(sliced)).to(device)
    lines: list[str] = []
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        reduce_intruder_dimension(peft_model, top_k=K, threshold_epsilon=0.5, mitigation_lambda=0.75,
                                  logging_sink=lines.append)
    _sync(device)
    seconds = time.perf_counter() - t0
    counts = {}
    for line in lines:  # "base_model.model.model.layers.0.self_attn.q_proj: Intruders: 3" / ": No intruders"
        module, sep, what = line.partition(": ")
        if sep:
            n = 0 if what == "No intruders" else int(what.removeprefix("Intruders: "))
            counts[module.removeprefix("base_model.model.") + ".weight"] = n
    shutil.rmtree(sliced, ignore_errors=True)
    return {"seconds": seconds, "n_matrices": len(names), "per_matrix_s": seconds / len(names),
            "intruders_by_matrix": counts}


# -- lorascope, timed --------------------------------------------------------------------------
class Runner:
    """Runs lorascope scan / mitigate as a CLI command in a new process (or, ``in_process``, through
    the Python API in this process) and returns what was timed and the results."""

    def __init__(self, device: torch.device, outs: Path, in_process: bool):
        self.device, self.outs, self.in_process = device, outs, in_process

    def scan(self, label: str, base: Path, tuned: list[Path], cache: Path | None = None, modules: str | None = None,
             streams: int | None = None) -> tuple[dict, list]:
        """One scan of ``tuned`` (one or several) against ``base``: ({wall_s, scan_s, fixed_s, …}, results)."""
        from lorascope.schema import ScanResult

        out = self.outs / label
        shutil.rmtree(out, ignore_errors=True)
        opts = {"cache_dir": cache, "modules": modules, "streams": streams}
        if self.in_process:
            from lorascope.scanning.api import scan_many

            _sync(self.device)
            t0 = time.perf_counter()
            results = scan_many(str(base), [str(t) for t in tuned], device=str(self.device), cache_budget=CACHE_BUDGET,
                                **{k: (str(v) if k == "cache_dir" and v else v) for k, v in opts.items()})
            _sync(self.device)
            wall, cmd = time.perf_counter() - t0, None
        else:
            cmd = ["scan", str(base), *map(str, tuned), "--device", str(self.device), "--out", str(out)]
            cmd += ["--cache-dir", str(cache), "--cache-budget", CACHE_BUDGET] if cache else []
            cmd += ["--modules", modules] if modules else []
            cmd += ["--streams", str(streams)] if streams else []
            wall = self._cli(label, cmd)
            labels = [Path(t).name for t in tuned]
            assert len(set(labels)) == len(labels), labels
            results = [ScanResult.load(out if len(tuned) == 1 else out / lab) for lab in labels]
        seconds = results[0].timing["seconds"]
        row = {"wall_s": round(wall, 3), "scan_s": seconds, "fixed_s": round(wall - seconds, 3),
               "n_matrices": len(results[0].matrices), "n_inputs": len(tuned),
               "command": None if cmd is None else "lorascope " + " ".join(cmd)}
        return row, results

    def mitigate(self, label: str, base: Path, adapter: Path, lam: float = 0.75) -> tuple[dict, object]:
        """``lorascope mitigate BASE ADAPTER --lam λ --out …``, timed like ``scan``."""
        from lorascope.schema import MitigationResult

        out = self.outs / label
        shutil.rmtree(out, ignore_errors=True)
        if self.in_process:
            from lorascope import mitigate

            _sync(self.device)
            t0 = time.perf_counter()
            result = mitigate(str(base), str(adapter), out, lam=lam, device=str(self.device))
            _sync(self.device)
            wall, cmd = time.perf_counter() - t0, None
        else:
            cmd = ["mitigate", str(base), str(adapter), "--lam", str(lam), "--out", str(out),
                   "--device", str(self.device)]
            wall = self._cli(label, cmd)
            result = MitigationResult.load(out)
        seconds = result.timing["seconds"]
        return ({"wall_s": round(wall, 3), "scan_s": seconds, "fixed_s": round(wall - seconds, 3),
                 "n_matrices": len(result.matrices), "command": None if cmd is None else "lorascope " + " ".join(cmd)},
                result)

    def _cli(self, label: str, args: list[str]) -> float:
        cmd = [sys.executable, "-m", "lorascope", *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"[{label}] {' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return wall


def max_cos_diff(a, b) -> float:
    """Largest |Δ max-cos| between two scans of the same matrices."""
    return max(abs(x - y) for r, q in zip(a.matrices, b.matrices, strict=True)
               for x, y in zip(r.max_cos, q.max_cos, strict=True))


def print_call(label: str, row: dict) -> None:
    print(f"[{label}] wall {row['wall_s']:.2f} s, in-process (timing.seconds) {row['scan_s']:.2f} s, "
          f"fixed cost {row['fixed_s']:.2f} s, {row['n_matrices']} matrices", flush=True)


# -- the benchmark -----------------------------------------------------------------------------
class Bench:
    """The rows of one run: each ``row_NAME`` measures, stores into ``report`` and saves it."""

    def __init__(self, args: argparse.Namespace, report: dict):
        self.args, self.report = args, report
        self.cfg = SHAPES[args.shape]
        self.layers = args.layers or self.cfg["layers"]
        self.device = torch.device(args.device)
        self.root = Path(args.workdir or tempfile.mkdtemp(prefix="lorascope-bench-"))
        self.runner = Runner(self.device, self.root / "out", args.in_process)
        self.names_all = matrix_names(self.cfg, self.layers)
        self.base_layers = min(self.layers, args.baseline_layers or 4)
        only = set(args.baseline_matrices.split(",")) if args.baseline_matrices else None
        self.names_baseline = matrix_names(self.cfg, self.base_layers, only)
        self.results: dict = {}  # row -> ScanResult list (this run only)
        self._cos: dict = {}  # tuned -> baseline top-k max-cos
        self.rows_done: set[str] = set()
        self._cache_filled = False  # this run filled root/cache
        self._warm = False
        report.setdefault("rows", {})

    # -- plumbing
    def save(self) -> None:
        self.report["table"] = target_table(self.report)
        if self.args.out:
            tmp = Path(self.args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(self.report, indent=2, default=str))
            tmp.replace(self.args.out)

    def store(self, row: str, entry: dict) -> dict:
        self.report["rows"][row] = entry
        self.rows_done.add(row)
        self.save()
        return entry

    def need(self, row: str) -> dict:
        """A row this one compares with: from this run or an appended earlier one, else run it now."""
        if row not in self.report["rows"]:
            getattr(self, "row_" + row.replace("-", "_"))()
        return self.report["rows"][row]

    def result_of(self, row: str):
        """The ScanResult of a row of this run, or the scan.json an earlier command left in the workdir."""
        from lorascope.schema import ScanResult

        if row in self.results:
            return self.results[row][0]
        path = self.runner.outs / row / "scan.json"
        return ScanResult.load(path) if row in self.report["rows"] and path.exists() else None

    def build(self) -> None:
        """The main model (smooth family, all layers), unless only families are measured."""
        rows = self.args.rows
        if rows == ["families"]:
            return
        full_ft = "full" in rows
        wanted = ("base", "full") if full_ft else ("base",)
        t = time.perf_counter()
        if not built_with(self.root, self.layers, wanted):
            clear_model(self.root)
            build_model(self.root, self.cfg, self.layers, self.device, full_ft)
        self.report["build_seconds"] = round(time.perf_counter() - t, 1)
        print(f"model in {self.root} ({self.report['build_seconds']} s)", flush=True)

    def warm_up(self, model: Path) -> None:
        """Solver handles in this process (baseline, references), then one untimed scan of layer 0 (a
        CLI call: OS file caches, .pyc files; in-process: imports and CUDA libraries)."""
        if self._warm:
            return
        self._warm = True
        _warm_up(self.device)
        row, _ = self.runner.scan("warm-up", model / "base", [model / "lora"], modules=r"layers\.0\.")
        self.report["warm_up"] = row
        print(f"warm-up (layer 0, not counted): wall {row['wall_s']:.2f} s", flush=True)

    def baseline_for(self, tuned: str) -> dict:
        if tuned not in self._cos:
            b = baseline(self.root, tuned, self.names_baseline, self.device)
            self._cos[tuned] = b["cos"]
            proj = project(self.cfg, b["per_matrix_s"], self.names_all)
            self.report.setdefault("baseline", {})[tuned] = {
                "matrices": list(b["per_matrix_s"]), "measured_s": b["seconds"], "projected_all_s": proj["seconds"],
                "n_all": proj["n_matrices"], "per_shape_s": proj["per_shape_s"]}
            print(f"[baseline {tuned}] {b['seconds']:.1f} s for {len(self.names_baseline)} matrices "
                  f"-> {proj['seconds']:.1f} s projected to {len(self.names_all)}", flush=True)
            self.save()
        return self.report["baseline"][tuned]

    def scan_row(self, row: str, tuned: str, cache: Path | None = None) -> dict:
        entry, results = self.runner.scan(row, self.root / "base", [self.root / tuned], cache=cache)
        print_call(row, entry)
        self.results[row] = results
        self.store(row, entry)
        self.baseline_for(tuned)
        entry["agreement"] = agreement(results[0], self._cos[tuned], self.root, tuned, self.device, self.args.arbiter)
        print(f"[{row}] agreement with the baseline: {json.dumps(entry['agreement'])}", flush=True)
        for st in self.args.streams:
            if row in ("lora", "cached"):
                e, _ = self.runner.scan(f"{row}-streams{st}", self.root / "base", [self.root / tuned], cache=cache,
                                        streams=st)
                entry.setdefault("by_streams", {})[st] = e
                print_call(f"{row}, streams={st}", e)
        return self.store(row, entry)

    # -- rows
    def row_lora(self) -> None:
        self.scan_row("lora", "lora")

    def row_fill(self) -> None:
        shutil.rmtree(self.root / "cache", ignore_errors=True)
        self.scan_row("fill", "lora", cache=self.root / "cache")
        self._cache_filled = True

    def row_cached(self) -> None:
        if not self._cache_filled:
            self.row_fill()
        entry = self.scan_row("cached", "lora", cache=self.root / "cache")
        lora_result = self.result_of("lora")
        if lora_result is not None:
            entry["max_cos_diff_vs_uncached"] = max_cos_diff(lora_result, self.results["cached"][0])
            self.store("cached", entry)
        if not self.args.keep_cache:
            shutil.rmtree(self.root / "cache", ignore_errors=True)

    def row_full(self) -> None:
        self.scan_row("full", "full")

    def row_many(self) -> None:
        n = self.args.adapters
        lora = self.need("lora")
        extra = []
        for seed in range(1, n):
            path = self.root / "adapters" / f"seed-{seed}"
            if not (path / "adapter_config.json").exists():
                build_adapter(path, self.cfg, self.layers, self.device, seed, self.root / "base")
            extra.append(path)
        entry, results = self.runner.scan("many", self.root / "base", [self.root / "lora", *extra])
        print_call(f"many: {n} adapters", entry)
        after_first = entry["wall_s"] - lora["wall_s"]
        in_scan = entry["scan_s"] - lora["scan_s"]  # the same without the two processes' start-up
        entry |= {"adapters": n, "first_scan_wall_s": lora["wall_s"], "after_first_s": after_first,
                  "adapters_per_minute": 60 * (n - 1) / after_first if after_first > 0 else None,
                  "adapters_per_minute_in_scan": 60 * (n - 1) / in_scan if in_scan > 0 else None}
        lora_result = self.result_of("lora")
        if lora_result is not None:  # the batch gives each input the records of its own scan
            entry["first_adapter_max_cos_diff_vs_lora_row"] = max_cos_diff(lora_result, results[0])
        entry["intruders_per_adapter"] = [r.summary()["sides"]["left"]["n_intruders"] for r in results]
        def rate(x: float | None) -> str:
            return "n/a (the batch took less than the first scan: noise)" if x is None else f"{x:.1f}"

        print(f"[many] adapters per minute after the first: {rate(entry['adapters_per_minute'])} by wall clock "
              f"({after_first:.2f} s for {n - 1}), {rate(entry['adapters_per_minute_in_scan'])} by in-scan seconds",
              flush=True)
        self.store("many", entry)

    def row_mitigate(self) -> None:
        lora = self.need("lora")
        entry, result = self.runner.mitigate("mitigate", self.root / "base", self.root / "lora")
        print_call("mitigate", entry)
        entry["vs_lora_wall"] = entry["wall_s"] / lora["wall_s"]
        self.store("mitigate", entry)
        peft = peft_reduce(self.root, self.cfg, self.base_layers, self.device)
        peft["projected_all_s"] = peft["per_matrix_s"] * len(self.names_all)
        ours = {m.name: m.n_intruders for m in result.matrices}
        peft["intruder_count_mismatches"] = sorted(
            n for n, c in peft["intruders_by_matrix"].items() if ours.get(n) != c)
        entry["peft"] = peft
        entry["peft_projected_vs_mitigate_wall"] = peft["projected_all_s"] / entry["wall_s"]
        print(f"[mitigate] PEFT reduce_intruder_dimension: {peft['seconds']:.1f} s for {peft['n_matrices']} matrices "
              f"-> {peft['projected_all_s']:.1f} s projected; intruder counts differ on "
              f"{len(peft['intruder_count_mismatches'])} of {peft['n_matrices']}", flush=True)
        self.store("mitigate", entry)

    def row_stages(self) -> None:
        self.store("stages", stage_times(self.root, self.cfg, self.device))

    def row_eigh_floor(self) -> None:
        floor = {th: eigh_floor(self.root, self.names_baseline, self.device, th) for th in (1, 8)}
        print(f"float64 eigh of the base Gram alone: {json.dumps(floor)} s per matrix", flush=True)
        self.store("eigh-floor", {"s_per_matrix_by_threads": floor})

    def row_families(self) -> None:
        for fam in bench_spectra.expand(self.args.families):
            Family(self, fam).run()
            self.save()
        self.rows_done.add("families")


class Family:
    """The lora / fill / cached / full rows on a model of ``--family-layers`` layers whose spectra
    come from one family, projected to the whole model; plus Krylov steps, float64 errors, ESD fit."""

    def __init__(self, bench: Bench, family: str):
        self.b, self.family = bench, family
        self.L = min(bench.args.family_layers, bench.layers)
        self.dir = bench.root / "families" / family
        reuse = family == "smooth" and built_with(bench.root, bench.layers, ("base", "full"))
        self.model = bench.root if reuse else self.dir  # the smooth family is the main model's first L layers

    def run(self) -> dict:
        b, L = self.b, self.L
        if not built_with(self.model, b.layers if self.model == b.root else L, ("base", "full")):
            t = time.perf_counter()
            clear_model(self.model)
            build_model(self.model, b.cfg, L, b.device, True, family=self.family)
            print(f"[{self.family}] model of {L} layers built in {time.perf_counter() - t:.1f} s", flush=True)
        b.warm_up(self.model)
        entry: dict = {"layers_scanned": L, "projected_to_layers": b.layers, "model": str(self.model),
                       "esd_powerlaw_fit_layer0": esd_fits(self.model, b.cfg, b.device)}
        b.report.setdefault("families", {})[self.family] = entry  # saved as it fills
        print(f"[{self.family}] ESD power-law α (layer 0): " + ", ".join(
            f"{m} {f['alpha']:.2f}" for m, f in entry["esd_powerlaw_fit_layer0"].items() if f["alpha"]), flush=True)
        calls, results = self.calls(entry)
        entry["projected_wall_s"] = {row: self.project(c) for row, c in calls.items()}
        b.save()
        entry["baseline"] = self.baselines()
        b.save()
        entry["max_err_vs_fp64"] = {row: max_err_vs_fp64(res, self.model, "full" if row == "full" else "lora", b.device)
                                    for row, res in results.items()}
        entry["krylov_steps"] = krylov_steps(self.model, b.cfg, L, b.device)
        if self.model == b.root and L < b.layers:  # the same model was measured whole: how good is the projection?
            entry["projection_check"] = {row: {"projected_s": entry["projected_wall_s"][row], "measured_s": m["wall_s"]}
                                         for row, m in b.report["rows"].items() if row in entry["projected_wall_s"]}
            print(f"[{self.family}] projection check (whole model measured): {json.dumps(entry['projection_check'])}",
                  flush=True)
        pw, base = entry["projected_wall_s"], entry["baseline"]
        entry["ratios"] = {"lora": base["lora"]["projected_all_s"] / pw["lora"],
                           "cached": base["lora"]["projected_all_s"] / pw["cached"],
                           "full": base["full"]["projected_all_s"] / pw["full"], "fill": pw["fill"] / pw["lora"]}
        print(f"[{self.family}] projected to {b.layers} layers: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in pw.items()) + "; ratios " + ", ".join(
            f"{k} {v:.2f}" for k, v in entry["ratios"].items()), flush=True)
        print(f"[{self.family}] Krylov steps {json.dumps(entry['krylov_steps'])}; max-cos error vs float64 "
              f"{json.dumps(entry['max_err_vs_fp64'])}", flush=True)
        for tag in ("1", "L"):
            shutil.rmtree(self.dir / f"cache-{tag}", ignore_errors=True)
        return entry

    def calls(self, entry: dict) -> tuple[dict, dict]:
        """Two CLI calls per row: layer 0 only ('1') and all L layers ('L'); results of the latter."""
        b = self.b
        calls: dict = entry.setdefault("calls", {})
        results = {}
        for row, tuned, cached in (("lora", "lora", None), ("full", "full", None), ("fill", "lora", "fill"),
                                   ("cached", "lora", "cached")):
            for tag, n_layers in (("1", 1), ("L", self.L)):
                cache = self.dir / f"cache-{tag}" if cached else None
                if cached == "fill":
                    shutil.rmtree(cache, ignore_errors=True)
                label = f"{self.family}-{row}-{tag}"
                c, res = b.runner.scan(label, self.model / "base", [self.model / tuned], cache=cache,
                                       modules=layer_regex(n_layers))
                print_call(f"{self.family} {row}, {n_layers} layer(s)", c)
                calls.setdefault(row, {})[tag] = c
                b.save()
                if tag == "L":
                    results[row] = res[0]
        return calls, results

    def project(self, c: dict) -> float:
        """Whole-model wall: the L-layer call plus (layers − L) × the in-scan seconds per extra layer."""
        if self.L == self.b.layers:
            return c["L"]["wall_s"]
        per_layer = (c["L"]["scan_s"] - c["1"]["scan_s"]) / (self.L - 1)
        return c["L"]["wall_s"] + (self.b.layers - self.L) * per_layer

    def baselines(self) -> dict:
        b = self.b
        layers = min(b.args.family_baseline_layers, self.L)
        only = set(b.args.baseline_matrices.split(",")) if b.args.baseline_matrices else None
        names = matrix_names(b.cfg, layers, only)
        out = {}
        for tuned in ("lora", "full"):
            r = baseline(self.model, tuned, names, b.device)
            proj = project(b.cfg, r["per_matrix_s"], b.names_all)
            err = max(float((r["cos"][n].double() - gram_reference(self.model, tuned, n, b.device)).abs().max())
                      for n in names)
            out[tuned] = {"matrices": len(names), "seconds": r["seconds"], "per_shape_s": proj["per_shape_s"],
                          "projected_all_s": proj["seconds"], "baseline_max_err_vs_fp64": err}
            print(f"[{self.family}] baseline {tuned}: {r['seconds']:.1f} s for {len(names)} matrices -> "
                  f"{proj['seconds']:.1f} s projected", flush=True)
        return out


def _warm_up(device: torch.device) -> None:
    """Create the solver handles and kernels once, outside every timed region."""
    x = torch.randn(64, 48, device=device)
    torch.linalg.svd(x, full_matrices=False)
    torch.linalg.eigh((x @ x.T).double())
    torch.linalg.eigh(x @ x.T)
    _sync(device)


# -- targets -----------------------------------------------------------------------------------
def target_table(report: dict) -> list[dict]:
    """Every target the report has the numbers for: {what, goal, measured, met}."""
    rows, base = report.get("rows", {}), report.get("baseline", {})
    table: list[dict] = []

    def add(what: str, value: float | None, goal: float, at_least: bool, unit: str = "×") -> None:
        if value is None:
            return
        met = value >= goal if at_least else value <= goal
        fmt = (lambda v: f"{v:.2f} {unit}") if unit == "s" else (lambda v: f"{v:.3g}{unit}")
        table.append({"what": what, "goal": ("≥ " if at_least else "≤ ") + fmt(goal), "measured": fmt(value),
                      "value": value, "met": met})

    for row in ("lora", "fill", "cached", "full", "many", "mitigate"):
        if row in rows and rows[row].get("command"):  # a CLI call (in-process rows have no fixed cost)
            add(f"fixed cost, {row} (wall − timing.seconds)", rows[row]["fixed_s"], TARGETS["fixed_s"], False, "s")
    slice_note = "" if report.get("layers") == SHAPES.get(report.get("shape"), {}).get("layers") else \
        f" [{report.get('shape')}, {report.get('layers')} layers]"
    for row, tuned in (("lora", "lora"), ("cached", "lora"), ("full", "full")):
        if row in rows and tuned in base:
            add(f"{row} vs two-SVD baseline{slice_note}", base[tuned]["projected_all_s"] / rows[row]["wall_s"],
                TARGETS[row], True)
    if "fill" in rows and "lora" in rows:
        add("fill vs lora first scan (wall)", rows["fill"]["wall_s"] / rows["lora"]["wall_s"], TARGETS["fill"], False)
    if "many" in rows:
        n = rows["many"]["adapters"]
        add(f"many: adapters per minute after the first (n = {n})", rows["many"]["adapters_per_minute"],
            TARGETS["many_per_min"], True, "/min")
        add(f"many: the same from in-scan seconds (n = {n})", rows["many"].get("adapters_per_minute_in_scan"),
            TARGETS["many_per_min"], True, "/min")
    if "mitigate" in rows:
        m = rows["mitigate"]
        add("mitigate vs lora first scan (wall)", m["vs_lora_wall"], TARGETS["mitigate_vs_lora"], False)
        if "peft" in m:
            add("mitigate vs PEFT reduce_intruder_dimension", m["peft_projected_vs_mitigate_wall"],
                TARGETS["mitigate_vs_peft"], True)
    for fam, f in report.get("families", {}).items():
        if "ratios" not in f:  # cut short
            continue
        r = f["ratios"]
        tag = f"family {fam} (projected from {f['layers_scanned']} layers)"
        add(f"{tag}: lora", r["lora"], TARGETS["lora"], True)
        add(f"{tag}: cached", r["cached"], TARGETS["cached"], True)
        add(f"{tag}: full", r["full"], TARGETS["full"], True)
        add(f"{tag}: fill vs lora", r["fill"], TARGETS["fill"], False)
        cli = [c for cs in f["calls"].values() for c in cs.values() if c.get("command")]
        if cli:
            add(f"family {fam}: fixed cost, max of {len(cli)} calls", max(c["fixed_s"] for c in cli),
                TARGETS["fixed_s"], False, "s")
    return table


def print_table(report: dict) -> None:
    rows = report.get("rows", {})
    calls = [(r, e) for r, e in rows.items() if isinstance(e, dict) and "wall_s" in e]
    if calls:
        print(f"\n{'CLI row' if report.get('timing') == 'cli' else 'row':10s} {'wall s':>8s} {'in-process s':>13s} "
              f"{'fixed s':>8s}")
        for r, e in calls:
            print(f"{r:10s} {e['wall_s']:8.2f} {e['scan_s']:13.2f} {e['fixed_s']:8.2f}")
    for fam, f in report.get("families", {}).items():
        if "ratios" not in f:
            continue
        st = f["krylov_steps"]
        print(f"family {fam:9s} Krylov steps " + "; ".join(
            f"{k}: " + " ".join(f"{s}×{c}" for s, c in v["histogram"].items()) + f" (exact route {v['exact_route']})"
            for k, v in st.items()) + "; max-cos error vs float64 " + ", ".join(
            f"{k} {v:.1e}" for k, v in f["max_err_vs_fp64"].items()))
    table = report.get("table", [])
    if table:
        w = max(len(t["what"]) for t in table)
        print(f"\n{'target':{w}s} {'goal':>12s} {'measured':>12s}")
        for t in table:
            print(f"{t['what']:{w}s} {t['goal']:>12s} {t['measured']:>12s}  {'met' if t['met'] else 'MISSED'}")
    sys.stdout.flush()


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="layers to build and scan (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", default=None, help=f"comma-separated, from {','.join(ROWS)} (default: "
                    f"{DEFAULT_ROWS_OTHER}; 70b: {DEFAULT_ROWS['70b']})")
    ap.add_argument("--in-process", action="store_true", help="time lorascope.scan in this process, not the CLI")
    ap.add_argument("--baseline-layers", type=int, default=None,
                    help="layers the baseline (and PEFT's mitigation) runs on (default: all when ≤ 4 layers, else 4)")
    ap.add_argument("--baseline-matrices", default=None,
                    help="module types the baseline times, e.g. q_proj,v_proj,gate_proj (70b default; else all)")
    ap.add_argument("--arbiter", type=int, default=None,
                    help="matrices per row checked with two float64 SVDs when lorascope and the baseline differ by "
                         "> 1e-3 (default 2; 70b: 0, float64 SVDs of 28672 × 8192 take minutes)")
    ap.add_argument("--adapters", type=int, default=8, help="adapters in the 'many' row (≥ 2)")
    ap.add_argument("--families", default="smooth,powerlaw,real", help="spectrum families: smooth, powerlaw, "
                    "smollm2, minilm; real = smollm2,minilm")
    ap.add_argument("--family-layers", type=int, default=2, help="layers of each family's model (≥ 2)")
    ap.add_argument("--family-baseline-layers", type=int, default=1, help="layers the baseline runs on per family")
    ap.add_argument("--streams", default="", help="comma-separated stream counts: also time lora and cached with each")
    ap.add_argument("--keep-cache", action="store_true", help="keep the basis cache after the cached row")
    ap.add_argument("--workdir", default=None, help="where the model files go (default: a temp dir, removed after)")
    ap.add_argument("--out", default=None, help="write every number here as JSON, after every row")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out (same shape and layers)")
    ap.add_argument("--build-only", action="store_true", help="write the model files to --workdir and stop")
    for old, rows in (("--full-ft", "full"), ("--cached", "fill,cached"), ("--stages", "stages"),
                      ("--eigh-floor", "eigh-floor")):
        ap.add_argument(old, action="append_const", const=rows, dest="extra_rows", help=f"also the {rows} row(s)")
    ap.add_argument("--cli", action="store_true", help="(the default now; kept for old command lines)")
    ap.add_argument("--no-cache-scan", action="store_true", help="(the lora row is a scan without a cache now)")
    args = ap.parse_args(argv)
    rows = (args.rows or DEFAULT_ROWS.get(args.shape, DEFAULT_ROWS_OTHER)).split(",") + \
        ",".join(args.extra_rows or []).split(",")
    args.rows = [r for r in ROWS if r in rows]
    unknown = set(rows) - set(ROWS) - {""}
    if unknown:
        ap.error(f"unknown rows: {', '.join(sorted(unknown))}")
    if args.shape == "70b" and args.baseline_matrices is None:
        args.baseline_matrices = "q_proj,v_proj,gate_proj"
    if args.arbiter is None:
        args.arbiter = 0 if args.shape == "70b" else 2
    args.streams = [int(x) for x in args.streams.split(",") if x]
    if args.adapters < 2:
        ap.error("--adapters must be at least 2")
    if "families" in args.rows:
        bench_spectra.expand(args.families)
        layers = args.layers or SHAPES[args.shape]["layers"]
        if args.family_layers < 2 and layers > args.family_layers:
            ap.error("--family-layers must be at least 2 to project to the whole model")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    layers = args.layers or SHAPES[args.shape]["layers"]
    device = torch.device(args.device)
    header = {"shape": args.shape, "layers": layers, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "matrices_per_layer": len(modules(SHAPES[args.shape])),
              "timing": "in-process" if args.in_process else "cli"}
    report: dict = {}
    if args.append and args.out and Path(args.out).exists():
        report = json.loads(Path(args.out).read_text())
        if (report.get("shape"), report.get("layers")) != (args.shape, layers):
            raise SystemExit(f"--append: {args.out} holds {report.get('shape')} with {report.get('layers')} layers")
    report |= header | {"argv": sys.argv[1:]}
    report.setdefault("runs", []).append({"rows": args.rows, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    bench = Bench(args, report)
    report["baseline_layers"] = bench.base_layers
    try:
        bench.build()
        if args.build_only:
            return report
        if args.rows != ["families"]:
            bench.warm_up(bench.root)
        for row in args.rows:
            if row not in bench.rows_done:
                getattr(bench, "row_" + row.replace("-", "_"))()
        bench.save()
        print_table(report)
    finally:
        bench.save()
        if args.workdir is None:
            shutil.rmtree(bench.root, ignore_errors=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
