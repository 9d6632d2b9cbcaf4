"""Pure tensor maths: decompositions, intruder dimensions, ranks, the λ edit. No I/O."""

from lorascope.spectral.decompose import SVD, exact_top_k, left_basis, top_k
from lorascope.spectral.intruders import max_abs_cos, null_max_cos
from lorascope.spectral.operators import Delta, LowRankDelta, Tuned
from lorascope.spectral.ranks import (
    delta_frobenius,
    delta_kurtosis,
    delta_singular_values,
    effective_rank,
    stable_rank,
)

__all__ = [
    "SVD", "Delta", "LowRankDelta", "Tuned", "delta_frobenius", "delta_kurtosis", "delta_singular_values",
    "effective_rank", "exact_top_k", "left_basis", "max_abs_cos", "null_max_cos", "stable_rank", "top_k",
]
