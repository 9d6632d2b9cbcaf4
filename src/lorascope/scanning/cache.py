"""An on-disk cache of base decompositions, so scanning many adapters of one base pays once.

Alg. 1 needs all left singular vectors of every base matrix W_0; for a 7B model that is most of
a scan's time (one float64 eigendecomposition of a 4096 × 4096 Gram matrix per matrix). The
basis depends only on W_0, so it is stored under a content key:

    key = sha256(stored bytes of the tensor, its dtype and shape) + layout kind + side + compute dtype

and a cheap identity memo, (real path, size, mtime_ns, ctime_ns, inode, device, tensor name) →
sha256, spares a second scan the hashing (ctime cannot be set by a user: a file rewritten with its
mtime restored has a new ctime). Entries are safetensors files: U in float16 (orthonormal columns
lose about 3e-4/√m per cosine; measured in docs/performance.md) and the singular values in
float64. A size budget is kept by evicting the least recently used entries.

    lorascope scan BASE ADAPTER --cache-dir ~/.cache/lorascope --cache-budget 20GB
    scan(base, adapter, cache_dir="~/.cache/lorascope")         # the same from Python
    scan(base, adapter, basis=BasisCache("~/.cache/lorascope"))  # the generic basis= hook

Index: ``index.sqlite`` (tables ``memo`` and ``entries``); data: ``bases/<2 hex>/<key>.safetensors``.
Several processes (torchrun ranks) may share one folder: files are written atomically and SQLite
serialises the index. An index that is not a readable SQLite file of this layout is moved aside
(``index.sqlite.corrupt-<time>``) and rebuilt from the entry files; in a read-only folder entries
are read (and certified) but nothing is written.

Certification: the cache is untrusted
-------------------------------------
Whoever can write the folder (or a flipped bit, or a stale memo) could otherwise change a result,
so every entry is checked against W, the current W_0 as read from the base checkpoint, before it is
used (``certify``). With G = W Wᵀ (m × m), the stored Ũ (m × p, float16), σ̃ (p, float64), the
residual r_i = G ũ_i − σ̃_i² ũ_i of each column, and β_i² = 2^-22‖ũ_i‖² + m·2^-50, which bounds
‖ũ_i − u_i‖² for an honest float16 column (round to nearest: |error| ≤ 2^-11|x|, or 2^-25 for
subnormals):

1. structure: dtypes, shapes, finite values, σ̃ non-negative and descending; all-zero columns only
   where ``left_basis`` makes them (m > n, σ̃_i at rounding level);
2. the spectrum is complete: |Σ σ̃_i² − ‖W‖_F²| ≤ 16·eps64·(max(m, n)·‖W‖_F² + p·σ̃_1²);
3. the singular values the records keep (the first N_EXACT = 32), by Rayleigh quotients
   ρ_i = ‖Wᵀ ũ_i‖²/‖ũ_i‖²: |ρ_i − σ̃_i²| ≤ 1.25·β_i²·max(σ̃_1² − σ̃_i², σ̃_i²)/‖ũ_i‖², since an
   honest column has ρ_i − σ_i² = δᵀ(G − σ_i²)δ/‖ũ_i‖² with δ = ũ_i − u_i (second order);
4. every column's residual, through a random sketch Φ (s × m Gaussian, s = SKETCH = 16, drawn from
   an unpredictable seed at every certification, so whoever writes the cache cannot aim at it):
   T_i = ‖Φ r_i‖² = ‖(Φ G) ũ_i − σ̃_i² Φ ũ_i‖², O(s·m·n) through Φ W Wᵀ, must satisfy
   T_i ≤ c²·(H_i + F_i), c = FACTOR = 8, where
   H_i = Σ_a v_ia ‖Φ (G − σ̃_i²) e_a‖²,  v_ia = 2^-20 ũ_ia²/12 + 2^-48/12,
   is the expected T_i of an honest entry: v_ia bounds the variance of the float16 rounding error of
   entry (a, i), and for independent rounding errors E‖(G − σ_i²) δ_i‖² = Σ_a v_ia ‖(G − σ_i²) e_a‖²
   (H_i is that, sketched by the same Φ); F_i covers the rounding of the float32 arithmetic;
5. every column's orthonormality, sketched with Ψ (s × p): ‖Ψ(Ũᵀ ũ_i − e_i)‖² ≤ c²·s·E_i, E_i
   bounding E‖Uᵀδ_i + Δᵀu_i‖² the same way; and exactly |‖ũ_i‖² − 1| ≤ 1.25·(2β_i + β_i²)
   (deterministic, as a column of equal entries has equal rounding errors; a column scaled by
   1 + β moves its cosines by β·|cos| at most).

The sketches act from the left, so T_i sketches each column's own residual (‖Φ r‖²/‖r‖² ~ χ²_s)
and no column can hide among the others, as it could in ‖R z‖ for a random z, where one column is
one of p terms: a column whose residual is ρ times its tolerance passes with probability
P(χ²_16 < 16/ρ²) ≈ 4e-6 for ρ = 3 and 6e-8 for ρ = 4; a planted column of another matrix has ρ in
the hundreds (tests: < 1e-30). Honest entries give √(T_i/H_i) of 1.3 (median) and at most 2.6 over
the test spectra (outliers, clusters, spectra spanning 10⁶), so c = 8 leaves a wide margin; a false
alarm would only cost a recomputation. Checks 2 and 3 run in float32 and fall back to float64 only
when a value is too close to its tolerance for float32 to decide.

Why this bounds the max-cos error. For unit ũ_i, the residual bound (Davis–Kahan sin θ for one
vector) gives sin ∠(ũ_i, span{u_l : |σ_l² − σ̃_i²| < γ}) ≤ ‖r_i‖/γ for every γ > 0, and
| |ũ_iᵀy| − |u_iᵀy| | ≤ ‖ũ_i − u_i‖ for every unit y. A certified column is therefore within
about c·h_i/γ (h_i² = H_i/s, its float16 level) of the eigenvectors whose σ² lie within γ of σ̃_i²:
a rotation that mixes singular values a gap γ apart by an angle θ leaves residuals θ·γ and is
rejected once θ·γ > c·h_i; one that passes moves max-cos by at most θ (among the first 32 columns
the Rayleigh quotients, of second order θ²·γ, are sharper still). What no O(mn) test can see, and
what the float16 entry itself cannot resolve, is a rotation within a cluster of nearly equal σ,
γ < c·h_i/θ (for a tall W also a tail σ² below c·h_i, which clusters with W's null space): any
basis of an exact cluster is equally a basis of left singular vectors, and within a near cluster
the max-cos change is bounded by the angle of the rotation only. Everything else (flipped bits,
swapped entries, NaN, wrong shapes, a planted, stale or foreign basis, a wrong σ) fails. A failed
entry is recomputed with ``left_basis``, used, rewritten (when its float16 form certifies) and
counted in ``stats["rejected"]``, with a CacheWarning naming the file and the tensor.

Cost (benchmarks/cache_certify_bench.py, docs/performance.md): three passes over W and four over
Ũ, in float32; for a 4096 × 4096 matrix on the 2-core CPU 125 ms, so a hit takes 154 ms instead
of 61 ms (2.5 × reading the entry; certifying is 0.8 % of recomputing the basis, 15.7 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import queue
import re
import secrets
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from lorascope.errors import InputError
from lorascope.io.checkpoint import TensorSource, read_location, safetensors_header
from lorascope.io.identity import file_identity
from lorascope.io.layout import orient
from lorascope.io.writers import atomic_write_bytes
from lorascope.spectral import SVD, left_basis

FORMAT = "1"  # bump when the stored maths or layout changes: old entries are then never matched
DEFAULT_BUDGET = "20GB"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SAFE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # keys read back from the index stay in bases/
_MEMO_COLUMNS = ["path", "tensor", "size", "mtime", "ctime", "inode", "dev", "digest"]
_ENTRY_COLUMNS = ["key", "nbytes", "last_used"]


class CacheWarning(UserWarning):
    """Something in the cache folder was wrong and was repaired; results are unaffected."""


def parse_size(size: str | int) -> int:
    """'20GB' → 20·10⁹ bytes; '1.5GiB' → 1.5·2³⁰; an int is taken as bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read the size '{size}' (examples: 20GB, 500MB, 1.5GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes as stored."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    t = t.detach().contiguous().cpu()
    # hashlib releases the GIL for large buffers, so worker threads hash in parallel
    h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b""))
    return h.hexdigest()


