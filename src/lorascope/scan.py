"""Pair base and tuned matrices, stream them one at a time, and run Alg. 1 on each.

For every matrix W_0 (base) and W_t = W_0 + ΔW (tuned), per side (left: output space):
  1. all singular vectors x_i of W_0 (``left_basis``, in float64: the Gram route needs it),
  2. the top-k singular triplets (σ_j, y_j) of W_t (``top_k``, products only for low-rank ΔW),
  3. max_i |cos(y_j, x_i)| and the argmax; y_j is an intruder when the max is below ε (Alg. 1),
  4. the spectrum of ΔW (exact from the LoRA core), its effective and stable ranks, ‖ΔW‖_F/‖W_0‖_F.
Only one matrix pair is in memory at a time.
"""

from __future__ import annotations

import datetime as _dt
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from lorascope.errors import InputError
from lorascope.io.adapters import TunedSource, open_tuned
from lorascope.io.checkpoint import Checkpoint
from lorascope.io.layout import matrix_kinds, orient
from lorascope.schema import MatrixRecord, ScanResult, parse_name
from lorascope.spectral import (
    SVD,
    Delta,
    Tuned,
    delta_frobenius,
    delta_singular_values,
    effective_rank,
    left_basis,
    max_abs_cos,
    null_max_cos,
    stable_rank,
    top_k,
)
from lorascope.spectral.operators import delta_T, delta_to

N_MAP = 32  # base vectors kept in each record's similarity map (paper Figs. 1-3 show the top ones)
N_DELTA_SV = 256  # ΔW singular values kept per record


@dataclass
class MatrixPair:
    name: str  # base tensor name
    kind: str
    ref: str  # the tuned source's reference for it


BasisFn = Callable[[str, torch.Tensor], SVD]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def pair_matrices(
    base: Checkpoint, tuned: TunedSource, modules: str | None = None, embeddings: bool = False
) -> tuple[list[MatrixPair], dict[str, list[str]]]:
    """The matrices to scan, in base order, and what could not be paired (reported, not hidden)."""
    kinds = matrix_kinds(base)
    mapping = tuned.pair(base, kinds)
    pattern = re.compile(modules) if modules else None
    pairs, skipped = [], {"embeddings_not_requested": [], "not_matching_modules": []}
    for name, kind in kinds.items():
        if name not in mapping:
            continue
        if kind == "embedding" and not embeddings:
            skipped["embeddings_not_requested"].append(name)
        elif pattern is not None and not pattern.search(name):
            skipped["not_matching_modules"].append(name)
        else:
            pairs.append(MatrixPair(name, kind, mapping[name]))
    if not pairs:
        raise InputError(
            f"no weight matrix to scan between {base.root} and {tuned.description}"
            + (f" matching --modules '{modules}'" if modules else "")
        )
    skipped["base_only"] = sorted(set(kinds) - set(mapping)) if tuned.kind == "full" else []
    skipped["not_in_base"] = list(getattr(tuned, "unpaired", []))
    return pairs, {k: v for k, v in skipped.items() if v}


def analyze_matrix(
    name: str,
    kind: str,
    W0: torch.Tensor,
    delta: Delta,
    k: int,
    epsilon: float,
    sides: tuple[str, ...] = ("left",),
    basis: BasisFn | None = None,
) -> list[MatrixRecord]:
    """Alg. 1 and the ΔW spectrum for one matrix, W0 and ΔW in (out, in) layout and compute dtype."""
    m, n = W0.shape
    if k > min(m, n):
        raise InputError(f"tensor '{name}' has shape {(m, n)}: k={k} exceeds its rank bound {min(m, n)}")
    dsv = delta_singular_values(delta)
    base_norm = float(W0.norm())
    delta_stats = dict(
        delta_singular_values=[float(s) for s in dsv[:N_DELTA_SV]],
        delta_effective_rank=effective_rank(dsv),
        delta_stable_rank=stable_rank(dsv),
        delta_rel_norm=delta_frobenius(delta) / base_norm if base_norm > 0 else float("inf"),
    )
    layer, module_type = parse_name(name)
    records = []
    for side in sides:
        W, d = (W0, delta) if side == "left" else (W0.T, delta_T(delta))
        base = basis(f"{name}:{side}", W) if basis else left_basis(W.double())
        U0 = base.U.to(W.dtype)
        tuned = top_k(Tuned(W, d), k, init=U0)  # top_k starts from the first k + oversample columns
        cos, idx = max_abs_cos(tuned.U, U0)
        sim = (U0[:, :N_MAP].T @ tuned.U).abs().T  # (k, N_MAP)
        null = _null(W.shape[0], U0.shape[1])
        records.append(
            MatrixRecord(
                name=name, kind=kind, side=side, shape=[m, n], layer=layer, module_type=module_type,
                singular_values=_floats(tuned.S), max_cos=_floats(cos), best_match=[int(i) for i in idx],
                n_intruders=int((cos < epsilon).sum()), similarity=[_floats(r) for r in sim],
                base_singular_values=_floats(base.S[:N_MAP]), null_max_cos=null["mean"],
                null_max_cos_q99=null["q99"], exact=tuned.exact, **delta_stats,
            )
        )
    return records


