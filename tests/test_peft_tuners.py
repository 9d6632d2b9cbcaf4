"""Every PEFT tuner lorascope reads, against the oracle of PEFT's merged weights.

For each tuner: a tiny model, ``get_peft_model``, the adapter's tensors perturbed (many tuners start
as a no-op), ``save_pretrained``; the oracle is ``merge_and_unload()``'s weights, float64 SVDs of W_0
and W_t and Alg. 1 on them. The scan of the saved adapter must agree (max-cos within 1e-4, the same
intruder counts, the same set of changed matrices). Refused tuners must say so by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lorascope import scan
from lorascope.errors import InputError
from lorascope.io.layout import orient

K, EPS = 6, 0.5
TOL = 1e-4


def tiny_llama(hidden=32, intermediate=48, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=32))


def perturb(model, scale=0.1, seed=1):
    """Move every trainable adapter tensor off its (often no-op) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def build(tmp_path, config, model=None, train=perturb, save_kwargs=None):
    """Save base, adapter and merged model; return their paths."""
    from peft import get_peft_model

    model = model if model is not None else tiny_llama()
    model.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config)
        train(pm)
        pm.save_pretrained(tmp_path / "adapter", **(save_kwargs or {}))
        merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"


def oracle(base, merged, names_kinds, k=K, eps=EPS):
    """Alg. 1 on the merged weights: {name: (max_cos list, n_intruders)}, float64 SVDs."""
    from lorascope.io.checkpoint import Checkpoint

    b, m = Checkpoint(base), Checkpoint(merged)
    out = {}
    for name, kind in names_kinds.items():
        W0 = orient(b.get(name), kind).double()
        Wt = orient(m.get(name), kind).double()
        U0 = torch.linalg.svd(W0, full_matrices=False).U
        Ut = torch.linalg.svd(Wt, full_matrices=False).U[:, :k]
        mc = (Ut.T @ U0).abs().max(1).values
        out[name] = (mc.tolist(), int((mc < eps).sum()))
    return out


def changed(base, merged):
    """Names of the weight matrices that merging changed."""
    from lorascope.io.checkpoint import Checkpoint

    b, m = Checkpoint(base), Checkpoint(merged)
    return {n for n in b.keys() if n.endswith(".weight") and len(b.shape(n)) in (2, 4) and n in m
            and not torch.equal(b.get(n), m.get(n))}


def assert_matches_oracle(base, adapter, merged, embeddings=False, **scan_kwargs):
    """The scan equals the oracle on every changed matrix; returns the largest |Δ max-cos|."""
    res = scan(str(base), str(adapter), k=K, epsilon=EPS, dtype="float64", embeddings=embeddings, **scan_kwargs)
    recs = {r.name: r for r in res.matrices}
    want = changed(base, merged)
    if not embeddings:
        want = {n for n in want if "embed" not in n and "wte" not in n and "wpe" not in n}
    assert want, "the perturbed adapter changed nothing: a broken test"
    assert set(recs) == want, (sorted(set(recs) ^ want))
    ref = oracle(base, merged, {n: r.kind for n, r in recs.items()})
    worst = 0.0
    for name, r in recs.items():
        mc, n = ref[name]
        d = max(abs(a - b) for a, b in zip(r.max_cos, mc, strict=True))
        worst = max(worst, d)
        assert d <= TOL, (name, r.max_cos, mc)
        assert r.n_intruders == n, name
    return worst