# -- certification -------------------------------------------------------------------------------
SKETCH = 16  # rows of the random sketches Φ (residuals) and Ψ (orthonormality)
FACTOR = 8.0  # a statistic may be this many times its honest float16 level
N_EXACT = 32  # leading singular values checked by Rayleigh quotients: the records keep 32 (analyze.N_MAP)
_KAPPA = 2.0**-20 / 12  # rounding variance of a float16 entry x is at most (2^-10 |x|)² / 12 ...
_V0 = 2.0**-48 / 12  # ... plus (2^-24)² / 12 for subnormal numbers and zeros
_EPS64 = torch.finfo(torch.float64).eps
_CHUNK = 512  # ‖W‖_F² is summed in chunks of this many entries (float32), then in float64


@dataclass
class Certificate:
    """The verdict on one cached basis: ``ok``; ``reason``: why not (or, when ok, the check closest to
    its tolerance); ``ratio``: that check's statistic over its tolerance (≤ 1 passes); ``U``: the
    basis in the compute dtype when it passed."""

    ok: bool
    reason: str = ""
    ratio: float = 0.0
    U: torch.Tensor | None = None
    checks: dict[str, float] = field(default_factory=dict)  # each check's largest ratio, in the order run


def certify(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, *, sketch: int = SKETCH, factor: float = FACTOR,
            n_exact: int = N_EXACT, seed: int | None = None) -> Certificate:
    """Check that (U float16, S float64) is the left singular basis of W (m × n, compute dtype) to
    float16 precision, in O(sketch·m·n) work (module docstring: the tests, their tolerances and
    why they bound the max-cos error). ``seed``: only for tests; by default every call draws its
    sketches from an unpredictable seed."""
    m, n = W.shape
    p = min(m, n)
    if U.dtype != torch.float16 or S.dtype != torch.float64:
        return Certificate(False, f"stored dtypes {U.dtype}, {S.dtype} (expected float16, float64)", math.inf)
    if tuple(U.shape) != (m, p) or tuple(S.shape) != (p,):
        return Certificate(False, f"stored shapes {tuple(U.shape)}, {tuple(S.shape)} do not fit {m} × {n}", math.inf)
    dev = W.device
    cdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    eps = torch.finfo(cdt).eps
    W = W.to(cdt)
    S = S.to(dev)
    Uc = U.to(dev).to(cdt)
    if p == 0:
        return Certificate(True, U=Uc)
    if not bool(torch.isfinite(S).all()):
        return Certificate(False, "the singular values hold NaN or Inf", math.inf)
    if bool((S[1:] > S[:-1]).any()) or float(S[-1]) < 0:
        return Certificate(False, "the singular values are not non-negative and descending", math.inf)
    S2 = S.square()
    s0 = float(S[0])
    ne = min(n_exact, p)

    # The passes over W (3) and over Ũ (4), shared by the checks below.
    g = torch.Generator(device=dev)
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    Phi = torch.randn(sketch, m, generator=g, device=dev, dtype=cdt)
    Psi = torch.randn(sketch, p, generator=g, device=dev, dtype=cdt)
    chunks = _square_chunks(W)  # ‖W‖_F²
    PZ = W.T @ torch.cat([Phi.T, Uc[:, :ne]], 1)  # (Φ W)ᵀ and Wᵀ Ũ[:, :ne]
    Q = PZ[:, :sketch].T @ W.T  # Φ G, s × m
    U2 = Uc.square()
    q, x, f = Q.square().sum(0), (Q * Phi).sum(0), Phi.square().sum(0)
    Mq, Mx, Mf, n2 = (U2.T @ torch.stack([q, x, f, torch.ones_like(f)], 1)).double().unbind(1)
    del U2
    X = Psi @ Uc.T  # Ψ Ũᵀ
    AB = torch.cat([Q, Phi, X]) @ Uc  # Φ G Ũ, Φ Ũ, Ψ ŨᵀŨ

    # 1. (the rest) finite entries; all-zero columns only where left_basis makes them
    if not bool(torch.isfinite(n2).all()):  # NaN or Inf anywhere in U shows in its column's norm
        return Certificate(False, "U holds NaN or Inf", math.inf)
    zero = n2 == 0
    if bool(zero.any()):  # left_basis zeroes the columns of a tall W whose σ is at rounding level
        ztol = math.sqrt(64 * _EPS64 * max(m, n)) * s0
        if m <= n or bool((S[zero] > ztol).any()):
            i = int(torch.nonzero(zero)[0])
            return Certificate(False, f"column {i} is zero but its singular value is {float(S[i]):.3g}", math.inf)
    live = (~zero).to(cdt)
    worst = _Worst()

    # 2. the spectrum is complete: Σ σ̃² = tr G = ‖W‖_F²
    fro = float(chunks.sum())
    d = abs(float(S2.sum()) - fro)
    tol_tr = 16 * _EPS64 * (max(m, n) * fro + p * s0 * s0)
    exact = None
    if cdt == torch.float32:
        loose = tol_tr + 16 * eps * fro  # float32 partial sums can be off by this much at worst ...
        if tol_tr + 16 * eps * float(chunks.norm()) < d <= loose:  # ... and by this much for generic W
            exact = _exact_products(W, Uc[:, :ne])  # structured W (identical rows): decide in float64
            d = abs(float(S2.sum()) - exact[0])
        else:
            tol_tr = loose
    worst.add("trace", _ratio(d, tol_tr), f"Σσ² differs from ‖W‖_F² by {d:.3g} (relative {_ratio(d, fro):.2g})")
    if not worst.ok:
        return worst.fail()

    # 3. the singular values kept in the records: Rayleigh quotients
    n2e = Uc[:, :ne].double().square().sum(0)
    Z = exact[1] if exact is not None else PZ[:, sketch:].double()
    rq = Z.square().sum(0) / n2e.clamp_min(1e-300)
    beta2 = 2.0**-22 * n2e + m * 2.0**-50
    tol_s = (1.25 * beta2 * torch.maximum(s0 * s0 - S2[:ne], S2[:ne]) / n2e.clamp_min(1e-300)
             + 16 * _EPS64 * max(m, n) * s0 * s0).clamp_min(1e-300)
    dev_s = (rq - S2[:ne]).abs() * (n2e > 0)
    what = "Rayleigh quotient ‖Wᵀu‖²/‖u‖² differs from σ² by {:.3g}"
    if cdt == torch.float32 and exact is None and bool((dev_s > tol_s).any()):
        if bool((dev_s > tol_s + 8 * eps * rq).any()):
            worst.columns("singular values", dev_s / tol_s, what, dev_s)
            return worst.fail()
        _, Z = _exact_products(W, Uc[:, :ne])  # within float32 rounding of the tolerance: decide in float64
        rq = Z.square().sum(0) / n2e.clamp_min(1e-300)
        dev_s = (rq - S2[:ne]).abs() * (n2e > 0)
    worst.columns("singular values", dev_s / tol_s, what, dev_s)
    if not worst.ok:
        return worst.fail()

    # 4. every column's residual, sketched: T_i = ‖Φ r_i‖² against its honest float16 level H_i
    T = (AB[:sketch] - AB[sketch:2 * sketch] * S2.to(cdt)).double().square().sum(0)
    qs, xs, fs = float(q.double().sum()), float(x.double().sum()), float(f.double().sum())
    H = _KAPPA * (Mq - 2 * S2 * Mx + S2.square() * Mf) + _V0 * (qs - 2 * S2 * xs + S2.square() * fs)
    big = Mq + 2 * S2 * Mx.abs() + S2.square() * Mf
    F = 4 * eps * eps * (m + n) * big + 8 * eps * _KAPPA * big  # float arithmetic; cancellation in H
    tol_r = factor * factor * (H.clamp_min(0) + F)
    worst.columns("residuals", (T / tol_r.clamp_min(1e-300)).sqrt(), "residual ‖W Wᵀu − σ²u‖ ≈ {:.3g}",
                  (T / sketch).sqrt())
    if not worst.ok:
        return worst.fail()

    # 5. orthonormality, sketched: ‖Ψ(Ũᵀũ_i − e_i)‖² against s·E‖Uᵀδ_i + Δᵀu_i‖² ≤ s·E_i, using that an
    # honest Ũ has row norms² ρ_a ≤ (1 + 2^-11)² ≤ 1.001 (so E_i needs no pass over Ũ)
    To = (AB[2 * sketch:] - Psi * live).double().square().sum(0)
    E = 4.004 * _KAPPA * n2 + _V0 * (1.001 * m + (p + 2) * n2)
    Fo = 8.004 * eps * eps * (m + p) * n2
    tol_o = factor * factor * sketch * (E + Fo)
    worst.columns("orthonormality", (To / tol_o.clamp_min(1e-300)).sqrt(),
                  "columns not orthonormal: ‖Ũᵀu − e‖ ≈ {:.3g}", (To / sketch).sqrt())
    # |‖ũ‖² − 1| ≤ 2β + β² (β² bounds ‖ũ − u‖²): deterministic, since the rounding errors of a column
    # with many equal entries are equal too; a column scaled by 1 + β moves its cosines by ≤ β|cos|
    beta = (2.0**-22 * n2 + m * 2.0**-50).sqrt()
    dn = (n2 - live.double()).abs()
    tol_n = 1.25 * (2 * beta + beta.square()) + 4 * eps * math.sqrt(m) * n2
    worst.columns("norms", dn / tol_n, "norm² of the column differs from 1 by {:.3g}", dn)
    if not worst.ok:
        return worst.fail()
    return Certificate(True, reason=worst.reason, ratio=worst.ratio, U=Uc, checks=worst.checks)


