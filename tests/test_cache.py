"""The on-disk basis cache: content keys, the identity memo, float16 accuracy, LRU budget, and the
certification of every basis read back (the cache is untrusted: its bytes must never change a result)."""

import math
import multiprocessing
import os
import sqlite3
import warnings

import pytest
import torch
from safetensors.torch import save_file

from lorascope import scan
from lorascope.errors import InputError
from lorascope.scanning.cache import (
    FACTOR,
    SKETCH,
    BasisCache,
    CacheWarning,
    certify,
    parse_size,
    tensor_digest,
)
from lorascope.spectral import left_basis


def test_parse_size():
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("500 mb") == 500 * 10**6
    assert parse_size(123) == parse_size("123") == 123
    with pytest.raises(InputError, match="cannot read the size"):
        parse_size("lots")


def test_digest_depends_on_bytes_dtype_and_shape():
    t = torch.arange(12, dtype=torch.float32)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t.reshape(3, 4))
    assert tensor_digest(t) != tensor_digest(t.to(torch.float64))
    u = t.clone()
    u[5] += 1e-6
    assert tensor_digest(t) != tensor_digest(u)


def test_memo_spares_rehashing_until_the_file_changes(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(f))
    cache = BasisCache(tmp_path / "cache")
    w = torch.randn(8, 8)
    d1 = cache.digest(f, "w", w)
    d2 = cache.digest(f, "w", torch.zeros(8, 8))  # the memo answers; the tensor is not looked at
    assert d1 == d2 and cache.stats["hashed"] == 1 and cache.stats["memo_hits"] == 1
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hash again
    assert cache.digest(f, "w", torch.zeros(8, 8)) != d1 and cache.stats["hashed"] == 2


