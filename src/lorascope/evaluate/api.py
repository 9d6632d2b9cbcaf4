"""``evaluate``: one metric on the base and the tuned model, with the relative change between them.

Who is base and who is tuned:

- ``evaluate(RUN)``: tuned = the run, base = the model the run started from;
- ``evaluate(BASE, adapter=RUN_OR_ADAPTER)``: base = ``BASE`` (a checkpoint or an earlier run, e.g. in
  continual learning), tuned = ``BASE`` with the adapter (or the full run given as adapter);
- ``evaluate(CHECKPOINT)``: the base value only.

Heads. A metric needs a head the tuned backbone may not have: accuracy the task's classifier,
pseudo-loss the pretrained MLM head, lm-loss the pretrained LM head. Each side uses its own head when it
has the right one; otherwise its backbone is moved under the other side's classifier, or under the
pretraining head of the root checkpoint (:func:`lorascope.train.runs.transplant`). So an untuned base
is scored with the tuned run's classifier, and a classifier-tuned RoBERTa with RoBERTa's own MLM head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from lorascope.errors import InputError
from lorascope.evaluate.metrics import (
    lm_loss,
    predict,
    pseudo_loss,
    relative_change,
    representation_drift,
    sts_spearman,
    task_score,
)
from lorascope.train.data import TaskData, load_corpus, load_corpus_text, load_task, read_stsb, subsample
from lorascope.train.features import encode_classification, pad_id_of
from lorascope.train.recipes import resolve_device
from lorascope.train.runs import (
    is_run,
    load_pretrained,
    load_trained,
    read_run,
    require_decoder,
    resolve_model_path,
    root_model,
    transplant,
)

METRICS = ("accuracy", "pseudo-loss", "lm-loss", "sts", "drift")
HIGHER_IS_BETTER = {"accuracy": True, "pseudo-loss": False, "lm-loss": False, "sts": True, "drift": False}
DEFAULT_MAX_EXAMPLES = {"pseudo-loss": 256, "drift": 512}
PRETRAINING_HEADS = {"mlm": (AutoModelForMaskedLM, "masked-LM"), "lm": (AutoModelForCausalLM, "causal-LM")}


@dataclass
class Side:
    """One of the two models compared."""

    name: str  # "base" or "tuned"
    ref: str  # the folder or id it was loaded from
    model: torch.nn.Module
    tokenizer: Any
    record: dict[str, Any] | None  # its run record, when it is a run


def load_sides(
    model: str, adapter: str | None, device: torch.device, trust_remote_code: bool = False
) -> tuple[Side, Side | None]:
    """Load the base and (when there is one) the tuned model."""
    tuned = None
    if adapter is not None or is_run(model):
        tuned_ref = str(adapter) if adapter is not None else str(model)
        m, tok = load_trained(model, adapter, device=device, trust_remote_code=trust_remote_code)
        tuned = Side("tuned", tuned_ref, m, tok, read_run(tuned_ref) if is_run(tuned_ref) else None)
        base_ref = str(model) if adapter is not None else read_run(model)["model"]
    else:
        base_ref = str(model)
    m, tok = load_trained(base_ref, device=device, trust_remote_code=trust_remote_code)
    base = Side("base", base_ref, m, tok, read_run(base_ref) if is_run(base_ref) else None)
    return base, tuned


def _head_match(side: Side, task: TaskData) -> int:
    """2: the side was trained on this task; 1: on a task with the same labels; 0: no usable head."""
    record = side.record
    if record is None or record["objective"] not in ("classify", "regress"):
        return 0
    same_kind = (record["objective"] == "regress") == (task.kind == "regression")
    if not same_kind or record["task"]["labels"] != task.labels:
        return 0
    return 2 if record["task"]["name"] == task.name else 1


def _with_classifier(side: Side, other: Side | None, task: TaskData) -> torch.nn.Module:
    own = _head_match(side, task)
    theirs = _head_match(other, task) if other is not None else 0
    if own and own >= theirs:
        return side.model
    if theirs:
        return transplant(other.model, side.model)
    raise InputError(f"no classifier head trained for task {task.name!r} (labels {task.labels}) in "
                     f"{side.ref}{' or ' + other.ref if other else ''}")


def _with_pretraining_head(side: Side, kind: str, root: str, device: torch.device,
                           trust_remote_code: bool, cache: dict) -> torch.nn.Module:
    """The side's model if it already has the MLM / causal-LM head, else its backbone under the root
    checkpoint's pretrained head."""
    base = side.model.get_base_model() if hasattr(side.model, "get_base_model") else side.model
    name = type(base).__name__
    suffixes = ("ForMaskedLM",) if kind == "mlm" else ("ForCausalLM", "LMHeadModel")
    if name.endswith(suffixes):
        return side.model
    if kind not in cache:
        cls, what = PRETRAINING_HEADS[kind]
        try:
            head = load_pretrained(cls, resolve_model_path(root), require_head=what,
                                   trust_remote_code=trust_remote_code)
        except ValueError as e:  # transformers: no such head class for this architecture
            raise InputError(f"{root} has no {what} head: {e}") from e
        if kind == "lm":
            require_decoder(head, root)
        cache[kind] = head.to(device).eval()
    return transplant(cache[kind], side.model)