def _ratio(x: float, tol: float) -> float:
    return 0.0 if x == 0 else (x / tol if tol > 0 else math.inf)


class _Worst:
    """The largest ratio of a statistic to its tolerance seen so far, and what it was."""

    def __init__(self):
        self.ratio, self.reason, self.checks = 0.0, "", {}

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0  # NaN ratios never get here: add() maps them to inf

    def add(self, check: str, ratio: float, reason: str) -> None:
        ratio = math.inf if math.isnan(ratio) else ratio
        self.checks[check] = ratio
        if ratio > self.ratio:
            self.ratio, self.reason = ratio, reason

    def columns(self, check: str, ratios: torch.Tensor, what: str, values: torch.Tensor) -> None:
        ratios = torch.nan_to_num(ratios.double(), nan=math.inf)
        i = int(ratios.argmax())
        self.add(check, float(ratios[i]), f"column {i}: {what.format(float(values[i]))}")

    def fail(self) -> Certificate:
        return Certificate(False, f"{self.reason}, {self.ratio:.3g} × its tolerance", self.ratio, checks=self.checks)


def _square_chunks(W: torch.Tensor) -> torch.Tensor:
    """Sums of squares of W's entries in chunks of _CHUNK (in W's dtype), as float64: their sum is
    ‖W‖_F² to about eps·‖chunks‖₂ for generic W (float32 rounding of short sums only)."""
    t = W if W.is_contiguous() else (W.T if W.T.is_contiguous() else W.contiguous())
    flat = t.reshape(-1)
    k = flat.numel() // _CHUNK * _CHUNK
    parts = [torch.linalg.vector_norm(flat[:k].view(-1, _CHUNK), dim=1)] if k else []
    if k < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[k:]).reshape(1))
    return torch.cat(parts).double().square()


