"""The on-disk basis cache: content keys, the identity memo, float16 accuracy, LRU budget."""

import multiprocessing
import os
import sqlite3

import pytest
import torch
from safetensors.torch import save_file

from lorascope import scan
from lorascope.errors import InputError
from lorascope.scanning.cache import BasisCache, parse_size, tensor_digest
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
    assert cache.load("k", (7, 9)) is None  # shapes do not fit this matrix
    path = tmp_path / "c" / "bases" / "k" / "k.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    assert cache.load("k", (6, 9)) is None


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
    second = scan(str(base), str(adapter), device="cpu", side="both", cache_dir=str(tmp_path / "cache"))
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # nothing rewritten: every basis was a hit
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
    assert cache.stats["hits"] == len(first.matrices)
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
