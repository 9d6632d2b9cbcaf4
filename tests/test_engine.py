"""The one scan loop: mmap-free reads, the blocked float64 basis, prefetching, equality with a plain loop."""

import time
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from lorascope import ScanOptions, scan
from lorascope.errors import InputError, NonFiniteError
from lorascope.io.checkpoint import Checkpoint
from lorascope.io.layout import orient
from lorascope.io.tuned import open_tuned
from lorascope.scanning.analyze import analyze_matrix
from lorascope.scanning.engine import prefetch
from lorascope.scanning.pairing import pair_matrices
from lorascope.spectral import SVD, left_basis


def test_checkpoint_reads_every_dtype_without_a_memory_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w.{dt}": torch.randn(7, 5, generator=g).to(dt)
               for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
    tensors["i"] = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    ckpt = Checkpoint(tmp_path / "m.safetensors")
    for name, ref in load_file(str(tmp_path / "m.safetensors")).items():
        got = ckpt.get(name, check_finite=False)
        assert got.dtype == ref.dtype and torch.equal(got, ref), name
        assert ckpt.fresh(name)
        got.zero_()  # a fresh buffer: changing it leaves the checkpoint's tensor alone
        assert torch.equal(ckpt.get(name, check_finite=False), ref) or ref.numel() == 0


def test_pickled_weights_are_shared_not_fresh(tmp_path):
    sd = {"a.weight": torch.randn(4, 3)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.get("a.weight"), sd["a.weight"]) and not ckpt.fresh("a.weight")


def test_bad_safetensors_files_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"cut.safetensors"):
        Checkpoint(cut).get("w")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="huge.safetensors"):
        Checkpoint(huge)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (50, 50)])
def test_blocked_gram_basis_equals_float64_svd(shape):
    g = torch.Generator().manual_seed(1)
    s = torch.logspace(0, -3, min(shape), dtype=torch.float64)  # a spectrum spanning 10³
    U = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64)).Q
    W = ((U * s) @ V.T).float()
    ref = torch.linalg.svd(W.double(), full_matrices=False)
    got = left_basis(W, block=97)  # several blocks of rows or columns
    assert got.U.dtype == torch.float32 and got.U.shape == ref.U.shape
    assert torch.allclose(got.S, ref.S, rtol=1e-9, atol=1e-12)
    # each column equals the reference column up to sign (unit vectors; float32 rounding only)
    cos = (got.U.double() * ref.U).sum(0).abs()
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    whole = left_basis(W.double())  # one block: the same basis
    assert torch.allclose((whole.U * got.U.double()).sum(0).abs(), torch.ones_like(cos), atol=1e-6)


def test_rank_deficient_tall_matrix_gets_zero_columns():
    g = torch.Generator().manual_seed(2)
    f64 = torch.float64
    W = torch.randn(30, 3, generator=g, dtype=f64) @ torch.randn(3, 10, generator=g, dtype=f64)  # rank 3
    norms = left_basis(W).U.norm(dim=0)
    assert torch.allclose(norms[:3], torch.ones(3, dtype=f64)) and bool((norms[3:] == 0).all())


def test_prefetch_keeps_order_overlaps_and_raises():
    def slow(i):
        time.sleep(0.05 * (5 - i))  # later items finish first
        return i * i

    t = time.perf_counter()
    assert list(prefetch(range(5), slow, workers=4, depth=4)) == [0, 1, 4, 9, 16]
    assert time.perf_counter() - t < 0.05 * 15 * 0.7  # the sleeps overlapped

    def boom(i):
        if i == 2:
            raise ValueError("bad item")
        return i

    with pytest.raises(ValueError, match="bad item"):
        list(prefetch(range(5), boom, workers=2, depth=2))


def _reference(base, tuned, side="left"):
    """Alg. 1 pair by pair without the engine: Checkpoint.get, the base basis from torch.linalg.svd."""
    b, t = Checkpoint(base), open_tuned(str(tuned))
    pairs, _ = pair_matrices(b, t, ScanOptions())
    sides = ("left", "right") if side == "both" else (side,)

    def svd_basis(key, W):
        U, S, _ = torch.linalg.svd(W.double(), full_matrices=False)
        return SVD(U=U, S=S)

    out = []
    for p in pairs:
        W0 = orient(b.get(p.name), p.kind).float()
        out += analyze_matrix(p.name, p.kind, W0, t.delta(p.ref, W0, p.kind), 10, 0.5, sides, svd_basis)
    return out


@pytest.mark.parametrize("tuned_key", ["adapter", "merged"])
def test_engine_scan_equals_a_plain_loop(llama_lora, tuned_key):
    paths = dict(zip(("base", "adapter", "merged"), llama_lora(merged=True), strict=True))
    got = scan(str(paths["base"]), str(paths[tuned_key]), device="cpu", side="both").matrices
    ref = _reference(paths["base"], paths[tuned_key], side="both")
    assert [(r.name, r.side) for r in got] == [(r.name, r.side) for r in ref]
    for a, b in zip(got, ref, strict=True):
        assert a.max_cos == pytest.approx(b.max_cos, abs=1e-5), a.name
        assert a.best_match == b.best_match and a.n_intruders == b.n_intruders, a.name
        assert a.singular_values == pytest.approx(b.singular_values, rel=1e-5), a.name
        assert a.delta_singular_values == pytest.approx(b.delta_singular_values, rel=1e-4, abs=1e-7)


