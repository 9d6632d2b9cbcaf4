"""Singular-value spectra for the synthetic benchmark models (scan_bench.py), one function per family,
and the WeightWatcher-style power-law fit of an empirical spectral density.

Every family gives, for a module type and an m × n shape, p = min(m, n) singular values σ_1 ≥ … ≥ σ_p
scaled so that the matrix entries have rms 0.02 (Σ σ_i² = 0.02² · m · n):

- ``smooth`` (the benchmark's original model): σ_i ∝ (1 + i/10)^(-a), a chosen so that σ_1/σ_p is
  the module's span in ``SPANS`` (10³ q/k, 10² v/o, 20 MLP).
- ``powerlaw``: the eigenvalues λ_i = σ_i² of W Wᵀ (the empirical spectral density, ESD, that
  WeightWatcher fits) are p − t − 4 quantiles of the Marchenko–Pastur law of aspect ratio p/max(m, n)
  (the random bulk, edge λ₊ = (1 + √(p/N))²), t = ⌈p/10⌉ quantiles of a Pareto law above the edge,
  density ∝ λ^(-α) for λ ≥ λ₊ (λ = λ₊ · u^(-1/(α-1)), u = (j − ½)/t: the heavy tail), and 4 outliers at
  1.5, 2.5, 4 and 8 times the largest tail eigenvalue. α per module type in ``POWERLAW_ALPHA``
  (2.5 q/k, 3 v/o/down, 3.5 gate/up). ``fit_powerlaw`` on the stored matrices recovers α (the
  benchmark records the fit per module type).
- ``smollm2`` / ``minilm`` (``real`` means both): the median σ_i/σ_1 profile of that module type in
  SmolLM2-135M-Instruct or all-MiniLM-L6-v2 (``spectral_profiles.json``, extracted by
  ``extract_profiles.py``), log σ interpolated linearly in (i − 1)/(p − 1) onto the target p.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

PROFILES = Path(__file__).resolve().parent / "spectral_profiles.json"
FAMILIES = ("smooth", "powerlaw", "smollm2", "minilm")
ALIASES = {"real": ("smollm2", "minilm")}
SPANS = {"q_proj": 1000.0, "k_proj": 1000.0, "v_proj": 100.0, "o_proj": 100.0,
         "gate_proj": 20.0, "up_proj": 20.0, "down_proj": 20.0}
POWERLAW_ALPHA = {"q_proj": 2.5, "k_proj": 2.5, "v_proj": 3.0, "o_proj": 3.0,
                  "gate_proj": 3.5, "up_proj": 3.5, "down_proj": 3.0}
TAIL_FRACTION = 0.1
OUTLIERS = (8.0, 4.0, 2.5, 1.5)  # × the largest tail eigenvalue


def expand(names: str) -> list[str]:
    """'smooth,real' -> ['smooth', 'smollm2', 'minilm'], each family once, checked."""
    out: list[str] = []
    for name in (x.strip() for x in names.split(",") if x.strip()):
        for fam in ALIASES.get(name, (name,)):
            if fam not in FAMILIES:
                known = ", ".join(FAMILIES + tuple(ALIASES))
                raise SystemExit(f"unknown spectrum family '{fam}' (choose from {known})")
            if fam not in out:
                out.append(fam)
    return out


def family_spectrum(family: str, mtype: str, m: int, n: int) -> torch.Tensor:
    """σ (float64, descending, entries' rms 0.02) of an m × n matrix of module type ``mtype``."""
    p = min(m, n)
    if family == "smooth":
        return spectrum(p, SPANS[mtype], m, n)
    if family == "powerlaw":
        s = torch.from_numpy(powerlaw_eigenvalues(p, max(m, n), POWERLAW_ALPHA[mtype])).sqrt()
    elif family in ALIASES["real"]:
        s = torch.from_numpy(real_profile(family, mtype, p))
    else:
        raise ValueError(f"unknown spectrum family '{family}'")
    return s * (0.02 * math.sqrt(m * n) / float(s.norm()))


def spectrum(p: int, span: float, m: int, n: int) -> torch.Tensor:
    """σ_i = c·(1 + i/10)^(-a), a so that σ_1/σ_p = span, c so that the entries' rms is 0.02."""
    a = math.log(span) / math.log(1 + (p - 1) / 10)
    s = (1 + torch.arange(p, dtype=torch.float64) / 10) ** (-a)
    return s * (0.02 * math.sqrt(m * n) / float(s.norm()))


# -- power law -----------------------------------------------------------------------------------
def powerlaw_eigenvalues(p: int, N: int, alpha: float) -> np.ndarray:
    """p eigenvalues, descending: outliers, a Pareto(α) tail above the Marchenko–Pastur edge, the bulk."""
    n_tail = max(8, math.ceil(TAIL_FRACTION * p))
    n_bulk = p - n_tail - len(OUTLIERS)
    if n_bulk < 1:
        raise ValueError(f"p = {p} is too small for the power-law family")
    edge = (1 + math.sqrt(p / N)) ** 2
    u = (np.arange(n_tail) + 0.5) / n_tail
    tail = edge * u ** (-1 / (alpha - 1))  # descending
    outliers = tail[0] * np.array(OUTLIERS)
    bulk = mp_quantiles(p / N, n_bulk)[::-1]
    return np.concatenate([outliers, tail, bulk])


def mp_quantiles(q: float, count: int, grid: int = 200_001) -> np.ndarray:
    """``count`` quantiles ((j − ½)/count, ascending) of the Marchenko–Pastur law with ratio q ≤ 1 and
    unit variance: density √((b − x)(x − a)) / (2π q x) on [a, b], a, b = (1 ∓ √q)². Integrated in
    θ with x = a + (b − a) sin²θ, where the integrand (b − a)² sin²θ cos²θ / (π q x) is smooth."""
    a, b = (1 - math.sqrt(q)) ** 2, (1 + math.sqrt(q)) ** 2
    theta = np.linspace(0, math.pi / 2, grid)
    x = a + (b - a) * np.sin(theta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = (b - a) ** 2 * (np.sin(theta) * np.cos(theta)) ** 2 / (math.pi * q * x)
    dens[~np.isfinite(dens)] = (b - a) / (math.pi * q)  # θ → 0 when a = 0
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(theta))])
    cdf /= cdf[-1]
    return np.interp((np.arange(count) + 0.5) / count, cdf, x)


