"""Data-free risk scores of a fine-tune, from the fields of its scan records alone (docs/risk.md).

For one matrix with top-k singular values σ_j of W_t, their max |cos| c_j against the base basis
(paper Alg. 1), the chance level c₀ (``null_max_cos``), the singular values s_i of ΔW and σ⁰_i of W_0:

    intruders       #{j ≤ k : c_j < ε}                                 (the paper's count, ε = 0.5, k = 10)
    strength        Σ_{j≤k} (σ_j / σ_1) · (1 − c_j)                    σ normalised by σ_1(W_t): in [0, k]
    risk            Σ_{j≤k} σ_j ν_j / Σ_{j≤k} σ_j,  ν_j = clip((1 − c_j) / (1 − c₀), 0, 1)
                    the σ-weighted share of the top-k spectrum lying in directions as new to the base
                    as a random vector (ν = 1) rather than base directions (ν = 0): in [0, 1]
    sigma_ratio     s_1 / σ⁰_k                                         ΔW against the base's k-th direction
    rel_norm        ‖ΔW‖_F / ‖W_0‖_F
    effective_rank  exp(−Σ p_i log p_i), p_i = s_i / Σ s               (Roy & Vetterli 2007)
  base-free baselines (what AdapterSentry-style scanners see; they never read the base):
    kurtosis        excess kurtosis of ΔW's entries, m_4 / m_2² − 3
    energy          s_1² / Σ s_i² = 1 / stable rank

A model's score aggregates its matrices of one side: ``risk`` is the worst matrix's (max; a gate
fails on one bad matrix), ``risk_mean`` their mean; ``intruders`` and ``strength`` are sums (as the
paper counts); the others are means. A score that a record cannot give (a 1.0 file has no kurtosis; ΔW
= 0 has no energy; σ⁰_k = 0) is None and left out of the aggregate, never replaced by a guess.

Torch-free and below ``schema``, so that ``summarize`` derives the scores on every load and every
reader (report, check, experiments) shows the same numbers. This is an addition: Alg. 1's count at the
scan's own ε and k is untouched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorascope.schema import MatrixRecord

RISK_EPSILON = 0.5
RISK_K = 10
# `lorascope check`'s default gate. In the 86 validation runs (docs/results/risk) every run with
# risk > 0.3 lost at least 26 % of its STS-B Spearman (median 74 %); runs at risk ≤ 0.1 a median 0.1 %.
DEFAULT_FAIL_ON = "risk>0.3"
CANDIDATES = ("risk", "risk_mean", "intruders", "strength", "sigma_ratio", "rel_norm", "effective_rank")
BASELINES = ("kurtosis", "energy")
SCORES = CANDIDATES + BASELINES
SUMMED = ("intruders", "strength")
VALIDATED = True  # docs/results/risk: measured ρ with forgetting, encoder runs only (VALIDATION says how far)
VALIDATION = ("Spearman ρ with measured forgetting over 86 all-MiniLM-L6-v2 runs: +0.85 (STS-B drop) and +0.86 "
              "(drift), +0.88 on a held-out third; decoders not yet validated (docs/results/risk)")
MEANING = {
    "risk": "worst matrix: σ-weighted share of its top-k spectrum in directions new to the base (0 none, 1 all)",
    "risk_mean": "mean over matrices of the per-matrix risk",
    "intruders": "intruder dimensions (max |cos| < ε among the top-k), summed over matrices",
    "strength": "Σ_j σ_j/σ_1 · (1 − max|cos|_j) over the top-k, summed over matrices",
    "sigma_ratio": "σ_1(ΔW) / σ_k(W_0), mean over matrices",
    "rel_norm": "‖ΔW‖_F / ‖W_0‖_F, mean over matrices",
    "effective_rank": "effective rank of ΔW, mean over matrices",
    "kurtosis": "excess kurtosis of ΔW's entries, mean over matrices (base-free)",
    "energy": "σ_1(ΔW)² / ‖ΔW‖_F², mean over matrices (base-free)",
}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def matrix_scores(r: MatrixRecord, k: int = RISK_K, epsilon: float = RISK_EPSILON) -> dict[str, float | None]:
    """Every score of one record at (ε, k'), k' = min(k, the scan's k)."""
    k = min(k, len(r.max_cos))
    sv, cos = r.singular_values[:k], r.max_cos[:k]
    s1 = sv[0] if sv else 0.0
    novelty = [min(max((1 - c) / (1 - r.null_max_cos), 0.0), 1.0) for c in cos] if r.null_max_cos < 1 else []
    base_k = r.base_singular_values[k - 1] if 0 < k <= len(r.base_singular_values) else 0.0
    dsv = r.delta_singular_values
    return {
        "intruders": float(sum(1 for c in cos if c < epsilon)),
        "strength": sum(s / s1 * (1 - c) for s, c in zip(sv, cos, strict=True)) if s1 > 0 else 0.0,
        "risk": sum(s * v for s, v in zip(sv, novelty, strict=True)) / sum(sv) if novelty and sum(sv) > 0 else None,
        "sigma_ratio": (dsv[0] if dsv else 0.0) / base_k if base_k > 0 else None,
        "rel_norm": _finite(r.delta_rel_norm),
        "effective_rank": r.delta_effective_rank,
        "kurtosis": _finite(r.delta_kurtosis),
        "energy": 1 / r.delta_stable_rank if r.delta_stable_rank > 0 else None,
    }


def model_scores(records: list[MatrixRecord], k: int = RISK_K, epsilon: float = RISK_EPSILON,
                 n_worst: int = 10) -> dict[str, Any]:
    """The model's scores over ``records`` (one side), and the matrices with the highest risk."""
    per = [(r, matrix_scores(r, k, epsilon)) for r in records]
    scores: dict[str, float | None] = {}
    for name in SCORES:
        source = "risk" if name == "risk_mean" else name
        values = [s[source] for _, s in per if s[source] is not None]
        if not values:
            scores[name] = None
        elif name in SUMMED:
            scores[name] = sum(values)
        elif name == "risk":
            scores[name] = max(values)
        else:
            scores[name] = sum(values) / len(values)
    worst = sorted(per, key=lambda t: -(t[1]["risk"] or 0.0))[:n_worst]
    return {
        "epsilon": epsilon, "k": min([k, *(len(r.max_cos) for r in records)]) if records else k,
        "scores": scores,
        "worst": [{"name": r.name, **{key: s[key] for key in ("risk", "intruders", "strength", "sigma_ratio")}}
                  for r, s in worst if (s["risk"] or 0.0) > 0],
        "validated": VALIDATED,
        "validation": VALIDATION,
    }
