"""Forgetting and task metrics, always reported as base, tuned and relative change; see docs/training.md."""

from lorascope.evaluate.api import METRICS, evaluate
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
    "sentence_embeddings",
    "sliding_windows",
    "spearman",
    "sts_spearman",
]
