"""The two models a metric compares, base and tuned, and the heads each is scored with.

Who is base and who is tuned:

- ``load_sides(RUN)``: tuned = the run, base = the model the run started from;
- ``load_sides(BASE, adapter=RUN_OR_ADAPTER)``: base = ``BASE`` (a checkpoint or an earlier run, e.g. in
  continual learning), tuned = ``BASE`` with the adapter (or the full run given as adapter);
- ``load_sides(CHECKPOINT)``: the base only.

Heads. A metric needs a head the tuned backbone may not have: accuracy the task's classifier,
pseudo-loss the pretrained MLM head, lm-loss the pretrained LM head. Each side uses its own head when it
has the right one; otherwise its backbone is moved under the other side's classifier, or under the
pretraining head of the root checkpoint (:func:`lorascope.models.transplant`). So an untuned base
is scored with the tuned run's classifier, and a classifier-tuned RoBERTa with RoBERTa's own MLM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from lorascope.data import TaskData
from lorascope.errors import InputError
from lorascope.models import (
    is_run,
    load_pretrained,
    load_trained,
    read_run,
    require_decoder,
    resolve_model_path,
    transplant,
)

PRETRAINING_HEADS = {"mlm": (AutoModelForMaskedLM, "masked-LM"), "lm": (AutoModelForCausalLM, "causal-LM")}


@dataclass
class Side:
    """One of the two models compared, loaded the first time its model or tokenizer is used: a caller
    that scores only the tuned side (``score_base=False``) never loads the base."""

    name: str  # "base" or "tuned"
    ref: str  # the folder or id it is loaded from
    record: dict[str, Any] | None  # its run record, when it is a run
    load: Callable[[], tuple[torch.nn.Module, Any]] = field(repr=False)

    @cached_property
    def _loaded(self) -> tuple[torch.nn.Module, Any]:
        return self.load()

    @property
    def model(self) -> torch.nn.Module:
        return self._loaded[0]

    @property
    def tokenizer(self) -> Any:
        return self._loaded[1]


def load_sides(
    model: str, adapter: str | None, device: torch.device, trust_remote_code: bool = False
) -> tuple[Side, Side | None]:
    """The base and (when there is one) the tuned model: the tuned loaded now, the base when first used."""
    tuned = None
    if adapter is not None or is_run(model):
        tuned_ref = str(adapter) if adapter is not None else str(model)
        tuned = Side("tuned", tuned_ref, read_run(tuned_ref) if is_run(tuned_ref) else None,
                     lambda: load_trained(model, adapter, device=device, trust_remote_code=trust_remote_code))
        tuned.model  # noqa: B018 -- the tuned model always is scored: its load errors come first
        base_ref = str(model) if adapter is not None else read_run(model)["model"]
    else:
        base_ref = str(model)
    base = Side("base", base_ref, read_run(base_ref) if is_run(base_ref) else None,
                lambda: load_trained(base_ref, device=device, trust_remote_code=trust_remote_code))
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


def with_classifier(side: Side, other: Side | None, task: TaskData) -> torch.nn.Module:
    """The side's model with a classifier for ``task``: its own, else the other side's."""
    own = _head_match(side, task)
    theirs = _head_match(other, task) if other is not None else 0
    if own and own >= theirs:
        return side.model
    if theirs:
        return transplant(other.model, side.model)
    raise InputError(f"no classifier head trained for task {task.name!r} (labels {task.labels}) in "
                     f"{side.ref}{' or ' + other.ref if other else ''}")


def with_pretraining_head(side: Side, kind: str, root: str, device: torch.device,
                          trust_remote_code: bool, cache: dict) -> torch.nn.Module:
    """The side's model if it already has the MLM / causal-LM head, else its backbone under the root
    checkpoint's pretrained head (loaded once per ``cache``)."""
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
