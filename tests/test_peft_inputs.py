"""PEFT adapters that are broken or of a kind lorascope does not read: each an InputError naming the
file and the field, module or tuner; never a scan with PEFT's fresh initialisation standing in.
Plus layouts through PEFT's merge (Conv1D, Conv2d, embeddings), trainable tokens, run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_peft_tuners import assert_matches_oracle, build, tiny_gpt2, tiny_llama

from lorascope import mitigate, scan
from lorascope.errors import InputError
from lorascope.io.tuned.peft import REFUSED

T = ["q_proj", "down_proj"]


@pytest.fixture
def lora_pair(tmp_path):
    from peft import LoraConfig

    base, adapter, _ = build(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=T))
    return base, adapter


def edit_weights(adapter, fn):
    f = adapter / "adapter_model.safetensors"
    w = load_file(f)
    fn(w)
    save_file(w, f)
    return str(f)


def edit_config(adapter, fn):
    f = adapter / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg = fn(cfg) or cfg
    f.write_text(json.dumps(cfg))
    return str(f)


# -- broken LoRA factors ------------------------------------------------------------------------------
def test_missing_lora_B_everywhere_is_an_error(tmp_path, lora_pair):
    base, adapter = lora_pair
    f = edit_weights(adapter, lambda w: [w.pop(k) for k in [k for k in w if "lora_B" in k]])
    with pytest.raises(InputError, match=rf"{f}: module '.*' has no lora_B weight"):
        scan(str(base), str(adapter))
    with pytest.raises(InputError, match="has no lora_B weight"):
        mitigate(str(base), str(adapter), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_lora_B_of_one_module_names_it(lora_pair):
    base, adapter = lora_pair
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    edit_weights(adapter, lambda w: w.pop(key))
    with pytest.raises(InputError, match=r"module 'model\.layers\.1\.mlp\.down_proj' has no lora_B"):
        scan(str(base), str(adapter))


def test_missing_lora_A_names_it(lora_pair):
    base, adapter = lora_pair
    edit_weights(adapter, lambda w: w.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"))
    with pytest.raises(InputError, match=r"'model\.layers\.0\.self_attn\.q_proj' has no lora_A"):
        scan(str(base), str(adapter))


def test_zero_rank_and_mismatched_factors(lora_pair):
    base, adapter = lora_pair
    qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    qb = qa.replace("lora_A", "lora_B")
    original = load_file(adapter / "adapter_model.safetensors")

    def zero(w):
        w[qa], w[qb] = torch.zeros(0, 32), torch.zeros(32, 0)
    f = edit_weights(adapter, zero)
    with pytest.raises(InputError, match=rf"{f}: module 'model\.layers\.0\.self_attn\.q_proj' has rank-0"):
        scan(str(base), str(adapter))

    def mismatch(w):
        w.update(original)
        w[qb] = torch.randn(32, 3)
    edit_weights(adapter, mismatch)
    with pytest.raises(InputError, match=r"factors of 'model\.layers\.0\.self_attn\.q_proj' do not fit: lora_A has "
                                         r"rank 4 .* lora_B has 3"):
        scan(str(base), str(adapter))

    def both_rank_3(w):
        w.update(original)
        w[qa], w[qb] = torch.randn(3, 32), torch.randn(32, 3)
    edit_weights(adapter, both_rank_3)
    with pytest.raises(InputError, match=r"rank 3 but .*adapter_config.json says r=4"):
        scan(str(base), str(adapter))


def test_peft_path_missing_tensor_is_an_error(tmp_path):
    from peft import LoHaConfig

    base, adapter, _ = build(tmp_path, LoHaConfig(r=4, alpha=8, target_modules=T))
    key = "base_model.model.model.layers.0.mlp.down_proj.hada_w2_b"
    f = edit_weights(adapter, lambda w: w.pop(key))
    with pytest.raises(InputError, match=rf"{f}: module 'model\.layers\.0\.mlp\.down_proj' lacks tensor .*hada_w2_b"):
        scan(str(base), str(adapter))


# -- broken adapter_config.json ----------------------------------------------------------------------
@pytest.mark.parametrize("case,match", [
    ("missing", r"adapter_config\.json: missing"),
    ("not json", r"adapter_config\.json: not valid JSON \(.* line 1"),
    ("list", r"adapter_config\.json: expected a JSON object .* found a JSON list"),
    ("alpha string", r"adapter_config\.json: field 'lora_alpha' must be a number, got '16' \(string\)"),
    ("r zero", r"adapter_config\.json: field 'r' must be a whole number of at least 1, got 0"),
    ("r float", r"field 'r' must be a whole number"),
    ("unknown type", r"adapter_config\.json: field 'peft_type' is 'FANCY_LORA', a tuner that PEFT .* does not know"),
    ("no type", r"adapter_config\.json: field 'peft_type' is missing"),
    ("rslora string", r"field 'use_rslora' must be true or false"),
    ("pattern", r"field 'alpha_pattern' maps 'q_proj' to 'x'"),
    ("init", r"field 'init_lora_weights' must be"),
])
def test_bad_config_names_file_and_field(lora_pair, case, match):
    base, adapter = lora_pair
    f = adapter / "adapter_config.json"
    cfg = json.loads(f.read_text())
    if case == "missing":
        f.unlink()
    elif case == "not json":
        f.write_text("{not json")
    elif case == "list":
        f.write_text(json.dumps([cfg]))
    else:
        edits = {"alpha string": ("lora_alpha", "16"), "r zero": ("r", 0), "r float": ("r", 4.0),
                 "unknown type": ("peft_type", "FANCY_LORA"), "rslora string": ("use_rslora", "yes"),
                 "pattern": ("alpha_pattern", {"q_proj": "x"}), "init": ("init_lora_weights", 3)}
        if case == "no type":
            cfg.pop("peft_type")
        else:
            key, value = edits[case]
            cfg[key] = value
        f.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=match):
        scan(str(base), str(adapter))


def test_cli_exit_code_2_for_a_broken_adapter(lora_pair):
    base, adapter = lora_pair
    edit_config(adapter, lambda c: c.update(lora_alpha="16"))
    out = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(adapter)], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2 and "lora_alpha" in out.stderr and "adapter_config.json" in out.stderr


# -- refused tuners --------------------------------------------------------------------------------
def _refused_configs():
    import peft

    p = {"num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}
    return {
        "PROMPT_TUNING": peft.PromptTuningConfig(**p),
        "MULTITASK_PROMPT_TUNING": peft.MultitaskPromptTuningConfig(**p),
        "P_TUNING": peft.PromptEncoderConfig(**p),
        "PREFIX_TUNING": peft.PrefixTuningConfig(**p),
        "CPT": peft.CPTConfig(**p),
        "CARTRIDGE": peft.CartridgeConfig(**p),
        "ADAPTION_PROMPT": peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"),
        "LN_TUNING": peft.LNTuningConfig(target_modules=["input_layernorm"]),
        "BEFT": peft.BeftConfig(target_modules=T),
        "POLY": peft.PolyConfig(r=4, target_modules=T),
        "LILY": peft.LilyConfig(r=4, target_modules=T),
        "SHADOW": peft.ShadowConfig(target_modules=T),
        "FROD": peft.FrodConfig(target_modules=T),
        "TINYLORA": peft.TinyLoraConfig(r=4, target_modules=T),
        "UNILORA": peft.UniLoraConfig(r=4, target_modules=T),
    }


@pytest.mark.parametrize("tuner", sorted(REFUSED))
def test_refused_tuners_say_so_by_name(tmp_path, tuner):
    from peft import get_peft_model

    configs = _refused_configs()
    adapter = tmp_path / "adapter"
    tiny_llama().save_pretrained(tmp_path / "base")
    if tuner in configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(tiny_llama(), configs[tuner]).save_pretrained(adapter)
    else:  # X-LoRA needs trained LoRA experts to build: its config is enough to refuse it
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": tuner}))
        save_file({"base_model.model.x.weight": torch.zeros(1)}, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match=rf"PEFT tuner {tuner} is not supported because"):
        scan(str(tmp_path / "base"), str(adapter))


@pytest.mark.parametrize("key,value,word", [
    ("target_parameters", ["mlp.experts.gate_up_proj"], "MoE"),
    ("layer_replication", [[0, 2], [1, 2]], "copies of base layers"),
    ("alora_invocation_tokens", [1, 2], "aLoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow"),
])
def test_refused_lora_options_say_so_by_name(lora_pair, key, value, word):
    base, adapter = lora_pair
    edit_config(adapter, lambda c: c.update({key: value}))
    with pytest.raises(InputError, match=rf"PEFT tuner LORA with '{key}' is not supported because .*{word}"):
        scan(str(base), str(adapter))


def test_lora_variant_list_covers_peft():
    """Every LoraConfig field PEFT marks as a variant is read through PEFT's merge (or refused)."""
    from peft import LoraConfig

    from lorascope.io.tuned.peft import _LORA_REFUSED, _LORA_VARIANTS

    marked = {f for f, v in LoraConfig.__dataclass_fields__.items() if v.metadata.get("is_lora_variant")}
    assert marked <= set(_LORA_VARIANTS) | set(_LORA_REFUSED)