def _planted(m=96, n=160, seed=0):
    """W_0 with a spectrum spanning 10³ and directions y that spread over the whole base basis."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    W = (U * torch.logspace(0, -3, p, dtype=torch.float64)) @ V.T
    Y = torch.linalg.qr(torch.randn(m, 10, generator=g, dtype=torch.float64)).Q
    return W, Y


def test_float16_bases_keep_max_cos_within_1e_4(tmp_path):
    W, Y = _planted()
    cache = BasisCache(tmp_path / "c")
    ref = left_basis(W)  # float64 reference
    cache.store("k", ref.U, ref.S)
    hit = cache.load("k", tuple(W.shape))
    assert hit.U.dtype == torch.float16 and hit.S.dtype == torch.float64
    exact = (ref.U.T @ Y).abs().max(0).values
    stored = (hit.U.double().T @ Y).abs().max(0).values
    err = float((exact - stored).abs().max())
    assert 0 < err < 1e-4  # float16 storage: about 3e-4/sqrt(m) per cosine (m = 96 here)


def test_lru_budget_evicts_least_recently_used(tmp_path):
    cache = BasisCache(tmp_path / "c", budget="20KB")  # room for two 64 x 64 float16 entries (8.8 kB each)
    U, S = torch.randn(64, 64), torch.rand(64)
    for key in ("a", "b"):
        cache.store(key, U, S)
    assert cache.load("a", (64, 64)) is not None  # "a" is now more recent than "b"
    cache.store("c", U, S)
    assert cache.load("b", (64, 64)) is None and cache.stats["evicted"] == 1
    assert cache.load("a", (64, 64)) is not None and cache.load("c", (64, 64)) is not None
    assert cache.size() <= 20_000
    assert not (tmp_path / "c" / "bases" / "b"[:2] / "b.safetensors").exists()


def test_damaged_or_mismatched_entry_is_a_miss(tmp_path):
    cache = BasisCache(tmp_path / "c")
    cache.store("k", torch.randn(6, 6), torch.rand(6))
    assert cache.load("k", (6, 9)) is not None
    assert cache.load("absent", (6, 9)) is None and cache.stats["rejected"] == 0  # a plain miss: silent
    with pytest.warns(CacheWarning, match=r"k\.safetensors: the cached basis of 'w' is unreadable"):
        assert cache.load("k", (7, 9), "'w'") is None  # shapes do not fit this matrix
    path = tmp_path / "c" / "bases" / "k" / "k.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.warns(CacheWarning, match="unreadable"):
        assert cache.load("k", (6, 9)) is None
    assert cache.stats["rejected"] == 2


_CACHE_PAIR = dict(alpha=16, targets=("q_proj", "o_proj", "gate_proj", "down_proj"))


def test_scan_with_cache_dir_hits_on_the_second_scan(tmp_path, llama_lora):
    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    plain = scan(str(base), str(adapter), device="cpu", side="both")
    first = scan(str(base), str(adapter), device="cpu", side="both", cache_dir=str(tmp_path / "cache"))
    files = sorted((tmp_path / "cache" / "bases").rglob("*.safetensors"))
    assert len(files) == len(plain.matrices)  # one entry per (matrix, side)
    db = sqlite3.connect(tmp_path / "cache" / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM memo").fetchone()[0] == len(plain.matrices) // 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # every honest entry passes its certification
        second = scan(str(base), str(adapter), device="cpu", side="both", cache_dir=str(tmp_path / "cache"))
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # nothing rewritten: every basis was a hit
    # where the cache's time went: the fill hashed, certified its float16 form and wrote; the hit certified
    fill, hit = first.timing["cache_seconds"], second.timing["cache_seconds"]
    assert fill["hashing"] > 0 and fill["certifying"] > 0 and fill["writing"] > 0
    assert hit["certifying"] > 0 and hit["writing"] == 0 and hit["hashing"] == 0  # digests from the memo
    assert "cache_seconds" not in plain.timing
    for a, b, c in zip(plain.matrices, first.matrices, second.matrices, strict=True):
        assert a.max_cos == b.max_cos  # a miss computes exactly what the plain scan computes
        assert c.max_cos == pytest.approx(a.max_cos, abs=1e-4) and c.n_intruders == a.n_intruders
        assert c.best_match == a.best_match and c.base_singular_values == a.base_singular_values


def test_generic_basis_hook(tmp_path, llama_lora):
    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache = BasisCache(tmp_path / "cache")
    first = scan(str(base), str(adapter), device="cpu", basis=cache)
    assert cache.stats["misses"] == len(first.matrices) and cache.stats["hits"] == 0
    second = scan(str(base), str(adapter), device="cpu", basis=cache)
    assert cache.stats["hits"] == len(first.matrices) and cache.stats["rejected"] == 0
    for a, b in zip(first.matrices, second.matrices, strict=True):
        assert b.max_cos == pytest.approx(a.max_cos, abs=1e-4) and b.n_intruders == a.n_intruders


def test_unwritable_cache_dir_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create the cache folder"):
        BasisCache(blocker / "cache")


def _open_cache_after(barrier, root) -> None:
    barrier.wait()
    BasisCache(root).close()


def test_processes_opening_a_new_cache_at_once_all_succeed(tmp_path):
    # torchrun ranks open one index together; SQLite may refuse the switch to WAL at once ("database
    # is locked") instead of waiting, which failed about 2 in 3 such openings before the retry
    ctx = multiprocessing.get_context("fork")
    for i in range(6):
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_open_cache_after, args=(barrier, tmp_path / str(i))) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0], f"round {i}"


# -- certification of a cached basis against W_0 ----------------------------------------------------
def _matrix(m: int, n: int, kind: str, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A test matrix: Gaussian (Marchenko–Pastur), spectra spanning 10³ or 10⁶, one or two large
    outliers over a bulk, exactly equal singular values in clusters of 8 (or within 1e-9), scaled by
    1e4 or 1e-4, diagonal (an exactly representable basis), nearly identical rows."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    f64 = torch.float64
    if kind == "gauss":
        return (torch.randn(m, n, generator=g, dtype=f64) / n**0.5).to(dtype)
    if kind == "diagonal":
        W = torch.zeros(m, n, dtype=f64)
        W[range(p), range(p)] = torch.rand(p, generator=g, dtype=f64) + 0.1
        return W.to(dtype)
    if kind == "equal rows":
        return (torch.randn(1, n, generator=g, dtype=f64).repeat(m, 1)
                + 1e-3 * torch.randn(m, n, generator=g, dtype=f64)).to(dtype)
    bulk = torch.rand(p, generator=g, dtype=f64)
    spectra = {
        "log3": lambda: torch.logspace(0, -3, p, dtype=f64),
        "log6": lambda: torch.logspace(0, -6, p, dtype=f64),
        "outliers": lambda: torch.cat([torch.tensor([30.0, 10.0], dtype=f64), bulk[2:]]),
        "one huge": lambda: torch.cat([torch.tensor([1000.0], dtype=f64), bulk[1:]]),
        "clusters": lambda: torch.linspace(1, 0.1, p // 8 + 1, dtype=f64).repeat_interleave(8)[:p],
        "tight clusters": lambda: torch.linspace(1, 0.1, p // 8 + 1, dtype=f64).repeat_interleave(8)[:p]
        + 1e-9 * torch.rand(p, generator=g, dtype=f64),
        "large": lambda: 1e4 * torch.rand(p, generator=g, dtype=f64),
        "small": lambda: 1e-4 * torch.rand(p, generator=g, dtype=f64),
    }
    s = spectra[kind]().sort(descending=True).values
    U = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=f64)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=f64)).Q
    return ((U * s) @ V.T).to(dtype)


_KINDS = ["gauss", "log3", "log6", "outliers", "one huge", "clusters", "tight clusters", "large", "small",
          "diagonal", "equal rows"]


def _entry(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores for W: left_basis's U as float16, S as float64."""
    b = left_basis(W)
    return b.U.to(torch.float16), b.S.to(torch.float64)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 48), (200, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_honest_float16_entries_always_pass(shape, dtype):
    worst: dict[str, float] = {}
    for kind in _KINDS:
        for seed in range(3):
            W = _matrix(*shape, kind, seed, dtype)
            cert = certify(W, *_entry(W))
            assert cert.ok, (kind, seed, cert.reason)
            assert cert.U.dtype == dtype and cert.U.shape == (shape[0], min(shape))
            for check, ratio in cert.checks.items():
                worst[check] = max(worst.get(check, 0.0), ratio)
    assert list(worst) == ["trace", "singular values", "residuals", "orthonormality", "norms"]
    # the sketched checks allow FACTOR = 8 times the float16 level: honest entries stay below half of it
    assert worst["residuals"] < 0.5 and worst["orthonormality"] < 0.5, worst


def _max_cos(U: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    U = U.double()
    return ((U / U.norm(dim=0).clamp_min(1e-300)).T @ Y).abs().max(0).values


def _directions(m: int, U: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Unit vectors to measure max-cos on: random ones, and ones near the leading basis vectors."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, 40, generator=g, dtype=torch.float64)
    Y = torch.cat([Y, U.double()[:, :20] + 0.3 * Y[:, :20] / Y[:, :20].norm(dim=0)], 1)
    return Y / Y.norm(dim=0)


def _givens(U: torch.Tensor, i: int, j: int, angle: float) -> torch.Tensor:
    U = U.double().clone()
    c, s = math.cos(angle), math.sin(angle)
    ui, uj = U[:, i].clone(), U[:, j].clone()
    U[:, i], U[:, j] = c * ui + s * uj, -s * ui + c * uj
    return U.to(torch.float16)


def _flip(U: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    x = U.clone().view(torch.int16).reshape(-1)
    x[index] ^= (1 << bit) if bit < 15 else -(1 << 15)
    return x.view(torch.float16).reshape(U.shape)


def _corruptions(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor) -> dict:
    """The attacks of the audit and more, each as the (U, S) it leaves in the cache."""
    m, n = W.shape
    p = U.shape[1]
    other = _entry(_matrix(m, n, "gauss", seed=99))
    stale = _entry(W + 1e-3 * W.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=torch.Generator().manual_seed(5)))
    big = int(U.abs().argmax())  # the largest entry
    out = {
        "the basis of another matrix": other,
        "another matrix's U with the right S": (other[0], S),
        "stale: the basis of W before a 0.1 % change": stale,
        "an exponent bit flipped in the largest entry": (_flip(U, big, 14), S),
        "the sign bit and a high mantissa bit of the largest entry": (_flip(_flip(U, big, 15), big, 9), S),
        "two entries of a column swapped": (_swapped(U, (big // p, big % p), ((big // p + 1) % m, big % p)), S),
        "entries of two columns swapped": (_swapped(U, (0, 0), (0, 1)), S),
        "NaN in U": (_set(U, (1, 1), float("nan")), S),
        "Inf in U": (_set(U, (2, 0), float("inf")), S),
        "NaN in S": (U, _set(S, (3,), float("nan"))),
        "S[0] off by 1e-4": (U, _set(S, (0,), float(S[0]) * (1 + 1e-4))),
        "S[5] off by 1e-3": (U, _set(S, (5,), float(S[5]) * (1 + 1e-3))),
        "S reversed": (U, S.flip(0)),
        "columns 0 and 1 exchanged": (U[:, [1, 0, *range(2, p)]], S),
        "column 1 scaled by 1.003": (_set(U, (slice(None), 1), U[:, 1].double() * 1.003), S),
        "a rotation by 1e-3 between σ_0 and σ_p/2": (_givens(U, 0, p // 2, 1e-3), S),
        "a rotation by 0.05 between σ_3 and σ_3p/4": (_givens(U, 3, 3 * p // 4, 0.05), S),
        "one column replaced by a random unit vector": (_set(U, (slice(None), p // 3), _unit(m, 7)), S),
        "one column replaced by its neighbour": (_set(U, (slice(None), p // 3), U[:, p // 3 + 1]), S),
        "U one column short": (U[:, :-1], S[:-1]),
        "U transposed": (U.T.contiguous(), S),
        "U as float32": (U.float(), S),
    }
    return out


def _swapped(U, a, b):
    U = U.clone()
    U[a], U[b] = U[b].clone(), U[a].clone()
    return U


def _set(t, index, value):
    t = t.clone()
    t[index] = value if not isinstance(value, torch.Tensor) else value.to(t.dtype)
    return t


def _unit(m, seed):
    z = torch.randn(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z / z.norm()


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 48)])
@pytest.mark.parametrize("kind", ["gauss", "log3", "outliers"])
def test_every_corruption_fails(shape, kind):
    W = _matrix(*shape, kind, seed=1)
    U, S = _entry(W)
    for what, (Ux, Sx) in _corruptions(W, U, S).items():
        for _ in range(3):  # fresh sketches each time
            cert = certify(W, Ux, Sx)
            assert not cert.ok, f"{what} passed ({cert.reason}, {cert.ratio:.2f})"
            assert cert.reason


def test_whatever_passes_moves_max_cos_by_less_than_1e_3():
    """Random single bit flips and swapped entries: the ones that pass are harmless (low mantissa bits);
    the rest fail. Over 600 corruptions of 3 matrices."""
    passed = failed = 0
    for kind, shape in [("gauss", (64, 64)), ("log3", (80, 48)), ("outliers", (48, 80))]:
        W = _matrix(*shape, kind, seed=2)
        U, S = _entry(W)
        Y = _directions(shape[0], U)
        ref = _max_cos(U, Y)
        g = torch.Generator().manual_seed(3)
        for t in range(200):
            i = int(torch.randint(U.numel(), (1,), generator=g))
            if t % 2:
                Ux = _flip(U, i, int(torch.randint(16, (1,), generator=g)))
            else:
                j = int(torch.randint(U.numel(), (1,), generator=g))
                Ux = U.clone().reshape(-1)
                Ux[i], Ux[j] = U.reshape(-1)[j], U.reshape(-1)[i]
                Ux = Ux.reshape(U.shape)
            cert = certify(W, Ux, S)
            if cert.ok:
                passed += 1
                assert float((_max_cos(Ux, Y) - ref).abs().max()) < 1e-3
            else:
                failed += 1
    assert passed > 50 and failed > 200  # both kinds occur: the test has teeth


def test_rotations_inside_a_cluster_of_equal_sigma_pass_and_across_sigma_fail():
    W = _matrix(96, 96, "clusters", seed=4)  # σ in clusters of 8 equal values: columns 8c..8c+7
    U, S = _entry(W)
    assert float(S[8] - S[15]) < 1e-6 and float(S[7] - S[8]) > 0.05  # equal up to float32 rounding of W
    for angle in (0.05, 0.7):  # any basis of an eigenspace is a basis of left singular vectors
        assert certify(W, _givens(U, 8, 13, angle), S).ok
    # mixing σ_7² = 1 with σ_8² = 0.856 (neighbouring clusters), or with σ_40² = 0.39, by an angle θ
    # whose residual θ·Δσ² exceeds FACTOR × the float16 level (about 1.5e-4 σ_1² here)
    for i, j, angle in [(7, 8, 0.7), (7, 8, 0.05), (7, 8, 0.02), (0, 40, 0.7), (0, 40, 0.01), (0, 40, 5e-3)]:
        assert not certify(W, _givens(U, i, j, angle), S).ok, (i, j, angle)


def test_a_rotation_passes_only_below_the_residual_bound():
    """A rotation by θ of columns i, j (gap Δ = σ_i² − σ_j²) leaves residuals θ·Δ: it passes only when
    that is within FACTOR × the columns' float16 level h (and then moves any max-cos by at most θ).
    Among the first 32 columns the Rayleigh quotients (second order: θ²·Δ) reject even less."""
    W = _matrix(96, 96, "log3", seed=5)
    U, S = _entry(W)
    Y = _directions(96, U)
    ref = _max_cos(U, Y)
    seen = {True: 0, False: 0}
    for i, j in [(0, 1), (0, 48), (10, 11), (10, 60), (50, 51), (50, 95)]:
        gap = float(S[i] ** 2 - S[j] ** 2)
        h = max(_exact_tolerance(W, U, S, c)[1] for c in (i, j)) ** 0.5
        for angle in (0.3, 0.03, 3e-3, 3e-4):
            Ux = _givens(U, i, j, angle)
            ok = certify(W, Ux, S).ok
            seen[ok] += 1
            if ok:
                assert angle * gap < 2 * FACTOR * h, (i, j, angle)
                assert float((_max_cos(Ux, Y) - ref).abs().max()) <= angle + 1e-4
    assert seen[True] and seen[False]


def _exact_tolerance(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, i: int) -> tuple[float, float]:
    """Column i's exact residual ‖(G − σ_i²)ũ_i‖² and its honest float16 level h_i² =
    Σ_a v_ia ‖(G − σ_i²) e_a‖² (v_ia = 2^-20 ũ_ia²/12 + 2^-48/12), both in float64."""
    G = W.double() @ W.double().T
    u, s2 = U[:, i].double(), float(S[i]) ** 2
    M = G - s2 * torch.eye(G.shape[0], dtype=torch.float64)
    v = 2.0**-20 * u.square() / 12 + 2.0**-48 / 12
    return float((M @ u).square().sum()), float(v @ M.square().sum(1))


def test_one_wrong_column_among_64_is_caught_with_overwhelming_probability():
    """The sketch Φ acts from the left, so it measures each column's own residual: ‖Φ r_i‖² ~ ‖r_i‖²·χ²_s.
    A column passes only if χ²_s ≤ c²·s·h_i²/‖r_i‖², so the chance of missing a wrong column follows
    from its exact residual; checked here for three kinds of single wrong columns, and by 100
    certifications with fresh sketches each."""
    cases = []
    W = _matrix(64, 64, "gauss", seed=6)
    U, S = _entry(W)
    cases.append((W, _set(U, (slice(None), 20), _unit(64, 8)), S, 20))  # a random direction
    # the direction of an intruder: a unit vector between two far-apart base vectors (both moved 45°)
    y = (U[:, 5].double() + U[:, 50].double()) / 2**0.5
    cases.append((W, _set(U, (slice(None), 50), y), S, 50))
    # a tall W: replace column 10 by a vector orthogonal to W's column space (orthonormality holds,
    # only the residual can see it)
    Wt = _matrix(96, 64, "gauss", seed=7)
    Ut, St = _entry(Wt)
    z = torch.randn(96, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    Q = torch.linalg.qr(Wt.double()).Q
    z -= Q @ (Q.T @ z)
    cases.append((Wt, _set(Ut, (slice(None), 10), z / z.norm()), St, 10))
    for Wx, Ux, Sx, i in cases:
        r2, h2 = _exact_tolerance(Wx, Ux, Sx, i)
        limit = FACTOR**2 * SKETCH * h2 / r2  # the column passes iff χ²_16 falls below this
        p_miss = float(torch.special.gammainc(torch.tensor(SKETCH / 2, dtype=torch.float64),
                                              torch.tensor(limit / 2, dtype=torch.float64)))
        assert p_miss < 1e-30, (i, r2, h2)
        assert all(not certify(Wx, Ux, Sx).ok for _ in range(100))


# -- a scan never depends on what the cache holds ------------------------------------------------------
def _same_records(got, want) -> None:
    """Records equal to float16-cache precision (max-cos within 1e-4, the rest equal)."""
    for a, b in zip(want.matrices, got.matrices, strict=True):
        assert (a.name, a.side) == (b.name, b.side)
        assert b.max_cos == pytest.approx(a.max_cos, abs=1e-4) and b.n_intruders == a.n_intruders, a.name
        assert b.best_match == a.best_match and b.base_singular_values == a.base_singular_values, a.name


def _entry_files(cache_dir, base) -> dict[tuple[str, str], object]:
    """{(tensor, side): entry file}, found by hashing the base's tensors as the cache does."""
    from safetensors.torch import load_file

    by_digest = {tensor_digest(t)[:40]: name for name, t in load_file(str(base / "model.safetensors")).items()}
    out = {}
    for f in (cache_dir / "bases").glob("*/*.safetensors"):
        digest, _kind, side = f.name.split("-")[:3]
        out[(by_digest[digest], side)] = f
    return out


def _rewrite(path, U=None, S=None) -> None:
    from safetensors.torch import load_file

    t = load_file(str(path))
    save_file({"U": (t["U"] if U is None else U).contiguous(), "S": t["S"] if S is None else S}, str(path))


def _tamper(files: dict) -> dict:
    """Damage every entry, each in another way; returns {(tensor, side): what was done}."""
    from safetensors.torch import load_file

    keys = sorted(files)
    done = {}
    for i, key in enumerate(keys):
        f = files[key]
        t = load_file(str(f))
        U, S = t["U"], t["S"]
        m, p = U.shape
        kind = i % 8
        if kind == 0:  # ten random bit flips in the exponents and high mantissa bits
            x = U.clone().view(torch.int16).reshape(-1)
            g = torch.Generator().manual_seed(i)
            for _ in range(10):
                x[int(torch.randint(x.numel(), (1,), generator=g))] ^= 1 << int(torch.randint(9, 15, (1,), generator=g))
            _rewrite(f, U=x.view(torch.float16).reshape(m, p))
        elif kind == 1:  # two entries swapped: the largest and its neighbour in the column
            a = int(U.abs().argmax())
            Ux = U.clone().reshape(-1)
            b = (a + p) % Ux.numel()
            Ux[a], Ux[b] = U.reshape(-1)[b], U.reshape(-1)[a]
            _rewrite(f, U=Ux.reshape(m, p))
        elif kind == 2:  # a planted orthonormal basis with the same spectrum
            Q = torch.linalg.qr(torch.randn(m, p, generator=torch.Generator().manual_seed(i))).Q
            _rewrite(f, U=Q.to(torch.float16))
        elif kind == 3:  # the basis of another tensor of the same shape and side, if any
            other = next((files[k] for k in keys if k != key and k[1] == key[1]
                          and load_file(str(files[k]))["U"].shape == U.shape), None)
            if other is None:
                continue
            f.write_bytes(other.read_bytes())
        elif kind == 4:
            _rewrite(f, U=U.clone().index_fill_(0, torch.tensor([0]), float("nan")))
        elif kind == 5:  # singular values 1 % off
            _rewrite(f, S=S * 1.01)
        elif kind == 6:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
        else:
            f.write_bytes(os.urandom(f.stat().st_size))  # random bytes
        done[key] = kind
    return done


def test_a_tampered_cache_gives_the_records_of_a_scan_without_cache(tmp_path, llama_lora):
    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    plain = scan(str(base), str(adapter), device="cpu", side="both")
    scan(str(base), str(adapter), device="cpu", side="both", cache_dir=str(cache_dir))
    files = _entry_files(cache_dir, base)
    done = _tamper(files)
    assert len(done) >= len(files) - 2 and set(done.values()) == set(range(8))
    with pytest.warns(CacheWarning) as caught:
        second = scan(str(base), str(adapter), device="cpu", side="both", cache_dir=str(cache_dir))
    for a, b in zip(plain.matrices, second.matrices, strict=True):  # every damaged entry recomputed:
        if (a.name, a.side) in done:                                  # the very records of the plain scan
            assert a == b, (a.name, a.side, done[(a.name, a.side)])
    _same_records(second, plain)
    messages = [str(w.message) for w in caught]
    for (name, side), kind in done.items():  # one warning per entry, naming its file and its tensor
        hits = [m for m in messages if str(files[(name, side)]) in m and f"'{name}' ({side} side)" in m]
        assert len(hits) == 1, (name, side, kind)
        assert ("unreadable" if kind in (6, 7) else "failed certification") in hits[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # the entries were rewritten: no warning now
        third = scan(str(base), str(adapter), device="cpu", side="both", cache_dir=str(cache_dir))
    _same_records(third, plain)


def _top_vectors(merged, name: str, k: int = 10) -> torch.Tensor:
    from safetensors.torch import load_file

    from lorascope.spectral import exact_top_k

    return exact_top_k(load_file(str(merged / "model.safetensors"))[name].double(), k).U


def test_whoever_writes_the_cache_cannot_change_a_result(tmp_path, llama_lora):
    """Plant, for one matrix, W_0's basis with the column that best matches an intruder replaced by the
    intruder's own direction (its max-cos would become 1: no intruder left), and for another the
    basis of a different matrix of the same shape. Used raw, they change the records; through the
    cache, the records are those of a scan without cache."""
    from safetensors.torch import load_file

    from lorascope.spectral import SVD

    base, adapter, merged = llama_lora(**_CACHE_PAIR, merged=True)
    cache_dir = tmp_path / "cache"
    plain = scan(str(base), str(adapter), device="cpu")
    scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    files = _entry_files(cache_dir, base)
    target = next(r for r in plain.matrices if r.n_intruders and r.module_type.endswith("q_proj"))
    j = next(i for i, c in enumerate(target.max_cos) if c < 0.5)  # an intruder
    y = _top_vectors(merged, target.name)[:, j]
    t = load_file(str(files[(target.name, "left")]))
    U = t["U"].clone()
    U[:, target.best_match[j]] = (y / y.norm()).to(torch.float16)
    _rewrite(files[(target.name, "left")], U=U)
    donor = next(r for r in plain.matrices if r.name != target.name and r.module_type.endswith("q_proj"))
    victim = next(r for r in plain.matrices if r.module_type.endswith("o_proj"))
    files[(victim.name, "left")].write_bytes(files[(donor.name, "left")].read_bytes())
    planted = {name: load_file(str(files[(name, "left")])) for name in (target.name, victim.name)}

    def raw(key, W):  # what a scan that trusts the cache would use
        name = key.rsplit(":", 1)[0]
        if name in planted:
            return SVD(U=planted[name]["U"].to(W.dtype), S=planted[name]["S"])
        return left_basis(W)

    trusting = {r.name: r for r in scan(str(base), str(adapter), device="cpu", basis=raw).matrices}
    assert trusting[target.name].n_intruders < target.n_intruders  # the attack works on a trusting scan
    assert trusting[victim.name].max_cos != pytest.approx(victim.max_cos, abs=1e-2)
    with pytest.warns(CacheWarning, match="failed certification"):
        certified = scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    _same_records(certified, plain)


def test_a_base_rewritten_with_its_mtime_restored_is_hashed_again(tmp_path, llama_lora):
    from safetensors.torch import load_file

    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    f = base / "model.safetensors"
    st = os.stat(f)
    sd = load_file(str(f))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        sd[name] = sd[name] + 0.02 * torch.randn(sd[name].shape, generator=torch.Generator().manual_seed(1))
    save_file(sd, str(f), metadata={"format": "pt"})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size
    fresh = scan(str(base), str(adapter), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # nothing wrong is even looked up: the memo misses
        again = scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    _same_records(again, fresh)
    cache = BasisCache(cache_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert cache.lookup(f, name, sd[name]) == (tensor_digest(sd[name]), True)  # remembered anew


def test_a_wrong_digest_in_the_memo_costs_a_recomputation_not_a_result(tmp_path, llama_lora):
    """Where ctime gives no protection (an index written by someone else, a file system without it):
    the memo maps the rewritten base to its old digests. The old bases then fail certification
    against the new W_0, the tensor is hashed again and the memo corrected."""
    from safetensors.torch import load_file

    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    f = base / "model.safetensors"
    sd = load_file(str(f))
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name].flip(0)  # the same values in another order: a different basis
    save_file(sd, str(f), metadata={"format": "pt"})
    st = os.stat(f)
    db = sqlite3.connect(cache_dir / "index.sqlite")
    db.execute("UPDATE memo SET size=?, mtime=?, ctime=?, inode=?, dev=?",
               (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
    db.commit()
    db.close()
    fresh = scan(str(base), str(adapter), device="cpu")
    with pytest.warns(CacheWarning) as caught:
        again = scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    _same_records(again, fresh)
    messages = " | ".join(str(w.message) for w in caught)
    assert "failed certification" in messages and f"wrong digest for '{name}'" in messages
    assert BasisCache(cache_dir).lookup(f, name, sd[name]) == (tensor_digest(sd[name]), True)  # corrected
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        _same_records(scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir)), fresh)


def test_the_generic_hook_certifies_too(tmp_path, llama_lora):
    from safetensors.torch import load_file

    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    plain = scan(str(base), str(adapter), device="cpu")
    cache = BasisCache(tmp_path / "cache")
    scan(str(base), str(adapter), device="cpu", basis=cache)
    entries = sorted((tmp_path / "cache" / "bases").glob("*/*.safetensors"))
    for f in entries:
        _rewrite(f, U=load_file(str(f))["U"].flip(1))  # the columns in reverse order
    with pytest.warns(CacheWarning, match="failed certification"):
        again = scan(str(base), str(adapter), device="cpu", basis=cache)
    assert cache.stats["rejected"] == len(entries)
    _same_records(again, plain)


# -- garbage in the cache folder: a rebuilt index or a clear error, never a traceback --------------
def _damage_index(index, how: str) -> None:
    if how == "random bytes":
        index.write_bytes(os.urandom(8192))
    elif how == "truncated":
        data = index.read_bytes()
        assert len(data) >= 4 * 4096  # a few pages: the tables' pages are cut off
        index.write_bytes(data[: len(data) // 2])
    elif how == "text":
        index.write_text('{"this": "is not a database"}\n')
    elif how == "directory":
        index.unlink()
        (index / "junk").mkdir(parents=True)
    elif how == "foreign database":
        index.unlink()
        db = sqlite3.connect(index)
        db.execute("CREATE TABLE entries (id INTEGER, blob BLOB)")
        db.execute("INSERT INTO entries VALUES (1, x'00ff')")
        db.commit()
        db.close()
    for suffix in ("-wal", "-shm"):
        side = index.with_name(index.name + suffix)
        if side.exists() and how != "directory":
            side.write_bytes(os.urandom(64))


@pytest.mark.parametrize("how", ["random bytes", "truncated", "text", "directory", "foreign database"])
def test_a_damaged_index_is_moved_aside_and_rebuilt(tmp_path, llama_lora, how):
    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    plain = scan(str(base), str(adapter), device="cpu")
    scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    n_files = len(list((cache_dir / "bases").glob("*/*.safetensors")))
    _damage_index(cache_dir / "index.sqlite", how)
    with pytest.warns(CacheWarning, match=r"index\.sqlite: .*; moved it to index\.sqlite\.corrupt-"):
        again = scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    _same_records(again, plain)
    assert list(cache_dir.glob("index.sqlite.corrupt-*"))
    cache = BasisCache(cache_dir)  # the new index knows every entry file again (for the budget)
    assert cache.size() == sum(f.stat().st_size for f in (cache_dir / "bases").glob("*/*.safetensors"))
    assert len(list((cache_dir / "bases").glob("*/*.safetensors"))) == n_files
    assert cache.stats["rejected"] == 0


def test_old_memo_layout_and_foreign_rows_are_dropped(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    db = sqlite3.connect(root / "index.sqlite")
    db.execute("CREATE TABLE memo (path TEXT, size INTEGER, mtime INTEGER, tensor TEXT, digest TEXT, "
               "PRIMARY KEY (path, size, mtime, tensor))")  # an earlier version's memo
    db.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, nbytes INTEGER, last_used REAL)")
    sentinel = tmp_path / "sentinel.safetensors"
    sentinel.write_text("not the cache's to delete")
    db.executemany("INSERT INTO entries VALUES (?, ?, ?)", [
        ("../../sentinel", 10**12, 0.0),  # a path out of bases/, and a size that forces eviction
        ("bad-size", "lots", 0.0), (None, 1, 0.0), ("no-time", 1, "yesterday")])
    db.commit()
    db.close()
    cache = BasisCache(root, budget="1MB")
    rows = cache._db.execute("SELECT key FROM entries").fetchall()
    assert rows == [("../../sentinel",)]  # rows of foreign types are gone at once
    cache.store("k", torch.randn(8, 8), torch.rand(8))  # evicts the huge row: its key is not followed
    assert sentinel.exists() and cache._db.execute("SELECT key FROM entries").fetchall() == [("k",)]
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(f))
    cache._db.execute("INSERT INTO memo VALUES (?, 'w', ?, ?, ?, ?, ?, 'not-a-digest')",
                      (str(f.resolve()), *[getattr(os.stat(f), a) for a in
                                           ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")]))
    w = torch.randn(4, 4)
    assert cache.lookup(f, "w", w) == (tensor_digest(w), False)  # a garbage digest is never used


def test_garbage_entry_files_are_repaired(tmp_path, llama_lora):
    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    plain = scan(str(base), str(adapter), device="cpu")
    scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    files = sorted((cache_dir / "bases").glob("*/*.safetensors"))
    files[0].unlink()
    files[0].mkdir()  # a directory where an entry should be
    (files[0] / "x").write_text("x")
    files[1].write_bytes(b"")  # empty
    folder = files[2].parent  # a file where a folder of entries should be
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    folder.write_text("in the way")
    with pytest.warns(CacheWarning) as caught:
        again = scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    _same_records(again, plain)
    text = " | ".join(str(w.message) for w in caught)
    assert f"{files[0]}: the cached basis of '" in text and "is in the way of a cache entry" in text
    assert files[0].is_file() and files[1].stat().st_size > 0 and files[2].is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        _same_records(scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir)), plain)


def test_a_read_only_cache_folder_is_read_and_certified_but_not_written(tmp_path, llama_lora, read_only):
    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    plain = scan(str(base), str(adapter), device="cpu")
    scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    before = sorted((p.relative_to(cache_dir), p.stat().st_mtime_ns) for p in cache_dir.rglob("*"))
    read_only(cache_dir)
    with pytest.warns(CacheWarning, match="read-only: cached bases are read") as caught:
        again = scan(str(base), str(adapter), device="cpu", cache_dir=str(cache_dir))
    _same_records(again, plain)
    assert not any("failed" in str(w.message) or "unreadable" in str(w.message) for w in caught)
    assert sorted((p.relative_to(cache_dir), p.stat().st_mtime_ns) for p in cache_dir.rglob("*")) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    read_only(empty)
    with pytest.warns(CacheWarning, match="read-only"):
        _same_records(scan(str(base), str(adapter), device="cpu", cache_dir=str(empty)), plain)
    assert not list(empty.iterdir())


def test_cli_garbage_index_warns_and_a_file_in_the_way_exits_2(tmp_path, llama_lora):
    import subprocess
    import sys

    base, adapter, _ = llama_lora(**_CACHE_PAIR)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "index.sqlite").write_bytes(os.urandom(4096))
    cmd = [sys.executable, "-m", "lorascope", "scan", str(base), str(adapter), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([*cmd, "--cache-dir", str(cache_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "CacheWarning" in ok.stderr and "moved it to index.sqlite.corrupt-" in ok.stderr
    assert "Traceback" not in ok.stderr
    (tmp_path / "file").write_text("x")
    bad = subprocess.run([*cmd, "--cache-dir", str(tmp_path / "file" / "cache")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "cannot create the cache folder" in bad.stderr and "Traceback" not in bad.stderr
