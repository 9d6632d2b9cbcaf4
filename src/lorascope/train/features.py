"""Examples -> token ids -> padded batches, for classification and causal-LM training and evaluation.

Causal-LM labels follow the transformers convention: ``labels`` equals ``input_ids`` and the model
shifts them internally; positions labelled ``-100`` (padding, prompt tokens) carry no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from lorascope.errors import InputError
from lorascope.train.data import Example

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


def collate(features: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into tensors: ``input_ids`` with ``pad_id``, masks and token types
    with 0, per-token labels with -100; scalar labels become a long (class) or float (score) tensor."""
    length = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] + [fill] * (length - len(f[key])) for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            batch["labels"] = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for lab in labels])
        elif isinstance(labels[0], float):
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


def make_loader(
    features: Sequence[Feature], batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over features; shuffling uses its own seeded generator, so the order depends only
    on ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(features), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=lambda fs: collate(fs, pad_id))


def pad_id_of(tokenizer: Any) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0