def _exact_products(W: torch.Tensor, Ue: torch.Tensor) -> tuple[float, torch.Tensor]:
    """‖W‖_F² and Wᵀ Ue in float64, converting W row block by row block (the slow, exact path)."""
    m, n = W.shape
    rows = max(1, (1 << 22) // max(n, 1))
    buf = torch.empty(min(rows, m), n, dtype=torch.float64, device=W.device)
    Ue = Ue.double()
    fro = torch.zeros((), dtype=torch.float64, device=W.device)
    Z = torch.zeros(n, Ue.shape[1], dtype=torch.float64, device=W.device)
    for i in range(0, m, rows):
        b = buf[: min(rows, m - i)]
        b.copy_(W[i:i + rows])
        fro += b.square().sum()
        Z.addmm_(b.T, Ue[i:i + rows])
    return float(fro), Z


# -- the cache -------------------------------------------------------------------------------------
class BasisCache:
    """Left singular bases of base matrices on disk, keyed by content, with an LRU size budget.

    Called as ``cache(key, W)`` it is a ``basis=`` hook for ``scan`` (hashing W itself);
    ``scan(cache_dir=...)`` uses ``hook()`` instead, which hashes the stored bytes in the reader
    threads and remembers the hash per file identity. Every basis read back is certified against
    the W it is used for (``certify``); one that fails is recomputed and rewritten.
    """

    def __init__(self, root: str | os.PathLike, budget: str | int = DEFAULT_BUDGET):
        self.root = Path(root).expanduser()
        self.budget = parse_size(budget)
        self.index = self.root / "index.sqlite"
        self.stats = {"hits": 0, "misses": 0, "rejected": 0, "hashed": 0, "memo_hits": 0, "evicted": 0}
        # thread-seconds of the cache's own work, summed over threads, for the scan's timing
        self.seconds = {"hashing": 0.0, "certifying": 0.0, "writing": 0.0, "waiting_for_writers": 0.0}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.root}: cannot create the cache folder ({e})") from e
        if not self.root.is_dir():
            raise InputError(f"{self.root}: cannot create the cache folder (it is not a folder)")
        self.readonly = not _writable(self.root)
        if self.readonly:
            self._warn(f"{self.root}: the cache folder is read-only: cached bases are read (and certified), "
                       "nothing is written and every base tensor is hashed")
            return
        bases = self.root / "bases"
        if bases.exists() and not bases.is_dir():
            self._move_aside(bases, "is not a folder")
        try:
            bases.mkdir(exist_ok=True)
        except OSError as e:
            raise InputError(f"{bases}: cannot create the cache folder ({e})") from e
        self._open_index()

    # -- the index ---------------------------------------------------------------------------------
    def _open_index(self) -> None:
        """Open (or create) index.sqlite; one that is not an SQLite file of our layout is moved aside."""
        for _ in range(2):
            if self.index.exists() and not self.index.is_file():
                self._move_aside(self.index, "is not a file")
            try:
                self._db = self._connect()
                return
            except sqlite3.DatabaseError as e:  # not a database, malformed, foreign tables
                if isinstance(e, sqlite3.OperationalError) and not _corrupt(e):
                    raise InputError(f"{self.index}: cannot open the cache index ({e})") from e
                with contextlib.suppress(Exception):
                    self._db.close()
                self._db = None
                for suffix in ("-wal", "-shm"):
                    side = self.index.with_name(self.index.name + suffix)
                    if side.exists():
                        self._move_aside(side, "belongs to a damaged index", quiet=True)
                self._move_aside(self.index, f"is not a usable cache index ({e})")
        raise InputError(f"{self.index}: cannot create the cache index")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.index, timeout=60, check_same_thread=False, isolation_level=None)
        self._db = db
        # Switching to WAL needs an exclusive lock, and SQLite may answer "database is locked" at
        # once, without waiting out the timeout, when another process (a torchrun rank) opens the
        # index at the same moment: retry for up to a minute.
        for attempt in range(600):
            try:
                with self._lock:
                    db.execute("PRAGMA journal_mode=WAL")
                    if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                        raise sqlite3.DatabaseError("quick_check failed")
                    db.execute("BEGIN IMMEDIATE")  # other ranks may be creating the tables right now
                    try:
                        self._check_tables(db)
                        db.execute("COMMIT")
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 599:
                    raise
                time.sleep(0.1)
        with self._lock:
            # rows that could not have come from this code: drop them (the memo and sizes only)
            db.execute("DELETE FROM entries WHERE typeof(key) != 'text' OR typeof(nbytes) != 'integer' "
                       "OR nbytes < 0 OR typeof(last_used) NOT IN ('integer', 'real')")
            db.execute("DELETE FROM memo WHERE typeof(digest) != 'text' OR length(digest) != 64")
        if self._adopt_orphans:
            self._reindex()
        return db

    def _check_tables(self, db: sqlite3.Connection) -> None:
        """Create the tables, or check that existing ones have our columns. A memo of another layout
        (an older version's) is dropped; foreign ``entries`` mean a foreign index (moved aside)."""
        self._adopt_orphans = False
        have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "memo" in have and [r[1] for r in db.execute("PRAGMA table_info(memo)")] != _MEMO_COLUMNS:
            db.execute("DROP TABLE memo")
        db.execute("CREATE TABLE IF NOT EXISTS memo (path TEXT, tensor TEXT, size INTEGER, mtime INTEGER, "
                   "ctime INTEGER, inode INTEGER, dev INTEGER, digest TEXT, PRIMARY KEY (path, tensor))")
        if "entries" in have:
            if [r[1] for r in db.execute("PRAGMA table_info(entries)")] != _ENTRY_COLUMNS:
                raise sqlite3.DatabaseError("table 'entries' has foreign columns")
        else:
            self._adopt_orphans = True
            db.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, nbytes INTEGER, last_used REAL)")

    def _reindex(self) -> None:
        """Register entry files that the index does not know (after it was rebuilt), so the budget
        counts them."""
        rows = []
        for f in (self.root / "bases").glob("*/*.safetensors"):
            key = f.name[: -len(".safetensors")]
            with contextlib.suppress(OSError):
                if f.is_file() and _SAFE_KEY.fullmatch(key) and f.parent.name == key[:2]:
                    st = f.stat()
                    rows.append((key, st.st_size, st.st_mtime))
        if rows:
            with self._lock:
                self._db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)", rows)

    def _sql(self, query: str, args: tuple = (), fetch: bool = False):
        """One statement on the index; SQLite errors become InputError naming the index."""
        if self._db is None:
            return None
        try:
            with self._lock:
                cur = self._db.execute(query, args)
                return cur.fetchone() if fetch else None
        except sqlite3.Error as e:
            raise InputError(f"{self.index}: the cache index failed ({e})") from e

    def _move_aside(self, path: Path, why: str, quiet: bool = False) -> None:
        target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
        try:
            os.replace(path, target)
        except OSError as e:
            raise InputError(f"{path}: {why}, and it cannot be moved aside ({e})") from e
        if not quiet:
            self._warn(f"{path}: {why}; moved it to {target.name} and started afresh")

    def _warn(self, message: str) -> None:
        warnings.warn(message, CacheWarning, stacklevel=3)

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the block's wall time to ``seconds[what]``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[what] += time.perf_counter() - t

    # -- identity memo -----------------------------------------------------------------------------
    def digest(self, file: Path, tensor: str, t: torch.Tensor) -> str:
        """The content digest of ``tensor`` in ``file``, from the memo when the file's identity matches."""
        return self.lookup(file, tensor, t)[0]

    def lookup(self, file: Path, tensor: str, t: torch.Tensor) -> tuple[str, bool]:
        """(digest, whether it came from the memo). The identity is (real path, size, mtime_ns,
        ctime_ns, inode, device): a file rewritten with its mtime restored has a new ctime."""
        ident = _identity(file)
        if ident is not None:
            row = self._sql("SELECT size, mtime, ctime, inode, dev, digest FROM memo WHERE path=? AND tensor=?",
                            (ident[0], tensor), fetch=True)
            if row and tuple(row[:5]) == ident[1:] and isinstance(row[5], str) and _DIGEST.fullmatch(row[5]):
                self._count("memo_hits")
                return row[5], True
        with self.timed("hashing"):
            d = tensor_digest(t)
        self._count("hashed")
        if ident is not None:
            self.remember(ident, tensor, d)
        return d, False

    def remember(self, ident: tuple, tensor: str, digest: str) -> None:
        self._sql("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (ident[0], tensor, *ident[1:], digest))

    # -- entries -----------------------------------------------------------------------------------
    @staticmethod
    def entry_key(digest: str, kind: str, side: str, dtype: torch.dtype) -> str:
        return f"{digest[:40]}-{kind}-{side}-{str(dtype).replace('torch.', '')}-v{FORMAT}"

    def _path(self, key: str) -> Path:
        return self.root / "bases" / key[:2] / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int, int], what: str = "", pin: bool = False) -> SVD | None:
        """The stored basis (U float16, S float64, on CPU; ``pin``: page-locked), not yet certified, or
        None (a miss). An entry that is there but unreadable, truncated or of other shapes is rejected
        with a warning (``what`` names the tensor in it); it is recomputed and rewritten."""
        path = self._path(key)
        m, n = shape
        if not path.exists():
            self._count("misses")
            return None
        try:
            if not path.is_file():
                raise IsADirectoryError("not a file")
            locations = safetensors_header(path)
            U, S = read_location(locations["U"], pin)[0], read_location(locations["S"], pin)[0]
            if tuple(U.shape) != (m, min(m, n)) or tuple(S.shape) != (min(m, n),):
                raise ValueError(f"stored shapes {tuple(U.shape)}, {tuple(S.shape)} do not fit {m} × {n}")
        except Exception as e:
            self._count("misses")
            self._count("rejected")
            self._warn(f"{path}: the cached basis{' of ' + what if what else ''} is unreadable ({_short(e)}); "
                       "recomputed it")
            return None
        if not self.readonly:
            self._sql("UPDATE entries SET last_used=? WHERE key=?", (time.time(), key))
        return SVD(U=U, S=S)

    def accept(self, key: str, hit: SVD, W: torch.Tensor, what: str) -> SVD | None:
        """``hit`` certified against W (as a basis in W's dtype and device), or None after a warning
        naming the entry's file and ``what`` (the tensor)."""
        with self.timed("certifying"):
            cert = certify(W, hit.U, hit.S)
        if cert.ok:
            self._count("hits")
            return SVD(U=cert.U.to(W.dtype), S=hit.S.to(W.device))
        self._count("rejected")
        self._warn(f"{self._path(key)}: the cached basis of {what} failed certification against the base "
                   f"weights ({cert.reason}); recomputed it")
        return None

    def store(self, key: str, U: torch.Tensor, S: torch.Tensor) -> None:
        """Write one entry (U as float16) atomically, then evict least recently used entries."""
        if self.readonly:
            return
        data = st_save({"U": U.to(torch.float16).contiguous().cpu(), "S": S.to(torch.float64).cpu()})
        if len(data) > self.budget:
            return  # larger than the whole budget: not worth evicting everything for
        path = self._path(key)
        for blocker in (path.parent, path):  # something other than a folder / file in the way
            if blocker.exists() and blocker.is_dir() != (blocker == path.parent):
                self._move_aside(blocker, "is in the way of a cache entry")
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            raise InputError(f"{path}: cannot write to the basis cache ({e})") from e
        self._sql("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (key, len(data), time.time()))
        self.evict()

    def store_certified(self, key: str, svd: SVD, W: torch.Tensor, what: str) -> None:
        """Store a freshly computed basis, unless its float16 form would not pass certification
        (a matrix whose basis float16 cannot hold): then warn and keep it out of the cache."""
        U16 = svd.U.to(torch.float16)
        cert = certify(W, U16, svd.S.to(torch.float64))
        if not cert.ok:
            self._warn(f"{self._path(key)}: the basis of {what} is not cached: its float16 form does not pass "
                       f"certification ({cert.reason})")
            return
        self.store(key, U16, svd.S)

    def evict(self) -> None:
        """Delete least recently used entries until the total size is within the budget."""
        if self._db is None:
            return
        try:
            with self._lock:
                total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0]
                while total > self.budget:
                    row = self._db.execute("SELECT key, nbytes FROM entries ORDER BY last_used LIMIT 1").fetchone()
                    if row is None:
                        break
                    key, nbytes = row
                    if isinstance(key, str) and _SAFE_KEY.fullmatch(key):  # never a path outside bases/
                        with contextlib.suppress(OSError):
                            self._path(key).unlink(missing_ok=True)
                        self.stats["evicted"] += 1
                    self._db.execute("DELETE FROM entries WHERE key=?", (key,))
                    total -= nbytes
        except sqlite3.Error as e:
            raise InputError(f"{self.index}: the cache index failed ({e})") from e

    def size(self) -> int:
        row = self._sql("SELECT COALESCE(SUM(nbytes), 0) FROM entries", fetch=True)
        return int(row[0]) if row else 0

    # -- the generic basis= hook -------------------------------------------------------------------
    def __call__(self, key: str, W: torch.Tensor) -> SVD:
        """``scan(basis=cache)``: look W up by the hash of its own bytes (as oriented, in compute dtype)."""
        side = key.rsplit(":", 1)[-1]
        ekey = self.entry_key(tensor_digest(W), "matrix", side, W.dtype)
        hit = self.load(ekey, tuple(W.shape), _what(key))
        if hit is not None:
            ok = self.accept(ekey, hit, W, _what(key))
            if ok is not None:
                return ok
        svd = left_basis(W)
        if not self.readonly:
            self.store_certified(ekey, svd, W, _what(key))
        return svd

    def hook(self, dtype: torch.dtype, sides: tuple[str, ...] = ("left",)) -> ScanHook:
        return ScanHook(self, dtype, sides)

    def checkpoint(self) -> None:
        """Copy the index's write-ahead log into index.sqlite (done at the end of each scan)."""
        with contextlib.suppress(sqlite3.Error, InputError):
            self._sql("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) < 160 else text[:157] + "..."


def _what(key: str) -> str:
    name, _, side = key.rpartition(":")
    return f"'{name}' ({side} side)" if name else f"'{key}'"


def _identity(file: Path) -> tuple | None:
    try:
        return file_identity(file)
    except (OSError, TypeError, ValueError):  # no file behind this source (e.g. in memory): no memo
        return None


def _writable(root: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=root)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


def _corrupt(e: sqlite3.Error) -> bool:
    """Whether an OperationalError means the file is not a usable index (rather than locked or denied)."""
    text = str(e).lower()
    return any(s in text for s in ("not a database", "malformed", "unable to open", "disk image", "foreign",
                                   "quick_check", "no such", "has no column", "file is encrypted"))


class ScanHook:
    """The cache inside ``pipeline.scan_records``: ``prefetch`` runs in reader threads (hash or memo,
    then read the stored bases), ``basis_for`` gives the ``basis`` hook of one pair (certifying a
    stored basis against the pair's W_0 on the compute device), and new bases are written by
    ``WRITERS`` background threads so the device does not wait for the disk: one thread, copying each
    basis to the host, serialising and writing it (three passes over 11 GB for a 7B model), was what
    made filling the cache 1.44× a first scan on the H200."""

    WRITERS = 4

    def __init__(self, cache: BasisCache, dtype: torch.dtype, sides: tuple[str, ...]):
        self.cache, self.dtype, self.sides = cache, dtype, sides
        n = max(1, min(self.WRITERS, os.cpu_count() or 1))
        self._queue: queue.Queue = queue.Queue(maxsize=2 * n)  # bounds the bases waiting (device memory)
        self._error: BaseException | None = None
        self._writers = [threading.Thread(target=self._write_loop, name=f"lorascope-cache-writer-{i}", daemon=True)
                         for i in range(n)]
        for t in self._writers:
            t.start()

    def prefetch(self, ckpt: TensorSource, name: str, kind: str, W0: torch.Tensor) -> dict[str, Any]:
        file = ckpt.file_of(name)
        digest, from_memo = self.cache.lookup(file, name, W0)
        m, n = orient(torch.empty(W0.shape, device="meta"), kind).shape
        out: dict[str, Any] = {"keys": {}, "hits": {}, "digest": digest, "memo": from_memo, "file": file,
                               "name": name, "kind": kind, "shape": (m, n)}
        for side in self.sides:
            key = self.cache.entry_key(digest, kind, side, self.dtype)
            out["keys"][side] = key
            hit = self.cache.load(key, (m, n) if side == "left" else (n, m), _what(f"{name}:{side}"),
                                  pin=W0.is_pinned())
            if hit is not None:
                out["hits"][side] = hit
        return out

    def basis_for(self, extra: dict[str, Any], W0: torch.Tensor | None = None) -> Callable[[str, torch.Tensor], SVD]:
        """The ``basis`` hook for one pair, given what ``prefetch`` returned for it and the pair's
        stored W_0 (to hash it again when a basis found through the memo fails certification)."""

        def basis(key: str, W: torch.Tensor) -> SVD:
            side = key.rsplit(":", 1)[-1]
            what = _what(key)
            ekey = extra.get("keys", {}).get(side)
            hit = extra.get("hits", {}).get(side)
            if hit is not None:
                ok = self.cache.accept(ekey, hit, W, what)
                if ok is not None:
                    return ok
                old, ekey = ekey, self._recheck_digest(extra, side, W0, ekey)
                if ekey != old:  # the memo was wrong: try the entry of the true digest
                    m, n = W.shape
                    hit = self.cache.load(ekey, (m, n), what)
                    ok = self.cache.accept(ekey, hit, W, what) if hit is not None else None
                    if ok is not None:
                        return ok
            svd = left_basis(W)
            if ekey is not None and not self.cache.readonly:
                self._raise_writer_error()
                U16 = svd.U.to(torch.float16)
                with self.cache.timed("certifying"):
                    cert = certify(W, U16, svd.S.to(torch.float64))
                if cert.ok:
                    with self.cache.timed("waiting_for_writers"):  # the queue is full: the disk is behind
                        self._queue.put((ekey, U16, svd.S))
                else:
                    self.cache._warn(f"{self.cache._path(ekey)}: the basis of {what} is not cached: its float16 "
                                     f"form does not pass certification ({cert.reason})")
            return svd

        return basis

    def _recheck_digest(self, extra: dict[str, Any], side: str, W0: torch.Tensor | None, key: str) -> str:
        """After a failed certification: when the digest came from the memo, hash W_0 again; a
        different digest fixes the memo and gives the key to use."""
        if not extra.get("memo") or W0 is None:
            return key
        d = tensor_digest(W0)
        if d == extra["digest"]:
            return key
        ident = _identity(extra["file"])
        if ident is not None:
            self.cache.remember(ident, extra["name"], d)
        self.cache._warn(f"{self.cache.index}: the memo gave a wrong digest for '{extra['name']}' in "
                         f"{extra['file']}; hashed it again")
        extra["digest"], extra["memo"] = d, False
        for s in list(extra["keys"]):
            extra["keys"][s] = self.cache.entry_key(d, extra["kind"], s, self.dtype)
        return extra["keys"][side]

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is None:
                    with self.cache.timed("writing"):
                        self.cache.store(*job)
            except BaseException as e:  # reported on the compute thread at the next put or at close
                self._error = e

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, InputError):
                raise self._error
            raise InputError(f"{self.cache.root}: cannot write to the basis cache ({self._error})")

    def close(self) -> None:
        """Wait for pending writes (called when the scan ends, also on error)."""
        with self.cache.timed("waiting_for_writers"):
            for _ in self._writers:
                self._queue.put(None)
            for t in self._writers:
                t.join()
        self.cache.checkpoint()
        self._raise_writer_error()
