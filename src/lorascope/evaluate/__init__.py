"""Forgetting and task metrics, always reported as base, tuned and relative change; see docs/training.md.

Modules: :mod:`~lorascope.evaluate.metrics` (the formulas), :mod:`~lorascope.evaluate.sides` (base and
tuned models and their heads), :mod:`~lorascope.evaluate.measures` (the metric registry),
:mod:`~lorascope.evaluate.api` (``evaluate``), :mod:`~lorascope.evaluate.retrieval`. Builds on
:mod:`lorascope.data` and :mod:`lorascope.models`, never on :mod:`lorascope.train`.
"""

from lorascope.evaluate.api import evaluate
from lorascope.evaluate.measures import METRICS
from lorascope.evaluate.metrics import (
    accuracy,
    causal_lm_scores,
    causal_lm_token_nll,
    linear_cka,
    lm_loss,
    lm_nll,
    pseudo_log_likelihoods,
    pseudo_loss,
    relative_change,
    representation_drift,
    score_examples,
    sentence_embeddings,
    sliding_windows,
    spearman,
    sts_spearman,
)

__all__ = [
    "METRICS",
    "accuracy",
    "causal_lm_scores",
    "causal_lm_token_nll",
    "evaluate",
    "linear_cka",
    "lm_loss",
    "lm_nll",
    "pseudo_log_likelihoods",
    "pseudo_loss",
    "relative_change",
    "representation_drift",
    "score_examples",
    "sentence_embeddings",
    "sliding_windows",
    "spearman",
    "sts_spearman",
]