def fit_powerlaw(evals: np.ndarray | torch.Tensor, min_tail: int = 10) -> dict:
    """Clauset–Shalizi–Newman fit of a power-law tail ρ(λ) ∝ λ^(-α), λ ≥ λ_min, as WeightWatcher does
    it (through the ``powerlaw`` package): for each candidate λ_min (every eigenvalue with at least
    ``min_tail`` above it) the maximum-likelihood α = 1 + t / Σ ln(λ_j / λ_min) over the t tail values,
    and the λ_min whose fitted law is closest to the tail's empirical distribution (Kolmogorov–Smirnov
    distance D) wins."""
    x = np.sort(np.asarray(evals, dtype=np.float64))[::-1]
    x = x[x > 0]
    logs = np.log(x)
    csum = np.cumsum(logs)
    best = None
    for t in range(min_tail, len(x)):
        xmin = x[t - 1]  # the t values x[0..t-1] ≥ xmin form the tail
        denom = csum[t - 1] - t * logs[t - 1]
        if denom <= 0:
            continue
        alpha = 1 + t / denom
        surv_fit = np.exp((1 - alpha) * (logs[:t] - logs[t - 1]))  # P(λ ≥ x_j) under the fit
        surv_emp = np.arange(1, t + 1) / t
        ks = float(np.abs(surv_fit - surv_emp).max())
        if best is None or ks < best["ks"]:
            best = {"alpha": float(alpha), "xmin": float(xmin), "n_tail": t, "ks": ks}
    return best or {"alpha": None, "xmin": None, "n_tail": 0, "ks": None}


# -- real checkpoints --------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_profiles() -> dict:
    return json.loads(PROFILES.read_text())


def real_profile(source: str, mtype: str, p: int) -> np.ndarray:
    """σ_i/σ_1 of module type ``mtype`` in ``source``, interpolated (log σ, linear in (i−1)/(p−1)) to p."""
    doc = load_profiles()
    ratio = np.asarray(doc["sources"][source]["modules"][doc["llama_map"][source][mtype]]["sigma_ratio"])
    xs, xt = np.linspace(0, 1, len(ratio)), np.linspace(0, 1, p)
    return np.exp(np.interp(xt, xs, np.log(np.maximum(ratio, 1e-12))))
