"""Tiny random checkpoints (BERT with an MLM head, Llama, GPT-2) for tests and smoke runs.

They are built from configs in code with a word-level tokenizer over a small fixed vocabulary, so no
download is needed. Weights are random but seeded: the same call gives the same checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a an this that it is was be are and or but not very so too of to in on for with at by from as "
    "movie film story plot actor actors scene scenes music ending script cast director time people "
    "good great fine nice fun best wonderful excellent brilliant lovely moving charming delightful "
    "bad awful poor worst boring dull terrible horrible weak messy tedious painful bland "
    "i you he she we they my your his her our their one two three some many all no more most "
    "love like hate enjoy watch see make made feel felt think thought seem seems look looks "
    "world sports business science news team game market company report day year city country "
    "long new . , ! ? ' \""
).split()
ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
KINDS = ("bert", "llama", "gpt2")


def tiny_tokenizer(kind: str = "bert") -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over :data:`WORDS`. ``bert`` adds ``[CLS] a [SEP] b [SEP]``
    with token types; the decoders (``llama``, ``gpt2``) prepend ``<s>`` and use ``</s>`` as EOS."""
    encoder = kind == "bert"
    specials = ENCODER_SPECIALS if encoder else DECODER_SPECIALS
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=128,
    )


def tiny_model(kind: str = "bert", seed: int = 0, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    """A seeded random model with a pretraining head: BertForMaskedLM, LlamaForCausalLM or
    GPT2LMHeadModel, with the vocabulary of :func:`tiny_tokenizer`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    tok = tiny_tokenizer(kind)
    common = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=2 * hidden, max_position_embeddings=128, **common)
        return BertForMaskedLM(config)
    if kind == "llama":
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             tie_word_embeddings=False, **common)
        return LlamaForCausalLM(config)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **common)
    return GPT2LMHeadModel(config)


def save_tiny_model(out: str | os.PathLike, kind: str = "bert", seed: int = 0, **kw: int) -> Path:
    """Write a tiny checkpoint (safetensors + config + tokenizer) to ``out`` and return the path."""
    out = Path(out)
    tiny_model(kind, seed, **kw).save_pretrained(out)
    tiny_tokenizer(kind).save_pretrained(out)
    return out


POSITIVE = ("good", "great", "fine", "nice", "fun", "best", "wonderful", "excellent")
NEGATIVE = ("bad", "awful", "poor", "worst", "boring", "dull", "terrible", "horrible")


def write_toy_sentiment(path: str | os.PathLike, n: int = 200, seed: int = 0) -> Path:
    """A balanced toy sentiment TSV (``text<TAB>label``, labels negative/positive) in the tiny vocabulary:
    one sentiment word decides the label, so a tiny model can learn it in a few epochs."""
    import random

    rng = random.Random(seed)
    rows = ["text\tlabel"]
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        subject = rng.choice(("the movie", "this film", "the story", "the music", "the ending"))
        rows.append(f"{subject} was very {word} and {rng.choice(('fun', 'long', 'new'))}\t"
                    f"{'positive' if label else 'negative'}")
    path = Path(path)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_toy_corpus(path: str | os.PathLike, n: int = 120, seed: int = 0) -> Path:
    """A small plain-text corpus (one sentence a line) in the tiny vocabulary, for causal-LM runs."""
    import random

    rng = random.Random(seed)
    lines = [f"the {rng.choice(('movie', 'film', 'story'))} was {rng.choice(POSITIVE + NEGATIVE)} ."
             for _ in range(n)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