def test_engine_handles_conv1d_full_finetune(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    got = scan(str(tmp_path / "base"), str(tmp_path / "tuned"), device="cpu").matrices
    ref = _reference(tmp_path / "base", tmp_path / "tuned")
    assert [r.name for r in got] == [r.name for r in ref] and any(r.kind == "conv1d" for r in got)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and a.max_cos == pytest.approx(b.max_cos, abs=1e-5), a.name
        assert a.delta_rel_norm == pytest.approx(b.delta_rel_norm, rel=1e-5)


def test_engine_reports_nan_with_file_and_tensor(llama_lora):
    base, adapter, _ = llama_lora(merged=True)
    sd = load_file(str(base / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj.weight"
    sd[name][0, 0] = float("nan")
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"model.safetensors: tensor 'model.layers.1.self_attn.v_proj.weight'"):
        scan(str(base), str(adapter), device="cpu")


def test_concurrent_pairs_give_the_same_records_in_order(tmp_path, llama_lora):
    base, adapter, merged = llama_lora(merged=True)
    for tuned in (adapter, merged):
        one = scan(str(base), str(tuned), device="cpu", side="both", streams=1).matrices
        many = scan(str(base), str(tuned), device="cpu", side="both", streams=3).matrices
        assert [asdict(r) for r in many] == [asdict(r) for r in one]
    cached = [scan(str(base), str(adapter), device="cpu", streams=3, cache_dir=str(tmp_path / "c")).matrices
              for _ in range(2)]  # fills the cache from 3 threads, then reads it back
    assert [r.name for r in cached[1]] == [r.name for r in cached[0]]
    for a, b in zip(cached[0], cached[1], strict=True):
        assert a.max_cos == pytest.approx(b.max_cos, abs=1e-3) and a.n_intruders == b.n_intruders, a.name
    with pytest.raises(InputError, match="streams"):
        scan(str(base), str(adapter), device="cpu", streams=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_concurrent_cuda_streams_give_the_same_records(llama_lora):
    # wide enough that the unchanged matrices of "merged" take the Krylov top-k, not the exact route
    base, adapter, merged = llama_lora(hidden=256, intermediate=512, layers=1, kv_heads=4, merged=True)
    routes = []
    for tuned in (adapter, merged):
        one = scan(str(base), str(tuned), device="cuda", side="both", streams=1).matrices
        routes += [r.exact for r in one]
        many = scan(str(base), str(tuned), device="cuda", side="both", streams=4).matrices
        assert [r.name for r in many] == [r.name for r in one]
        for a, b in zip(many, one, strict=True):
            assert a.max_cos == pytest.approx(b.max_cos, abs=1e-6) and a.best_match == b.best_match, a.name
            assert a.n_intruders == b.n_intruders and a.singular_values == pytest.approx(b.singular_values, rel=1e-6)
    assert any(routes) and not all(routes)  # both the exact and the Krylov route ran


def test_many_adapters_of_one_base_give_each_its_own_scan(tmp_path, llama_lora):
    """scan_many reads and decomposes each base matrix once, and every input gets the records that a
    scan of it alone gives (adapters with different targets, a full fine-tune, in one batch)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from lorascope.scanning.api import scan_many

    base, adapter, merged = llama_lora(merged=True)
    torch.manual_seed(1)
    other = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(
        r=2, lora_alpha=8, init_lora_weights=False, target_modules=["k_proj", "v_proj"]))
    other.save_pretrained(tmp_path / "other")
    inputs = [str(adapter), str(tmp_path / "other"), str(merged)]
    calls = []

    def counting_basis(key, W):
        calls.append(key)
        return left_basis(W)

    batch = scan_many(str(base), inputs, device="cpu", side="both", basis=counting_basis)
    alone = [scan(str(base), t, device="cpu", side="both") for t in inputs]
    for b, a in zip(batch, alone, strict=True):
        assert [asdict(r) for r in b.matrices] == [asdict(r) for r in a.matrices]
        assert b.unpaired == a.unpaired and b.settings == a.settings
    assert len(calls) == len(set(calls))  # one decomposition per (base matrix, side)
    assert {k.rsplit(":", 1)[0] for k in calls} == {r.name for r in batch[2].matrices}


def test_lora_adapters_of_one_rank_run_their_top_k_together(tmp_path, llama_lora, monkeypatch):
    """A many-adapter scan runs the Krylov top-k of same-rank LoRA adapters of one base matrix as one
    batch (top_k_stack), and each adapter still gets the records of its own scan."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from lorascope.scanning import analyze
    from lorascope.scanning.api import scan_many

    # min(m, n) > CPU_EXACT_UP_TO (640), so that the CPU runs Krylov steps on these matrices
    base, adapter, _ = llama_lora(hidden=704, intermediate=768, layers=1, targets=("q_proj", "down_proj"))
    inputs = [str(adapter)]
    for seed in (1, 2):
        torch.manual_seed(seed)
        other = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(
            r=4, lora_alpha=8 * seed, init_lora_weights=False, target_modules=["q_proj", "down_proj"]))
        other.save_pretrained(tmp_path / f"seed-{seed}")
        inputs.append(str(tmp_path / f"seed-{seed}"))
    sizes = []
    real = analyze.top_k_stack
    monkeypatch.setattr(analyze, "top_k_stack", lambda st, *a, **kw: sizes.append(len(st)) or real(st, *a, **kw))
    batch = scan_many(str(base), inputs, device="cpu")
    assert sizes == [3, 3]  # one batch per base matrix
    alone = [scan(str(base), t, device="cpu") for t in inputs]
    for b, a in zip(batch, alone, strict=True):
        assert [r.name for r in b.matrices] == [r.name for r in a.matrices]
        for rb, ra in zip(b.matrices, a.matrices, strict=True):
            assert not rb.exact and rb.n_intruders == ra.n_intruders and rb.best_match == ra.best_match
            assert rb.max_cos == pytest.approx(ra.max_cos, abs=1e-6)
            assert rb.singular_values == pytest.approx(ra.singular_values, rel=1e-6)
            assert rb.delta_singular_values == pytest.approx(ra.delta_singular_values, rel=1e-6)
            assert rb.delta_kurtosis == pytest.approx(ra.delta_kurtosis, rel=1e-9)  # float64 sums in other blocks


def test_cli_scans_a_folder_of_adapters(tmp_path, llama_lora):
    import json
    import shutil
    import subprocess
    import sys

    base, adapter, _ = llama_lora()
    many = tmp_path / "adapters"
    many.mkdir()
    for name in ("a", "b"):
        shutil.copytree(adapter, many / name)
    (many / "notes.txt").write_text("not an adapter")
    run = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(many), "--device", "cpu",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    scans = [json.loads((tmp_path / "out" / n / "scan.json").read_text()) for n in ("a", "b")]
    assert scans[0]["matrices"] == scans[1]["matrices"] and scans[0]["timing"]["scanned_together"] == 2
    inside = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(adapter),
                             "--out", str(adapter / "scan")], capture_output=True, text=True)
    assert inside.returncode == 2 and "lies inside the tuned" in inside.stderr
    assert not (adapter / "scan").exists()
    nothing = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(tmp_path / "zz*")],
                             capture_output=True, text=True)
    assert nothing.returncode == 2 and "matches no file" in nothing.stderr


