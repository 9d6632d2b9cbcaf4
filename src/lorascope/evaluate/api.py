"""``evaluate``: one metric on the base and the tuned model, with the relative change between them.

Which model is base and which is tuned, and which head each is scored with, is described in
:mod:`lorascope.evaluate.sides`; the metrics themselves are registered in
:data:`lorascope.evaluate.measures.METRICS`.
"""

from __future__ import annotations

import time
from typing import Any

from lorascope.errors import InputError
from lorascope.evaluate.measures import METRICS, Context
from lorascope.evaluate.metrics import relative_change
from lorascope.evaluate.sides import load_sides
from lorascope.models import root_model
from lorascope.runtime import resolve_device


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
    score_base: bool = True,
) -> dict[str, Any]:
    """Compute ``metric`` for the base and the tuned model.

    ``data``: accuracy - a task (default: the tuned run's task), scored on its test split; pseudo-loss,
    drift - a corpus (default WikiText-2 test paragraphs; first ``max_examples``, default 256 / 512);
    lm-loss - a corpus (default the raw WikiText-2 test set); sts - ``stsb`` (test split) or a file with
    text, text_pair and label (score) columns.

    Returns ``{metric, base, tuned, change, change_pct, higher_is_better, n, data, ...}`` where
    change = tuned - base and change_pct = 100 (tuned - base) / |base| (None when undefined).
    ``score_base=False`` scores only the tuned model (base, change and change_pct are None), for a
    caller that already has the base's value, such as the edits of one fine-tune.
    """
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose from {tuple(METRICS)}")
    spec = METRICS[metric]
    start = time.perf_counter()
    dev = resolve_device(device)
    base, tuned = load_sides(model, adapter, dev, trust_remote_code)
    ctx = Context(base=base, tuned=tuned, data=data,
                  limit=max_examples if max_examples is not None else spec.max_examples,
                  max_length=max_length, stride=stride, batch_size=batch_size, device=dev,
                  root=root_model(base.ref), trust_remote_code=trust_remote_code, progress=progress,
                  score_base=score_base)
    if not score_base and tuned is None:
        raise InputError("score_base=False needs a tuned model (a run, or an adapter)")
    measured = spec.compute(ctx)
    values = dict(zip((s.name for s in ctx.sides), measured.values, strict=True))
    base_value, tuned_value = values.get("base"), values.get("tuned")
    return {
        "metric": metric,
        "base": base_value,
        "tuned": tuned_value,
        "change": None if tuned_value is None or base_value is None else tuned_value - base_value,
        "change_pct": relative_change(base_value, tuned_value),
        "higher_is_better": spec.higher_is_better and measured.details.get("score") != "lm_loss",
        "n": measured.n,
        "data": measured.data,
        "base_model": base.ref,
        "tuned_model": tuned.ref if tuned else None,
        "details": measured.details,
        "seconds": time.perf_counter() - start,
    }