# -- layouts and tokens through PEFT's merge -----------------------------------------------------------
def test_conv1d_through_peft_merge(tmp_path, one_thread):
    from peft import LoraConfig, VeraConfig

    base, adapter, merged = build(tmp_path / "dora", LoraConfig(r=4, use_dora=True, fan_in_fan_out=True,
                                                                target_modules=["c_attn", "c_fc"]), model=tiny_gpt2())
    assert_matches_oracle(base, adapter, merged)
    base, adapter, merged = build(tmp_path / "vera", VeraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                                fan_in_fan_out=True), model=tiny_gpt2())
    assert_matches_oracle(base, adapter, merged)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("tuner", ["lora", "dora", "loha", "lokr"])
def test_conv2d_adapters(tmp_path, one_thread, tuner):
    import peft
    from peft import get_peft_model
    from test_peft_tuners import perturb

    torch.manual_seed(0)
    net = Net()
    for d in ("base", "merged"):
        (tmp_path / d).mkdir()
    save_file(net.state_dict(), tmp_path / "base" / "model.safetensors")
    cfg = {"lora": peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "fc"]),
           "dora": peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "fc"], use_dora=True),
           "loha": peft.LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"]),
           "lokr": peft.LoKrConfig(r=3, alpha=6, target_modules=["conv", "fc"])}[tuner]
    pm = get_peft_model(net, cfg)
    perturb(pm)
    pm.save_pretrained(tmp_path / "adapter")
    save_file(pm.merge_and_unload().state_dict(), tmp_path / "merged" / "model.safetensors")
    res = scan(str(tmp_path / "base"), str(tmp_path / "adapter"), k=3)
    assert {r.name: r.kind for r in res.matrices} == {"conv.weight": "conv2d", "fc.weight": "linear"}
    assert_matches_oracle(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")


def test_embedding_through_peft_merge(tmp_path, one_thread):
    from peft import LoraConfig

    base, adapter, merged = build(tmp_path, LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                       target_modules=["embed_tokens", "q_proj"]))
    assert_matches_oracle(base, adapter, merged, embeddings=True)


