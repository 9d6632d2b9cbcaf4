"""The metrics ``evaluate`` computes: one function each, plus one line in :data:`METRICS`.

A metric function takes a :class:`Context` (both sides, the data argument, the limits) and returns a
:class:`Measured`: one value per side (base first), how many examples or tokens were scored, which data
was used, and free-form details. Formulas are in :mod:`lorascope.evaluate.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lorascope.data import Example, load_corpus, load_corpus_text, load_task, read_stsb, subsample
from lorascope.data.features import encode_classification
from lorascope.errors import InputError
from lorascope.evaluate.metrics import (
    LM_KINDS,
    lm_loss,
    predict,
    pseudo_loss,
    representation_drift,
    score_examples,
    sts_spearman,
    task_score,
)
from lorascope.evaluate.sides import Side, with_classifier, with_pretraining_head


@dataclass
class Context:
    """What every metric gets: the sides, the user's ``data``, the limits and the device."""

    base: Side
    tuned: Side | None
    data: str | None
    limit: int | None  # max examples / texts (the metric's default when the user gave none)
    max_length: int | None
    stride: int | None
    batch_size: int
    device: torch.device
    root: str  # the pretrained checkpoint at the start of the base's chain of runs
    trust_remote_code: bool = False
    progress: bool = True
    score_base: bool = True  # False: the caller has the base's value; only the tuned side is scored

    @property
    def sides(self) -> list[Side]:
        """The sides scored, base first."""
        if not self.score_base and self.tuned is not None:
            return [self.tuned]
        return [s for s in (self.base, self.tuned) if s is not None]

    @property
    def tokenizer(self) -> Any:
        return (self.tuned or self.base).tokenizer

    @property
    def loop(self) -> dict[str, Any]:
        """Keyword arguments of the batched metric functions."""
        return {"batch_size": self.batch_size, "device": self.device, "progress": self.progress}


@dataclass
class Measured:
    values: list[float]  # one per scored side (Context.sides): base, then tuned
    n: int
    data: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    compute: Callable[[Context], Measured]
    higher_is_better: bool
    max_examples: int | None = None  # default limit when the user gives none


def first_texts(texts: list[str], n: int | None) -> list[str]:
    """The first ``n`` texts (corpora keep their order, so the sample is contiguous and stable)."""
    return texts if n is None else texts[:n]


def accuracy(ctx: Context) -> Measured:
    """Test-split accuracy (Spearman for regression) of each side, with a classifier for the task; on a
    decoder task (prompt/response, text) each side's causal LM scored directly (exact match, LM loss)."""
    own = ctx.tuned or ctx.base
    if ctx.data is None and own.record is None:
        raise InputError("accuracy needs a task: pass data=TASK (or evaluate a run)")
    task = load_task(ctx.data or own.record["config"]["task"])
    test = subsample(task.test, ctx.limit)
    length = ctx.max_length or (int(own.record["config"]["max_length"]) if own.record else 128)
    if task.kind in LM_KINDS:
        cache: dict = {}
        scored = [score_examples(with_pretraining_head(s, "lm", ctx.root, ctx.device, ctx.trust_remote_code, cache),
                                 ctx.tokenizer, test, task.kind, length, ctx.batch_size, ctx.device) for s in ctx.sides]
        return Measured([v for _, v in scored], len(test), task.name, {"score": scored[0][0]})
    features = encode_classification(test, ctx.tokenizer, length)
    labels = [e.label for e in test]
    values = []
    for side in ctx.sides:
        scorer = with_classifier(side, ctx.tuned if side is ctx.base else ctx.base, task)
        logits = predict(scorer, features, ctx.tokenizer, ctx.batch_size, ctx.device, ctx.progress)
        name, value = task_score(logits, labels, task.kind)
        values.append(value)
    return Measured(values, len(test), task.name, {"score": name})


def pseudo_loss_metric(ctx: Context) -> Measured:
    """Per-token pseudo-loss on generic text, each side under a masked-LM head."""
    texts = first_texts(load_corpus(ctx.data), ctx.limit)
    cache: dict = {}
    values = []
    for side in ctx.sides:
        mlm = with_pretraining_head(side, "mlm", ctx.root, ctx.device, ctx.trust_remote_code, cache)
        values.append(pseudo_loss(mlm, ctx.tokenizer, texts, max_length=ctx.max_length or 128, **ctx.loop))
    return Measured(values, len(texts), ctx.data or "wikitext2")


def lm_loss_metric(ctx: Context) -> Measured:
    """Per-token causal-LM loss (and perplexity) on generic text, each side under an LM head."""
    if ctx.limit:
        text = "\n\n".join(first_texts(load_corpus(ctx.data), ctx.limit))
    else:
        text = load_corpus_text(ctx.data)
    cache: dict = {}
    values, perplexity = [], []
    for side in ctx.sides:
        lm = with_pretraining_head(side, "lm", ctx.root, ctx.device, ctx.trust_remote_code, cache)
        loss, ppl, n = lm_loss(lm, ctx.tokenizer, text, ctx.max_length, ctx.stride, **ctx.loop)
        values.append(loss)
        perplexity.append(ppl)
    details = {"perplexity": dict(zip((s.name for s in ctx.sides), perplexity, strict=True))}
    return Measured(values, n, ctx.data or "wikitext2", details)


def _sts_examples(data: str | None, limit: int | None) -> list[Example]:
    if data is None or data.lower() in ("stsb", "sts-b"):
        examples = read_stsb("test")
    else:
        task = load_task(data)
        if task.kind != "regression" or any(e.text_pair is None for e in task.test + task.train):
            raise InputError(f"{data}: sts needs sentence pairs with a numeric score "
                             "(columns text, text_pair, label)")
        examples = task.train + task.test
    return examples[:limit] if limit else examples


def sts(ctx: Context) -> Measured:
    """Spearman's rho between embedding cosines and gold similarity (STS-B test, or a pair file)."""
    examples = _sts_examples(ctx.data, ctx.limit)
    pairs, gold = [(e.text, e.text_pair) for e in examples], [float(e.label) for e in examples]
    values = [sts_spearman(s.model, ctx.tokenizer, pairs, gold, max_length=ctx.max_length or 128, **ctx.loop)
              for s in ctx.sides]
    return Measured(values, len(pairs), ctx.data or "stsb")


def drift(ctx: Context) -> Measured:
    """1 - linear CKA of the two sides' sentence embeddings (0 for the base against itself)."""
    texts = first_texts(load_corpus(ctx.data), ctx.limit)
    values = [0.0 if side is ctx.base else
              representation_drift(ctx.base.model, side.model, ctx.tokenizer, texts,
                                   max_length=ctx.max_length or 128, **ctx.loop) for side in ctx.sides]
    details = {"definition": "1 - linear CKA(base, tuned) of mean-pooled last hidden states"}
    return Measured(values, len(texts), ctx.data or "wikitext2", details)


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy, higher_is_better=True),
    "pseudo-loss": Metric(pseudo_loss_metric, higher_is_better=False, max_examples=256),
    "lm-loss": Metric(lm_loss_metric, higher_is_better=False),
    "sts": Metric(sts, higher_is_better=True),
    "drift": Metric(drift, higher_is_better=False, max_examples=512),
}
