"""LoRA inits that change the base (PiSSA, OLoRA, CorDA, …), saved as PEFT saves them by default:
the factors are relative to W_res, and the scan must still equal the merged-weights oracle against
the original base (or refuse, saying what to pass)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_peft_tuners import assert_matches_oracle, build, perturb, tiny_gpt2, tiny_llama

from lorascope import scan
from lorascope.errors import InputError
from lorascope.io.tuned import residual as res

T = ["q_proj", "down_proj"]


def lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), target_modules=kw.pop("target_modules", T),
                      **kw)


def save_residual(folder):
    """The PEFT docs' recipe: right after the init, unload the adapter and save the residual model."""
    def train(pm):
        copy.deepcopy(pm).unload().save_pretrained(folder)
        perturb(pm)
    return train


def relabel_init(adapter, init) -> None:
    """Rewrite the adapter's init_lora_weights, leaving its factors as they are."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_reconstructed_residual_equals_peft_init(init):
    """M = W_0 − W_res rebuilt from W_0 alone matches PEFT's own init on the same weights."""
    from peft import get_peft_model

    model = tiny_llama()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, lora(init_lora_weights=init, lora_alpha=6))
    for name, mod in pm.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        path = name.removeprefix("base_model.model.")
        w0 = W0[path + ".weight"]
        B_M, A_M = res.mutation(init, w0, "linear", 4, mod.scaling["default"], path)
        peft_M = w0.double() - mod.base_layer.weight.double()
        assert torch.allclose(B_M @ A_M, peft_M, atol=1e-5 * float(w0.abs().max())), path
        # and the init factors PEFT wrote span the same update: s·B_0 A_0 = M
        s0 = mod.scaling["default"] * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).double()
        assert torch.allclose(s0, peft_M, atol=1e-5 * float(w0.abs().max()))


@pytest.mark.parametrize("init,kw,model", [
    ("pissa", {}, "llama"),
    ("olora", {}, "llama"),
    ("pissa", {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 5}}, "llama"),
    ("pissa", {"fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"]}, "gpt2"),
    ("olora", {"fan_in_fan_out": True, "target_modules": ["attn.c_proj"]}, "gpt2"),  # PEFT QRs the stored weight
    ("pissa", {"use_dora": True}, "llama"),  # a variant: through PEFT's merge, on the rebuilt W_res
], ids=["pissa", "olora", "pissa-rslora-patterns", "pissa-gpt2-conv1d", "olora-gpt2-conv1d", "pissa-dora"])
def test_default_saved_adapter_equals_merged_oracle(tmp_path, one_thread, init, kw, model):
    m = tiny_gpt2() if model == "gpt2" else tiny_llama()
    base, adapter, merged = build(tmp_path, lora(init_lora_weights=init, **kw), model=m)
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] == init
    assert_matches_oracle(base, adapter, merged)
    # read as a plain LoRA on the original base (the old, silent behaviour) it would differ
    relabel_init(adapter, True)
    with pytest.raises(AssertionError):
        assert_matches_oracle(base, adapter, merged)


def test_pissa_embedding_base_is_unchanged(tmp_path, one_thread):
    """PEFT's Embedding layer does not run PiSSA: W_0 of an adapted embedding stays as it was."""
    base, adapter, merged = build(tmp_path, lora(init_lora_weights="pissa", target_modules=["embed_tokens", "q_proj"]))
    assert_matches_oracle(base, adapter, merged, embeddings=True)


def test_converted_adapter_is_plain_lora(tmp_path, one_thread):
    """save_pretrained(path_initial_model_for_weight_conversion=…) writes a rank-2r LoRA on W_0."""
    init_dir = tmp_path / "init"

    def train(pm):
        pm.peft_config["default"].init_lora_weights = True
        pm.save_pretrained(init_dir)
        pm.peft_config["default"].init_lora_weights = "pissa"
        perturb(pm)

    base, adapter, merged = build(tmp_path, lora(init_lora_weights="pissa"), train=train,
                                  save_kwargs={"path_initial_model_for_weight_conversion": str(init_dir)})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    assert_matches_oracle(base, adapter, merged)
    assert scan(str(base), str(adapter), k=4).settings["tuned_kind"] == "lora"


def test_random_init_needs_the_residual_base(tmp_path, one_thread):
    residual = tmp_path / "residual"
    base, adapter, merged = build(tmp_path, lora(init_lora_weights="pissa_niter_2"), train=save_residual(residual))
    with pytest.raises(InputError, match=r"pissa_niter_2.*randomised SVD.*--residual-base"):
        scan(str(base), str(adapter), k=4)
    assert_matches_oracle(base, adapter, merged, residual_base=str(residual))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_base_agrees_with_reconstruction(tmp_path, one_thread, init):
    residual = tmp_path / "residual"
    base, adapter, merged = build(tmp_path, lora(init_lora_weights=init), train=save_residual(residual))
    a = scan(str(base), str(adapter), k=6, dtype="float64")
    b = scan(str(base), str(adapter), k=6, dtype="float64", residual_base=str(residual))
    assert b.settings["residual_base"] == str(residual)
    for ra, rb in zip(a.matrices, b.matrices, strict=True):
        assert ra.max_cos == pytest.approx(rb.max_cos, abs=1e-5)
    assert_matches_oracle(base, adapter, merged, residual_base=str(residual))


@pytest.mark.parametrize("init,why", [("corda", "activation statistics"), ("lora_ga", "gradients"),
                                      ("loftq", "quantisation"), ("some_new_init", "does not know")])