def test_cpu_streams_follow_the_working_set_and_share_the_threads(llama_lora, monkeypatch):
    from lorascope.scanning import engine

    class Shapes:
        def __init__(self, shape):
            self.shape_ = shape

        def shape(self, name):
            return self.shape_

    jobs = [engine.Job("w", "linear", [(0, "w")])]
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert engine.default_streams(Shapes((1536, 576)), jobs, cpu, torch.float32) == 2  # SmolLM2's MLP
        assert engine.default_streams(Shapes((5632, 2048)), jobs, cpu, torch.float32) == 1  # keeps the RSS peak
        assert engine.default_streams(Shapes((1536, 576)), [], cpu, torch.float32) == 1
        seen = []
        real = engine.analyze_matrices
        monkeypatch.setattr(engine, "analyze_matrices", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
        base, adapter, _ = llama_lora(merged=True)
        scan(str(base), str(adapter), device="cpu", streams=2)
        assert seen and set(seen) == {1}  # each stream on one thread: two OpenMP teams of 2 spin on 2 cores
        assert torch.get_num_threads() == 2  # restored for the caller
    finally:
        torch.set_num_threads(before)


def test_cpu_scan_takes_the_exact_top_k_where_it_is_cheaper():
    """On the CPU, W_t's top-k of a matrix with min(m, n) ≤ CPU_EXACT_UP_TO comes from the Gram eigh
    (cheaper there than the Krylov steps) and equals the Krylov result; larger ones keep Krylov."""
    from lorascope.scanning.analyze import analyze_matrix
    from lorascope.spectral import LowRankDelta, Tuned, left_basis, top_k
    from lorascope.spectral.decompose import CPU_EXACT_UP_TO

    g = torch.Generator().manual_seed(0)
    for m, exact in ((CPU_EXACT_UP_TO, True), (CPU_EXACT_UP_TO + 64, False)):
        W = torch.randn(m, m + 100, generator=g) * torch.logspace(0, -2, m + 100)
        d = LowRankDelta(torch.randn(m, 8, generator=g), torch.randn(8, m + 100, generator=g) * 0.1, 2.0)
        rec = analyze_matrix("model.layers.0.mlp.up_proj.weight", "linear", W, d, 10, 0.5, ("left",), None)[0]
        assert rec.exact is exact
        krylov = top_k(Tuned(W, d), 10, init=left_basis(W).U)
        assert not krylov.exact
        assert rec.singular_values == pytest.approx(krylov.S.tolist(), rel=1e-5)
