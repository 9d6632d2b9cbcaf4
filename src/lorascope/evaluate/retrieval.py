"""Headline → article retrieval: a label-free measure of what a sentence encoder was pretrained for.

all-MiniLM-L6-v2 was trained contrastively on (title, body)-style pairs, so matching a news
headline to its own article among N candidates exercises exactly that skill. After fine-tuning on
another task, the % change in recall@1 is forgetting on the pre-training objective, measured on
text the fine-tuning never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorascope.errors import InputError
from lorascope.evaluate.metrics import sentence_embeddings


def retrieval_scores(queries: torch.Tensor, docs: torch.Tensor) -> dict[str, float]:
    """Query i's relevant document is document i. With S = cos(q_i, d_j):
    recall@1 = mean_i [argmax_j S_ij = i];  MRR = mean_i 1 / rank_i, rank_i = 1 + #{j : S_ij > S_ii}."""
    if queries.shape != docs.shape or queries.shape[0] < 2:
        raise InputError(f"retrieval needs ≥ 2 aligned query/document pairs, got {tuple(queries.shape)} "
                         f"and {tuple(docs.shape)}")
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    d = torch.nn.functional.normalize(docs.double(), dim=1)
    sim = q @ d.T
    own = sim.diagonal().unsqueeze(1)
    rank = 1 + (sim > own).sum(dim=1)
    return {"recall_at_1": float((rank == 1).double().mean()), "mrr": float((1.0 / rank.double()).mean())}


def title_body_retrieval(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_length: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Embed titles and bodies (mean pooling) and score title → own-body retrieval."""
    with torch.no_grad():
        titles = sentence_embeddings(model, tokenizer, [t for t, _ in pairs], max_length=max_length, device=device)
        bodies = sentence_embeddings(model, tokenizer, [b for _, b in pairs], max_length=max_length, device=device)
    return retrieval_scores(titles, bodies)
