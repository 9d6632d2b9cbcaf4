"""Examples -> token ids -> padded batches, for classification and causal-LM training and evaluation.

Causal-LM labels follow the transformers convention: ``labels`` equals ``input_ids`` and the model
shifts them internally; positions labelled ``-100`` (padding, prompt tokens) carry no loss.

Batches are padded by transformers' collators on the right: ``DataCollatorWithPadding`` for one label
per example (a class or a score), ``DataCollatorForSeq2Seq`` (labels padded with -100) for per-token labels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from lorascope.data.examples import Example
from lorascope.errors import InputError

IGNORE_INDEX = -100
Feature = dict[str, Any]


def encode_classification(examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[Feature]:
    """Tokenise single sentences or sentence pairs (``longest_first`` truncation to ``max_length``)."""
    if not examples:
        raise InputError("the data set is empty")
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair is not None for e in examples) else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(examples))]
    for f, e in zip(features, examples, strict=True):
        if e.label is not None:
            f["labels"] = e.label
    return features


def encode_text_blocks(examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[Feature]:
    """Plain-text LM data: tokenise each text, append EOS, concatenate and cut into ``max_length``
    blocks (the last, shorter block is kept when it holds at least two tokens)."""
    if not examples:
        raise InputError("the data set is empty")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer([e.text for e in examples])["input_ids"]:
        stream.extend([*ids, *eos])
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks if len(b) > 1]


def encode_prompt_response(examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[Feature]:
    """Prompt/response pairs: ``prompt + response + EOS`` with the prompt labelled ``-100``, so the
    loss is on the response only. Over-long pairs keep the response and cut the prompt from the left."""
    if not examples:
        raise InputError("the data set is empty")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = tokenizer([e.text for e in examples])["input_ids"]
    responses = tokenizer([e.response or "" for e in examples], add_special_tokens=False)["input_ids"]
    features = []
    for p, r in zip(prompts, responses, strict=True):
        r = [*r, *eos][: max_length - 1]
        p = p[-(max_length - len(r)) :]
        ids = [*p, *r]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * len(p) + r})
    return features


def encode(examples: Sequence[Example], objective: str, kind: str, tokenizer: Any, max_length: int) -> list[Feature]:
    """Features for a training objective: ``classify`` / ``regress`` one label per example; ``lm`` token
    blocks of plain text, or prompt/response pairs with the loss on the response."""
    if objective != "lm":
        return encode_classification(examples, tokenizer, max_length)
    if kind == "prompt_response":
        return encode_prompt_response(examples, tokenizer, max_length)
    return encode_text_blocks(examples, tokenizer, max_length)


# ------------------------------------------------------------------------------------------ batches


def fallback_pad_token(tokenizer: Any) -> str | None:
    """The token to pad with when a tokenizer has no pad token: EOS, else UNK."""
    return tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


def padding_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` when it pads on the right with a pad token, else a shallow copy that does (the
    caller's tokenizer is left as it is): batches are always right-padded."""
    if tokenizer.padding_side == "right" and tokenizer.pad_token is not None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)  # a shallow copy shares the special-token map
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = fallback_pad_token(tokenizer)
    return tokenizer


def collator(tokenizer: Any, features: Sequence[Feature]) -> Any:
    """The transformers collator for these features: per-token labels (LM) are padded with -100 by
    ``DataCollatorForSeq2Seq``; inputs with one label per example (or none) by ``DataCollatorWithPadding``.
    ``input_ids`` are padded with the pad token, masks and token types with 0; class labels become a
    long tensor, scores a float one."""
    tokenizer = padding_tokenizer(tokenizer)
    if features and isinstance(features[0].get("labels"), list):
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def make_loader(
    features: Sequence[Feature], batch_size: int, tokenizer: Any, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over features, padded with ``tokenizer``'s pad token; shuffling uses its own seeded
    generator, so the order depends only on ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(features), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collator(tokenizer, features))
