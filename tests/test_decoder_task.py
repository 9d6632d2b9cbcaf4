"""The decoder track's pieces: the generated arithmetic task, exact match, GGUF sources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lorascope.data import load_task
from lorascope.data.arithmetic import arithmetic_problems
from lorascope.data.features import IGNORE_INDEX, encode_prompt_response
from lorascope.evaluate.metrics import causal_lm_scores, causal_lm_token_nll
from lorascope.experiments.config import default_forgetting_metrics
from lorascope.models import hf_source
from lorascope.train.tiny import tiny_model, tiny_tokenizer

OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


def test_arithmetic_answers_are_right_and_splits_disjoint():
    train, test = arithmetic_problems(2000, 300, seed=3)
    assert (train, test) == arithmetic_problems(2000, 300, seed=3)  # seeded: the same everywhere
    assert not {p for p, _ in train} & {p for p, _ in test}
    for prompt, response in train + test:
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", response)
        assert steps
        for a, op, b, c in steps:
            assert OPS[op](int(a), int(b)) == int(c)
            if op == "/":
                assert int(a) % int(b) == 0
        assert response.endswith(f"The answer is {steps[-1][3]}.")
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        assert int(steps[0][0]) in numbers  # the worked line starts from the question's numbers


def test_arithmetic_is_a_builtin_prompt_response_task():
    task = load_task("arithmetic")
    assert task.kind == "prompt_response" and (len(task.train), len(task.test)) == (5000, 500)
    assert task.test[0].response.startswith(" ")


def test_exact_match_is_greedy_decoding_of_the_whole_response():
    torch.manual_seed(0)
    model, tok = tiny_model("llama").eval(), tiny_tokenizer("llama")
    examples = load_task("arithmetic").test[:6]
    features = encode_prompt_response(examples, tok, 96)
    # Make the first three responses exactly what greedy decoding writes, so they must match.
    for f in features[:3]:
        ids, labels = f["input_ids"], f["labels"]
        start = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        for t in range(start, len(ids)):
            with torch.no_grad():
                ids[t] = int(model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].argmax())
            labels[t] = ids[t]
    expected = 0
    for f in features:  # reference: one example at a time, position by position
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        scored = [t for t, x in enumerate(f["labels"]) if x != IGNORE_INDEX]
        expected += all(int(logits[t - 1].argmax()) == f["labels"][t] for t in scored)
    nll, n, exact = causal_lm_scores(model, features, tok, batch_size=4)
    assert exact == expected >= 3
    assert (nll, n) == pytest.approx(causal_lm_token_nll(model, features, tok, batch_size=4))


def test_gguf_files_load_through_gguf_file(tmp_path: Path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    assert hf_source(f) == (str(tmp_path), {"gguf_file": "m.Q4_1.gguf"})
    assert hf_source(tmp_path) == (str(tmp_path), {})
    assert hf_source("org/name") == ("org/name", {})
    assert default_forgetting_metrics(str(f)) == ["lm-loss"]