def test_trainable_tokens(tmp_path, one_thread):
    from peft import LoraConfig, TrainableTokensConfig

    base, adapter, merged = build(tmp_path / "lora", LoraConfig(r=4, lora_alpha=8, target_modules=T,
                                                                trainable_token_indices=[1, 5, 7]))
    assert_matches_oracle(base, adapter, merged, embeddings=True)
    # mitigate writes it merged (token rows are no LoRA factors); λ = 1 reproduces PEFT's merge
    from lorascope.io.checkpoint import Checkpoint

    result = mitigate(str(base), str(adapter), tmp_path / "out", lam=1.0, k=4, embeddings=True)
    assert result.output["format"] == "merged"
    m, o = Checkpoint(merged), Checkpoint(tmp_path / "out")
    assert all(torch.allclose(o.get(n), m.get(n), atol=1e-6) for n in m.keys())
    base, adapter, merged = build(tmp_path / "tt", TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                         token_indices=[0, 3]))
    assert_matches_oracle(base, adapter, merged, embeddings=True)


def test_lora_bias_is_reported_not_scanned(tmp_path):
    from peft import LoraConfig
    from test_peft_tuners import tiny_bert

    base, adapter, _ = build(tmp_path, LoraConfig(r=4, target_modules=["query"], lora_bias=True), model=tiny_bert())
    res = scan(str(base), str(adapter), k=4)
    assert res.settings["tuned_kind"] == "lora"
    assert all(k.endswith("lora_B.bias") for k in res.unpaired["not_in_base"]) and res.unpaired["not_in_base"]


# -- `lorascope train` run folders -----------------------------------------------------------------------
def test_run_folder_stands_for_its_adapter_or_model(tmp_path, lora_pair):
    import shutil

    base, adapter = lora_pair
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    shutil.copytree(adapter, run / "adapter")
    (run / "tokenizer").mkdir()
    (run / "run.json").write_text(json.dumps({"method": "lora", "layout": {"adapter": "adapter", "model": None,
                                                                           "tokenizer": "tokenizer"}}))
    direct = scan(str(base), str(adapter), k=4)
    via_run = scan(str(base), str(run), k=4)
    assert [r.max_cos for r in via_run.matrices] == [r.max_cos for r in direct.matrices]
    assert via_run.settings["tuned_kind"] == "lora"
    # a full fine-tune run: model/ (run.json unreadable: the folder names are enough)
    full = tmp_path / "runs" / "full"
    full.mkdir()
    shutil.copytree(base, full / "model")
    (full / "run.json").write_text("{broken")
    res = scan(str(base), str(full), k=4)
    assert res.settings["tuned_kind"] == "full" and res.summary()["sides"]["left"]["n_intruders"] == 0
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    (empty / "run.json").write_text("{}")
    with pytest.raises(InputError, match="run folder .*without its adapter/ or model/"):
        scan(str(base), str(empty))
    out = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(run), "--k", "4"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr


def test_summary_k_above_the_scans_k_is_an_error(lora_pair):
    from lorascope.schema import ScanResult, summarize

    base, adapter = lora_pair
    res = scan(str(base), str(adapter), k=4)
    assert res.summary(k=2)["k"] == 2 and res.summary(k=4) == res.summary()
    for bad in (5, 0, 2.5):
        with pytest.raises(InputError, match=r"k=5 exceeds the scan's k=4" if bad == 5 else "k must be"):
            res.summary(k=bad)
    with pytest.raises(InputError, match="k=6 exceeds the scan's k=4"):
        summarize(res.matrices, 0.5, 6)
    loaded = ScanResult.from_dict(res.to_dict())
    with pytest.raises(InputError, match="exceeds"):
        loaded.summary(0.3, 10)
