"""Alg. 1 and the ΔW spectrum for one matrix pair: the leaf of every scan.

For W_0 (base) and W_t = W_0 + ΔW (tuned), per side (left: output space; right: Wᵀ):
  1. all singular vectors x_i of W_0 (``basis`` hook, default ``spectral.left_basis``, float64),
  2. the top-k singular triplets (σ_j, y_j) of W_t (``spectral.top_k``, products only for a LoRA ΔW),
  3. max_i |cos(y_j, x_i)| and the argmax; y_j is an intruder when the max is below ε (Alg. 1),
  4. the spectrum of ΔW (exact from the LoRA core), its effective and stable ranks, ‖ΔW‖_F/‖W_0‖_F
     and the excess kurtosis of its entries.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from lorascope.errors import InputError
from lorascope.schema import MatrixRecord, parse_name
from lorascope.spectral import (
    SVD,
    Delta,
    Tuned,
    delta_frobenius,
    delta_kurtosis,
    delta_singular_values,
    effective_rank,
    left_basis,
    max_abs_cos,
    null_max_cos,
    stable_rank,
    top_k,
)
from lorascope.spectral.decompose import CPU_EXACT_UP_TO
from lorascope.spectral.operators import delta_T

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
        delta_kurtosis=delta_kurtosis(delta),
    )
    layer, module_type = parse_name(name)
    records = []
    for side in sides:
        W, d = (W0, delta) if side == "left" else (W0.T, delta_T(delta))
        base = basis(f"{name}:{side}", W) if basis else left_basis(W)
        U0 = base.U.to(W.dtype)
        exact_up_to = CPU_EXACT_UP_TO if W.device.type == "cpu" else 0  # where the exact route is cheaper
        tuned = top_k(Tuned(W, d), k, init=U0, exact_up_to=exact_up_to)  # Krylov from U0's first k + oversample
        cos, idx = max_abs_cos(tuned.U, U0)
        sim = (U0[:, :N_MAP].T @ tuned.U).abs().T  # (k, N_MAP)
        null = _null(W.shape[0], U0.shape[1])
        records.append(
            MatrixRecord(
                name=name, kind=kind, side=side, shape=[m, n], layer=layer, module_type=module_type,
                singular_values=floats(tuned.S), max_cos=floats(cos), best_match=[int(i) for i in idx],
                n_intruders=int((cos < epsilon).sum()), similarity=[floats(r) for r in sim],
                base_singular_values=floats(base.S[:N_MAP]), null_max_cos=null["mean"],
                null_max_cos_q99=null["q99"], exact=tuned.exact, **delta_stats,
            )
        )
    return records


@lru_cache(maxsize=64)
def _null(dim: int, n_basis: int) -> dict[str, float]:
    return null_max_cos(dim, n_basis)


def floats(t: torch.Tensor) -> list[float]:
    """A tensor as a list of floats rounded to 7 digits, in one host transfer (no per-element sync)."""
    return [round(x, 7) for x in t.detach().cpu().flatten().tolist()]