def evaluate(
    model: str,
    adapter: str | None = None,
    metric: str = "accuracy",
    data: str | None = None,
    *,
    max_examples: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    stride: int | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute ``metric`` for the base and the tuned model.

    ``data``: accuracy - a task (default: the tuned run's task), scored on its test split; pseudo-loss,
    drift - a corpus (default WikiText-2 test paragraphs; first ``max_examples``, default 256 / 512);
    lm-loss - a corpus (default the raw WikiText-2 test set); sts - ``stsb`` (test split) or a file with
    text, text_pair and label (score) columns.

    Returns ``{metric, base, tuned, change, change_pct, higher_is_better, n, data, ...}`` where
    change = tuned - base and change_pct = 100 (tuned - base) / |base| (None when undefined).
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {METRICS}")
    start = time.perf_counter()
    dev = resolve_device(device)
    base, tuned = load_sides(model, adapter, dev, trust_remote_code)
    tokenizer = (tuned or base).tokenizer
    sides = [s for s in (base, tuned) if s is not None]
    root = root_model(base.ref)
    kw = {"batch_size": batch_size, "device": dev, "progress": progress}
    limit = max_examples if max_examples is not None else DEFAULT_MAX_EXAMPLES.get(metric)
    details: dict[str, Any] = {}

    if metric == "accuracy":
        task_name = data or _record_task(tuned or base)
        task = load_task(task_name)
        test = subsample(task.test, limit)
        length = max_length or _record_max_length(tuned or base)
        features = encode_classification(test, tokenizer, length)
        labels = [e.label for e in test]
        values = []
        for side in sides:
            scorer = _with_classifier(side, tuned if side is base else base, task)
            logits = predict(scorer, features, pad_id_of(tokenizer), batch_size, dev, progress)
            name, value = task_score(logits, labels, task.kind)
            values.append(value)
        details["score"] = name
        data_name, n = task.name, len(test)
    elif metric == "pseudo-loss":
        texts = subsample_texts(load_corpus(data), limit)
        cache: dict = {}
        values = []
        for s in sides:
            mlm = _with_pretraining_head(s, "mlm", root, dev, trust_remote_code, cache)
            values.append(pseudo_loss(mlm, tokenizer, texts, max_length=max_length or 128, **kw))
        data_name, n = data or "wikitext2", len(texts)
    elif metric == "lm-loss":
        text = "\n\n".join(subsample_texts(load_corpus(data), limit)) if limit else load_corpus_text(data)
        cache = {}
        values = []
        for s in sides:
            lm = _with_pretraining_head(s, "lm", root, dev, trust_remote_code, cache)
            loss, ppl, n = lm_loss(lm, tokenizer, text, max_length, stride, **kw)
            values.append(loss)
            details.setdefault("perplexity", []).append(ppl)
        details["perplexity"] = dict(zip(("base", "tuned"), details["perplexity"], strict=False))
        data_name = data or "wikitext2"
    elif metric == "sts":
        pairs, gold = _sts_data(data, limit)
        length = max_length or 128
        values = [sts_spearman(s.model, tokenizer, pairs, gold, max_length=length, **kw) for s in sides]
        data_name, n = data or "stsb", len(pairs)
    else:  # drift
        texts = subsample_texts(load_corpus(data), limit)
        values = [0.0]
        if tuned is not None:
            values.append(representation_drift(base.model, tuned.model, tokenizer, texts,
                                               max_length=max_length or 128, **kw))
        details["definition"] = "1 - linear CKA(base, tuned) of mean-pooled last hidden states"
        data_name, n = data or "wikitext2", len(texts)

    base_value = values[0]
    tuned_value = values[1] if len(values) > 1 else None
    return {
        "metric": metric,
        "base": base_value,
        "tuned": tuned_value,
        "change": None if tuned_value is None else tuned_value - base_value,
        "change_pct": None if tuned_value is None else relative_change(base_value, tuned_value),
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "n": n,
        "data": data_name,
        "base_model": base.ref,
        "tuned_model": tuned.ref if tuned else None,
        "details": details,
        "seconds": time.perf_counter() - start,
    }


def subsample_texts(texts: list[str], n: int | None) -> list[str]:
    """The first ``n`` texts (corpora keep their order, so the sample is contiguous and stable)."""
    return texts if n is None else texts[:n]


def _record_task(side: Side) -> str:
    if side.record is None:
        raise InputError("accuracy needs a task: pass data=TASK (or evaluate a run)")
    return side.record["config"]["task"]


def _record_max_length(side: Side) -> int:
    return int(side.record["config"]["max_length"]) if side.record else 128


def _sts_data(data: str | None, limit: int | None) -> tuple[list[tuple[str, str]], list[float]]:
    if data is None or data.lower() in ("stsb", "sts-b"):
        examples = read_stsb("test")
    else:
        task = load_task(data)
        if task.kind != "regression" or any(e.text_pair is None for e in task.test + task.train):
            raise InputError(f"{data}: sts needs sentence pairs with a numeric score "
                             "(columns text, text_pair, label)")
        examples = task.train + task.test
    examples = examples[:limit] if limit else examples
    return [(e.text, e.text_pair) for e in examples], [float(e.label) for e in examples]