# -- tuners that PEFT merges: one oracle test each -------------------------------------------------------
def _configs():
    import peft

    T = ["q_proj", "down_proj"]
    return {
        "LORA": peft.LoraConfig(r=4, lora_alpha=8, target_modules=T),
        "LORA-dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_dora=True),
        "LORA-rslora-patterns": peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_rslora=True,
                                                rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3}),
        "LORA-lora_bias": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "dense"], lora_bias=True),
        "ADALORA": peft.AdaLoraConfig(r=4, target_modules=T, total_step=10),
        "LOHA": peft.LoHaConfig(r=4, alpha=8, target_modules=T),
        "LOKR": peft.LoKrConfig(r=4, alpha=8, target_modules=T),
        "OFT": peft.OFTConfig(r=0, oft_block_size=8, target_modules=T),
        "BOFT": peft.BOFTConfig(boft_block_size=4, target_modules=T),
        "IA3": peft.IA3Config(target_modules=T, feedforward_modules=["down_proj"]),
        "VERA": peft.VeraConfig(r=4, target_modules=T),
        "VERA-no-projection": peft.VeraConfig(r=4, target_modules=T, save_projection=False),
        "FOURIERFT": peft.FourierFTConfig(n_frequency=40, target_modules=T),
        "HRA": peft.HRAConfig(r=4, target_modules=T),
        "VBLORA": peft.VBLoRAConfig(r=4, vector_length=8, num_vectors=16, target_modules=T),
        "MISS": peft.MissConfig(r=4, target_modules=T),
        "SHIRA": peft.ShiraConfig(r=4, target_modules=T),
        "RANDLORA": peft.RandLoraConfig(r=4, target_modules=T),
        "C3A": peft.C3AConfig(block_size=8, target_modules=T),
        "ROAD": peft.RoadConfig(group_size=8, target_modules=T),
        "ADAMSS": peft.AdamssConfig(r=4, target_modules=T),
        "DEFT": peft.DeftConfig(r=4, target_modules=T),
        "DELORA": peft.DeloraConfig(r=4, target_modules=T),
        "GLORA": peft.GloraConfig(r=4, target_modules=T),
        "GRALORA": peft.GraloraConfig(r=4, target_modules=T),
        "HIRA": peft.HiraConfig(r=4, target_modules=T),
        "OSF": peft.OSFConfig(target_modules=T),
        "PEANUT": peft.PeanutConfig(r=4, target_modules=T),
        "PSOFT": peft.PsoftConfig(r=4, target_modules=T),
        "PVERA": peft.PveraConfig(r=4, target_modules=T),
        "SUPERTUNING": peft.SupertuningConfig(r=4, target_modules=T),
        "WAVEFT": peft.WaveFTConfig(n_frequency=100, target_modules=T),
        "LORA-kasa": peft.LoraConfig(r=4, target_modules=T, kasa_config=peft.KasaConfig()),
        "LORA-mica": peft.LoraConfig(r=4, target_modules=T, init_lora_weights="mica"),
        "LORA-bdlora": peft.LoraConfig(r=4, target_modules=T, use_bdlora=peft.BdLoraConfig(
            target_modules_bd_a=["q_proj"], target_modules_bd_b=["down_proj"], nblocks=2)),
        "LORA-velora": peft.LoraConfig(r=4, target_modules=T, velora_config=peft.VeloraConfig()),
        "LORA-monteclora": peft.LoraConfig(r=4, target_modules=T, monteclora_config=peft.MontecloraConfig()),
        "LORA-qalora": peft.LoraConfig(r=4, target_modules=T, use_qalora=True, qalora_group_size=8),
    }


CONFIGS = ["LORA", "LORA-dora", "LORA-rslora-patterns", "LORA-lora_bias", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT",
           "IA3", "VERA", "VERA-no-projection", "FOURIERFT", "HRA", "VBLORA", "MISS", "SHIRA", "RANDLORA", "C3A",
           "ROAD", "ADAMSS", "DEFT", "DELORA", "GLORA", "GRALORA", "HIRA", "OSF", "PEANUT", "PSOFT", "PVERA",
           "SUPERTUNING", "WAVEFT", "LORA-kasa", "LORA-mica", "LORA-bdlora", "LORA-velora", "LORA-monteclora",
           "LORA-qalora"]


@pytest.mark.parametrize("name", CONFIGS)
def test_tuner_scan_equals_merged_oracle(tmp_path, one_thread, name):
    model = tiny_bert() if name == "LORA-lora_bias" else None
    base, adapter, merged = build(tmp_path, _configs()[name], model=model)
    worst = assert_matches_oracle(base, adapter, merged)
    print(f"{name}: max |Δ max-cos| = {worst:.2e}")


@pytest.mark.parametrize("name", ["ADAMSS", "GLORA", "IA3", "OFT", "VERA"])
def test_tuner_on_a_base_with_biases(tmp_path, one_thread, name):
    """The module is rebuilt with the base's own bias (AdaMSS factors [W | b]; GLoRA changes b)."""
    cfg = _configs()[name]
    cfg.target_modules = {"query", "dense"}
    if name == "IA3":
        cfg.feedforward_modules = {"dense"}
    base, adapter, merged = build(tmp_path, cfg, model=tiny_bert())
    assert_matches_oracle(base, adapter, merged)


def test_mitigate_refuses_adapters_that_change_biases(tmp_path, one_thread):
    import peft

    from lorascope import mitigate

    cfg = peft.GloraConfig(r=4, target_modules=["query", "dense"])
    base, adapter, _ = build(tmp_path / "glora", cfg, model=tiny_bert())
    with pytest.raises(InputError, match=r"GLORA adapter also changes the biases of \d+ module"):
        mitigate(str(base), str(adapter), tmp_path / "out", k=4)
    assert not (tmp_path / "out").exists()
    cfg = peft.LoraConfig(r=4, target_modules=["query"], lora_bias=True)
    base, adapter, _ = build(tmp_path / "lb", cfg, model=tiny_bert())
    with pytest.raises(InputError, match="lora_bias"):
        mitigate(str(base), str(adapter), tmp_path / "out", k=4, format="merged")
