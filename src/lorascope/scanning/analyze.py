"""Alg. 1 and the ΔW spectrum for one matrix pair: the leaf of every scan.

For W_0 (base) and W_t = W_0 + ΔW (tuned), per side (left: output space; right: Wᵀ):
  1. all singular vectors x_i of W_0 (``basis`` hook, default ``spectral.left_basis``, float64),
  2. the top-k singular triplets (σ_j, y_j) of W_t (``spectral.top_k``, products only for a LoRA ΔW),
  3. max_i |cos(y_j, x_i)| and the argmax; y_j is an intruder when the max is below ε (Alg. 1),
  4. the spectrum of ΔW (exact from the LoRA core), its effective and stable ranks, ‖ΔW‖_F/‖W_0‖_F
     and the excess kurtosis of its entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch

from lorascope.errors import InputError
from lorascope.schema import MatrixRecord, parse_name
from lorascope.spectral import (
    SVD,
    Delta,
    delta_frobenius,
    delta_kurtosis,
    delta_singular_values,
    effective_rank,
    left_basis,
    max_abs_cos,
    null_max_cos,
    stable_rank,
)
from lorascope.spectral.decompose import CPU_EXACT_UP_TO, top_k_stack
from lorascope.spectral.operators import TunedStack, delta_T
from lorascope.spectral.ranks import lowrank_frobenius, lowrank_kurtosis, lowrank_singular_values

N_MAP = 32  # base vectors kept in each record's similarity map (paper Figs. 1-3 show the top ones)
N_DELTA_SV = 256  # ΔW singular values kept per record

BasisFn = Callable[[str, torch.Tensor], SVD]


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
    return analyze_matrices(name, kind, W0, [delta], k, epsilon, sides, basis)[0]


def analyze_matrices(
    name: str,
    kind: str,
    W0: torch.Tensor,
    deltas: list[Delta],
    k: int,
    epsilon: float,
    sides: tuple[str, ...] = ("left",),
    basis: BasisFn | None = None,
) -> list[list[MatrixRecord]]:
    """``analyze_matrix`` of every update in ``deltas`` against one base matrix, one list of records
    (one per side) per update: the base basis is computed once, LoRA updates of one rank run their
    top-k together (``top_k_stack``), and every number goes to the host in one transfer per side, so
    N adapters of one base cost about the kernel launches of one (the many-adapter scan)."""
    m, n = W0.shape
    if k > min(m, n):
        raise InputError(f"tensor '{name}' has shape {(m, n)}: k={k} exceeds its rank bound {min(m, n)}")
    groups = TunedStack.of(W0, deltas)
    base_norm = float(W0.norm())
    stats: list[dict] = [{}] * len(deltas)
    for idx, stack in groups:
        for i, st in zip(idx, _delta_stats(stack, base_norm), strict=True):
            stats[i] = st
    layer, module_type = parse_name(name)
    records: list[list[MatrixRecord]] = [[] for _ in deltas]
    for side in sides:
        W = W0 if side == "left" else W0.T
        base = basis(f"{name}:{side}", W) if basis else left_basis(W)
        U0 = base.U.to(W.dtype)
        exact_up_to = CPU_EXACT_UP_TO if W.device.type == "cpu" else 0  # where the exact route is cheaper
        tuned: list[SVD] = [None] * len(deltas)  # type: ignore[list-item]
        for idx, stack in groups:
            if side != "left":
                stack = TunedStack(W, [delta_T(d) for d in stack.deltas])
            # Krylov from U0's first k + oversample (and each update's column space)
            for i, t in zip(idx, top_k_stack(stack, k, init=U0, exact_up_to=exact_up_to), strict=True):
                tuned[i] = t
        # per update, not on the N top-k's side by side: the same products as a scan of it alone
        matches = [max_abs_cos(t.U, U0) for t in tuned]
        sims = [(U0[:, :N_MAP].T @ t.U).abs().T for t in tuned]  # (k, N_MAP) each
        host = _to_host([torch.cat([t.S for t in tuned]), torch.cat([c for c, _ in matches]),
                         torch.cat([b for _, b in matches]), torch.cat(sims), base.S[:N_MAP]])
        S_all, cos_all, best_all, sim_all, base_s = host
        null = _null(W.shape[0], U0.shape[1])
        for i, t in enumerate(tuned):
            rows = slice(i * k, (i + 1) * k)
            c = cos_all[rows]
            records[i].append(
                MatrixRecord(
                    name=name, kind=kind, side=side, shape=[m, n], layer=layer, module_type=module_type,
                    singular_values=_rounded(S_all[rows]), max_cos=_rounded(c),
                    best_match=[int(j) for j in best_all[rows].tolist()],
                    n_intruders=int((c < epsilon).sum()), similarity=[_rounded(r) for r in sim_all[rows]],
                    base_singular_values=_rounded(base_s), null_max_cos=null["mean"],
                    null_max_cos_q99=null["q99"], exact=t.exact, **stats[i],
                )
            )
    return records


def _delta_stats(stack: TunedStack, base_norm: float) -> list[dict]:
    """Each update's ΔW spectrum (exact from the LoRA core), effective and stable ranks,
    ‖ΔW‖_F/‖W_0‖_F and excess kurtosis: for a LoRA stack computed together and read in one transfer."""
    if stack.lowrank:
        scale = stack.scale.abs()
        dsv, fro, kurt = _to_host([lowrank_singular_values(stack.B, stack.A, scale),
                                   lowrank_frobenius(stack.B, stack.A, scale),
                                   lowrank_kurtosis(stack.B, stack.A, stack.scale)])
        per = [(dsv[i], float(fro[i]), float(kurt[i])) for i in range(len(stack))]
    else:
        d = stack.deltas[0]
        dsv = delta_singular_values(d).cpu()
        per = [(dsv, delta_frobenius(d), delta_kurtosis(d))]
    out = []
    for s, fro, kurt in per:
        out.append(dict(
            delta_singular_values=[float(x) for x in s[:N_DELTA_SV].tolist()],
            delta_effective_rank=effective_rank(s),
            delta_stable_rank=stable_rank(s),
            delta_rel_norm=fro / base_norm if base_norm > 0 else float("inf"),
            delta_kurtosis=kurt if kurt is not None and math.isfinite(kurt) else None,  # undefined: not a number
        ))
    return out


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors on the host in one transfer (float64: exact for float32 values and indices),
    each in its own shape: one synchronisation instead of one per number."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu()
    return [part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _rounded(t: torch.Tensor) -> list[float]:
    return [round(x, 7) for x in t.flatten().tolist()]


@lru_cache(maxsize=64)
def _null(dim: int, n_basis: int) -> dict[str, float]:
    return null_max_cos(dim, n_basis)


def floats(t: torch.Tensor) -> list[float]:
    """A tensor as a list of floats rounded to 7 digits, in one host transfer (no per-element sync)."""
    return [round(x, 7) for x in t.detach().cpu().flatten().tolist()]
