"""Forgetting and task metrics, each a small function with its formula.

- accuracy = mean(argmax logits == label); regression tasks use Spearman's rho instead.
- pseudo-log-likelihood (Salazar et al. 2020): PLL(W) = sum_t log P(w_t | W with w_t masked), every
  non-special position masked in turn; pseudo-loss = -sum PLL / number of scored tokens.
- causal-LM loss: NLL = -sum_t log P(x_t | x_<t) over all tokens but the first, scored in sliding windows
  of ``max_length`` moved by ``stride`` (each token scored once, with up to max_length-1 of context);
  perplexity = exp(NLL / tokens).
- STS: Spearman rho between cos(u, v) of mean-pooled embeddings and the gold similarity.
- linear CKA (Kornblith et al. 2019), with X, Y column-centred:
  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); drift = 1 - CKA(base, tuned).
- relative change = 100 (tuned - base) / |base|, the paper's "% change".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lorascope.data.examples import Example
from lorascope.data.features import IGNORE_INDEX, Feature, encode, encode_classification, make_loader
from lorascope.errors import InputError, NonFiniteError

LM_KINDS = ("prompt_response", "text")  # task kinds a causal LM is scored on (no classifier head)

# ---------------------------------------------------------------------------------------- statistics


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata)."""
    a = np.asarray(values, dtype=np.float64)
    sorter = np.argsort(a, kind="mergesort")
    inverse = np.empty(len(a), dtype=np.intp)
    inverse[sorter] = np.arange(len(a))
    a = a[sorter]
    first = np.r_[True, a[1:] != a[:-1]]
    dense = first.cumsum()[inverse]
    bounds = np.r_[np.nonzero(first)[0], len(first)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise InputError("correlation needs two sequences of the same length, at least 2")
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    if denom == 0:
        raise NonFiniteError("correlation is undefined for a constant sequence")
    return float(x @ y) / denom


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks."""
    return pearson(rankdata(x), rankdata(y))


def accuracy(logits: torch.Tensor, labels: Sequence[int]) -> float:
    labels = torch.as_tensor(labels)
    if logits.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise InputError("accuracy needs one row of logits per label")
    return float((logits.argmax(-1) == labels).float().mean())


def task_score(logits: torch.Tensor, labels: Sequence[Any], kind: str) -> tuple[str, float]:
    """(name, value): accuracy for classification, Spearman's rho for regression (STS-B)."""
    if kind == "regression":
        return "spearman", spearman(logits[:, 0].tolist(), labels)
    return "accuracy", accuracy(logits, labels)


def relative_change(base: float | None, tuned: float | None) -> float | None:
    """100 (tuned - base) / |base|, the paper's "% change"; None when undefined (base 0, or a value
    missing)."""
    if base is None or tuned is None or base == 0:
        return None
    return 100.0 * (tuned - base) / abs(base)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two (n, d) representations of the same n inputs (in float64)."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise InputError("CKA needs the same n >= 2 inputs in both representations")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    denom = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    if denom == 0:
        raise NonFiniteError("CKA is undefined for a constant representation")
    return float(torch.linalg.norm(y.T @ x) ** 2 / denom)


# ------------------------------------------------------------------------------------------ forward


def _inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.inference_mode()
def predict(
    model: torch.nn.Module, features: Sequence[Feature], tokenizer: Any, batch_size: int = 32,
    device: torch.device | str = "cpu", progress: bool = False,
) -> torch.Tensor:
    """Logits of a sequence-classification model for encoded features, in order, as float32 on CPU
    (batches padded with ``tokenizer``)."""
    model.eval()
    out = []
    for batch in tqdm(make_loader(features, batch_size, tokenizer), desc="predict", disable=not progress,
                      leave=False):
        out.append(model(**_inputs(batch, torch.device(device))).logits.float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def causal_lm_token_nll(
    model: torch.nn.Module, features: Sequence[Feature], tokenizer: Any, batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """(summed NLL, scored tokens) of causal-LM features whose ``labels`` mark scored tokens
    (-100 elsewhere): logits at position t predict label t+1."""
    nll, count, _ = causal_lm_scores(model, features, tokenizer, batch_size, device)
    return nll, count


@torch.inference_mode()
def causal_lm_scores(
    model: torch.nn.Module, features: Sequence[Feature], tokenizer: Any, batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, exact matches). An example matches exactly when every scored token
    is the argmax given the true prefix, i.e. when greedy decoding would write its whole response."""
    model.eval()
    total, count, exact = 0.0, 0, 0
    for batch in make_loader(features, batch_size, tokenizer):
        logits = model(**_inputs(batch, torch.device(device))).logits[:, :-1]
        labels = batch["labels"][:, 1:].to(logits.device)
        mask = labels != IGNORE_INDEX
        total += float(F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"))
        count += int(mask.sum())
        wrong = (logits.argmax(-1) != labels) & mask
        exact += int((~wrong.any(-1) & mask.any(-1)).sum())
    return total, count, exact


def score_examples(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], kind: str, max_length: int,
    batch_size: int = 32, device: torch.device | str = "cpu", progress: bool = False,
) -> tuple[str, float]:
    """(name, value) of a model on test examples: a classifier's accuracy, or Spearman's rho for
    regression; a causal LM's ``exact_match`` on a prompt/response task (the share of examples whose
    whole response greedy decoding writes), or its per-token ``lm_loss`` (NLL / tokens) on a text task."""
    if kind in LM_KINDS:
        features = encode(examples, "lm", kind, tokenizer, max_length)
        nll, n, exact = causal_lm_scores(model, features, tokenizer, batch_size, device)
        return ("exact_match", exact / len(features)) if kind == "prompt_response" else ("lm_loss", nll / n)
    features = encode_classification(examples, tokenizer, max_length)
    logits = predict(model, features, tokenizer, batch_size, device, progress)
    return task_score(logits, [e.label for e in examples], kind)


@torch.inference_mode()
def sentence_embeddings(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
    max_length: int = 128, device: torch.device | str = "cpu", progress: bool = False,
) -> torch.Tensor:
    """Mean pooling of the last hidden states over real (unpadded) tokens, as sentence-transformers
    does for all-MiniLM-L6-v2: e = sum_t m_t h_t / sum_t m_t. Works for any model that returns
    ``hidden_states``."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not progress, leave=False):
        enc = tokenizer(list(texts[i : i + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt").to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def sts_spearman(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], gold: Sequence[float],
    **kw: Any,
) -> float:
    """Spearman's rho between cos(e(a), e(b)) and the gold scores."""
    a = sentence_embeddings(model, tokenizer, [p[0] for p in pairs], **kw)
    b = sentence_embeddings(model, tokenizer, [p[1] for p in pairs], **kw)
    return spearman(torch.nn.functional.cosine_similarity(a, b).tolist(), gold)


def representation_drift(
    base: torch.nn.Module, tuned: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any
) -> float:
    """1 - CKA(base embeddings, tuned embeddings) on the same texts."""
    x = sentence_embeddings(base, tokenizer, texts, **kw)
    y = sentence_embeddings(tuned, tokenizer, texts, **kw)
    return 1.0 - linear_cka(x, y)


# ---------------------------------------------------------------------------------- pseudo-likelihood


@torch.inference_mode()
def pseudo_log_likelihoods(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
    max_length: int = 128, device: torch.device | str = "cpu", progress: bool = False,
) -> list[tuple[float, int]]:
    """Per text, (PLL, scored tokens): every non-special position is masked in its own copy of the
    text and scored by the MLM; the copies of all texts are run in batches of ``batch_size``."""
    if tokenizer.mask_token_id is None:
        raise InputError("pseudo-log-likelihood needs a tokenizer with a mask token")
    model.eval()
    device = torch.device(device)
    items = []  # (text index, position, ids)
    for i, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        items += [(i, pos, ids) for pos, s in enumerate(special) if not s]
    pll = [0.0] * len(texts)
    count = [0] * len(texts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(items), batch_size), desc="pseudo-likelihood", disable=not progress,
                      leave=False):
        chunk = items[start : start + batch_size]
        length = max(len(ids) for _, _, ids in chunk)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (_, pos, ids) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            input_ids[row, pos] = tokenizer.mask_token_id
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        rows = torch.arange(len(chunk))
        positions = torch.tensor([pos for _, pos, _ in chunk])
        targets = torch.tensor([ids[pos] for _, pos, ids in chunk])
        logp = torch.log_softmax(logits[rows, positions.to(logits.device)].float().cpu(), dim=-1)
        for (i, _, _), value in zip(chunk, logp[rows, targets].tolist(), strict=True):
            pll[i] += value
            count[i] += 1
    return list(zip(pll, count, strict=True))


def pseudo_loss(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], **kw: Any) -> float:
    """Per-token pseudo-loss of a corpus: -sum PLL / sum tokens."""
    scores = pseudo_log_likelihoods(model, tokenizer, texts, **kw)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        raise InputError("no token to score: the texts are empty")
    return -sum(p for p, _ in scores) / tokens


# ------------------------------------------------------------------------------------------ LM loss


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) windows over ``n_tokens`` as in the transformers perplexity
    guide: windows of ``max_length`` moved by ``stride``; each token is scored once, in the first window
    that reaches it, and token 0 (which has no context) never is."""
    if not 0 < stride <= max_length:
        raise InputError(f"stride must be in (0, max_length={max_length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def lm_nll(
    model: torch.nn.Module, input_ids: Sequence[int], max_length: int, stride: int | None = None,
    batch_size: int = 4, device: torch.device | str = "cpu", progress: bool = False, bos: int | None = None,
) -> tuple[float, int]:
    """(summed NLL, scored tokens) of one token stream under a causal LM, with sliding windows.

    In a window [b, e) the logits at position p - b - 1 predict token p, for p from the window's first
    scored position to e - 1. With ``bos`` (the stream starts with it), every later window starts with
    it too, unscored, as the model saw in training: the first tokens of a window without it are
    scored from a context the model never had (Gemma 3 270M: 4.83 nats instead of 4.12 on the first
    1,200 WikiText-2 test tokens); windows are then ``max_length - 1`` tokens of the stream.
    """
    model.eval()
    device = torch.device(device)
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens; nothing to score")
    if bos is not None and int(ids[0]) != bos:
        raise InputError(f"bos={bos} is given but the token stream starts with {int(ids[0])}")
    span = max_length - 1 if bos is not None else max_length
    windows = sliding_windows(len(ids), span, stride or max(1, span // 2))
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="lm-loss", disable=not progress, leave=False):
        chunk = windows[start : start + batch_size]
        lead = [int(bos is not None and b > 0) for b, _, _ in chunk]  # a BOS put in front of the window
        length = max(e - b + x for (b, e, _), x in zip(chunk, lead, strict=True))
        batch = torch.zeros((len(chunk), length), dtype=torch.long)
        attention = torch.zeros_like(batch)
        for row, ((b, e, _), x) in enumerate(zip(chunk, lead, strict=True)):
            if x:
                batch[row, 0] = bos
            batch[row, x : x + e - b] = ids[b:e]
            attention[row, : x + e - b] = 1
        logits = model(input_ids=batch.to(device), attention_mask=attention.to(device)).logits
        # Scored positions only, on the device: the full-vocabulary log-softmax of a batch is GBs.
        rows = [logits[row, x + first - b - 1 : x + e - b - 1]
                for row, ((b, e, first), x) in enumerate(zip(chunk, lead, strict=True))]
        targets = torch.cat([ids[first:e] for _, e, first in chunk]).to(device)
        total += float(F.cross_entropy(torch.cat(rows).float(), targets, reduction="sum"))
        count += len(targets)
    return total, count


def lm_loss(
    model: torch.nn.Module, tokenizer: Any, text: str, max_length: int | None = None,
    stride: int | None = None, **kw: Any,
) -> tuple[float, float, int]:
    """(mean NLL per token, perplexity, scored tokens) of ``text``; ``max_length`` defaults to the
    model's context (at most 1024) and ``stride`` to half of it. A tokenizer that puts a BOS token in
    front of the text has it in front of every window (:func:`lm_nll`)."""
    if max_length is None:
        config = model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
        max_length = min(int(context), 1024)
    ids = tokenizer(text, verbose=False)["input_ids"]  # one long stream: no length warning
    bos = getattr(tokenizer, "bos_token_id", None)
    starts_with_bos = bos is not None and len(ids) > 0 and ids[0] == bos  # the tokenizer adds one (Gemma, LLaMA)
    nll, n = lm_nll(model, ids, max_length, stride, bos=bos if starts_with_bos else None, **kw)
    return nll / n, math.exp(nll / n), n