@lru_cache(maxsize=64)
def _null(dim: int, n_basis: int) -> dict[str, float]:
    return null_max_cos(dim, n_basis)


def _floats(t: torch.Tensor) -> list[float]:
    return [round(x, 7) for x in t.detach().cpu().flatten().tolist()]  # one transfer, no per-element sync


def iter_scan(
    base_ckpt: Checkpoint,
    tuned: TunedSource,
    pairs: list[MatrixPair],
    k: int,
    epsilon: float,
    sides: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    basis: BasisFn | None = None,
) -> Iterator[list[MatrixRecord]]:
    """Stream the pairs: load one base matrix and its update, analyse, release."""
    for p in pairs:
        W0 = orient(base_ckpt.get(p.name), p.kind).to(device=device, dtype=dtype)
        delta = delta_to(tuned.delta(p.ref, W0, p.kind), device, dtype)
        yield analyze_matrix(p.name, p.kind, W0, delta, k, epsilon, sides, basis)


def scan(
    base: str,
    tuned: str,
    k: int = 10,
    epsilon: float = 0.5,
    side: str = "left",
    modules: str | None = None,
    embeddings: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = False,
    basis: BasisFn | None = None,
    cache_dir: str | None = None,
    cache_budget: str | int = "20GB",
    streams: int | None = None,
) -> ScanResult:
    """Compare a fine-tuned model or adapter with its base (paper Alg. 1 on every matrix).

    ``base``: HF model folder, weight file or hub id. ``tuned``: the same for a full fine-tune, or a
    PEFT adapter folder. Returns a ``ScanResult``; ``result.save(dir)`` writes scan.json.
    ``cache_dir``: keep base decompositions there (``lorascope.cache``, LRU within ``cache_budget``).
    Under torchrun the matrices are split over the ranks (``lorascope.distributed``). Reads overlap
    the arithmetic, and ``streams`` matrices are analysed at once (default 8 on a GPU, 1 on the CPU;
    ``lorascope.pipeline.scan_records``).
    """
    if not 0 < epsilon <= 1:
        raise InputError(f"epsilon must lie in (0, 1], got {epsilon}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if streams is not None and streams < 1:
        raise InputError(f"streams must be at least 1, got {streams}")
    sides = {"left": ("left",), "right": ("right",), "both": ("left", "right")}.get(side)
    if sides is None:
        raise InputError(f"side must be left, right or both, got '{side}'")
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if torch_dtype is None:
        raise InputError(f"dtype must be float32 or float64, got '{dtype}'")
    from lorascope import distributed, pipeline
    from lorascope.cache import BasisCache

    dev = distributed.setup(resolve_device(device))
    t0 = time.perf_counter()
    base_ckpt = Checkpoint(base)
    tuned_src = open_tuned(tuned)
    pairs, unpaired = pair_matrices(base_ckpt, tuned_src, modules, embeddings)
    cache = BasisCache(cache_dir, cache_budget) if cache_dir and basis is None else None
    share = distributed.share(pairs, base_ckpt)
    records: list[MatrixRecord] = []
    stream = pipeline.scan_records(base_ckpt, tuned_src, share, k, epsilon, sides, dev, torch_dtype, basis, cache,
                                   streams=streams)
    if progress:
        from rich.progress import track

        stream = track(stream, total=len(share), description="scanning matrices", transient=True)
    for recs in stream:
        records.extend(recs)
    records = distributed.gather(records, pairs)
    settings = dict(
        base=str(base), tuned=str(tuned), tuned_kind=tuned_src.kind, k=k, epsilon=epsilon, side=side,
        modules=modules, embeddings=embeddings, device=str(dev), dtype=dtype, base_basis_dtype="float64",
    )
    return ScanResult(
        settings=settings,
        matrices=records,
        versions=library_versions(),
        unpaired=unpaired,
        timing={"seconds": round(time.perf_counter() - t0, 3), "n_matrices": len(pairs)},
        command=" ".join(sys.argv) if sys.argv and "lorascope" in sys.argv[0] else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def library_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lorascope", "torch", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out