def test_data_dependent_inits_are_refused_without_residual(tmp_path, init, why):
    """CorDA, LoRA-GA and LoftQ cannot be rebuilt from W_0; the message says why and what to pass.
    (The adapter is a PiSSA one with its init relabelled: PEFT needs data to build the real ones.)"""
    residual = tmp_path / "residual"
    base, adapter, merged = build(tmp_path, lora(init_lora_weights="pissa"), train=save_residual(residual))
    relabel_init(adapter, init)
    with pytest.raises(InputError, match=rf"init_lora_weights='{init}'.*{why}.*residual"):
        scan(str(base), str(adapter), k=4)
    assert_matches_oracle(base, adapter, merged, residual_base=str(residual))


def test_residual_base_must_fit(tmp_path):
    residual = tmp_path / "residual"
    base, adapter, _ = build(tmp_path, lora(init_lora_weights="pissa_niter_1"), train=save_residual(residual))
    tiny_llama(hidden=16, intermediate=24).save_pretrained(tmp_path / "small")
    with pytest.raises(Exception, match="residual base .*shape"):
        scan(str(base), str(adapter), k=4, residual_base=str(tmp_path / "small"))
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(tmp_path / "bert")
    with pytest.raises(Exception, match="residual base .*no weight"):
        scan(str(base), str(adapter), k=4, residual_base=str(tmp_path / "bert"))


def test_tied_singular_values_refuse_reconstruction():
    """σ_r = σ_{r+1}: the rank-r truncation PEFT kept is not determined by W_0."""
    W = torch.diag(torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0, 0.5]))
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="tie"):
        res.mutation("pissa", Q @ W, "linear", 3, 2.0, "x")
    B, A = res.mutation("pissa", Q @ W, "linear", 2, 2.0, "x")  # σ_2 > σ_3: fine
    assert torch.linalg.matrix_rank(B @ A) == 2


def test_cli_residual_base(tmp_path):
    import os
    import subprocess
    import sys

    residual = tmp_path / "residual"
    base, adapter, _ = build(tmp_path, lora(init_lora_weights="pissa_niter_1"), train=save_residual(residual))
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "lorascope", "scan", str(base), str(adapter), "--k", "4"]
    ok = subprocess.run(cmd + ["--residual-base", str(residual), "--out", str(tmp_path / "o")], capture_output=True,
                        text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "o" / "scan.json").read_text())["settings"]["residual_base"] == str(residual)


@pytest.mark.parametrize("residual", [False, True])
def test_mitigate_writes_the_merged_model(tmp_path, one_thread, residual):
    """mitigate with λ = 1 (the identity) writes W_0 + ΔW: PEFT's merged weights."""
    from lorascope import mitigate
    from lorascope.io.checkpoint import Checkpoint

    res_dir = tmp_path / "residual"
    base, adapter, merged = build(tmp_path, lora(init_lora_weights="pissa"), train=save_residual(res_dir))
    with pytest.raises(InputError, match="cannot be written as a LoRA adapter exactly"):
        mitigate(str(base), str(adapter), tmp_path / "a", format="adapter")
    out = tmp_path / "out"
    result = mitigate(str(base), str(adapter), out, lam=1.0, k=4, residual_base=str(res_dir) if residual else None)
    assert result.output["format"] == "merged"
    m, o = Checkpoint(merged), Checkpoint(out)
    for name in m.keys():
        assert torch.allclose(o.get(name).double(), m.get(name).double(), atol=1e-5), name


def test_top_singular_value_bound_is_a_close_lower_bound():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    graded = torch.linalg.qr(rand(120, 120))[0] * torch.linspace(1, 3, 120)
    for W in (rand(300, 200), rand(80, 1) @ rand(1, 90), graded):
        s1 = float(torch.linalg.matrix_norm(W, 2))
        assert 0.5 * s1 < res.top_singular_value_bound(W) <= s1 * (1 + 1e-12)
    assert res.top_singular_value_bound(torch.zeros(5, 4)) == 0.0


def test_relabelled_pissa_adapter_warns(tmp_path, one_thread, monkeypatch):
    """PEFT's PiSSA recipe trains an adapter saved with init_lora_weights=True on the residual model:
    its config says plain LoRA. The scan warns and points to --residual-base."""
    residual = tmp_path / "residual"

    def train(pm):
        copy.deepcopy(pm).unload().save_pretrained(residual)
        perturb(pm, scale=0.01)  # training moves the factors a little from their PiSSA init

    base, adapter, merged = build(tmp_path, lora(init_lora_weights="pissa"), train=train)
    relabel_init(adapter, True)
    with pytest.warns(UserWarning, match=r"close to what a PISSA init moves out of W_0.*--residual-base"):
        scan(str(base), str(adapter), k=4)
    assert_matches_oracle(base, adapter, merged, residual_base=str(residual))
    plain = tmp_path / "plain"
    plain.mkdir()
    b, a, _ = build(plain, lora(), train=lambda pm: perturb(pm, scale=0.01))  # ΔW below W_0, as trained
    inits = []
    mutation = res.mutation
    monkeypatch.setattr(res, "mutation", lambda init, *a, **kw: inits.append(init) or mutation(init, *a, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan(str(b), str(a), k=4)
    assert "pissa" not in inits  # a trained LoRA's ΔW is far below σ_1(W_0): no decomposition of W_0
