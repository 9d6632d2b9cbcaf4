"""Fine-tuning recipes (LoRA and full) for sequence classification and causal LM; see docs/training.md.

Modules: :mod:`~lorascope.train.config` (``TrainConfig``, the defaults; standard library only),
:mod:`~lorascope.train.lora` (peft wrapping, base-mutating inits), :mod:`~lorascope.train.recipes`
(the loop, ``fine_tune``, ``train``), :mod:`~lorascope.train.tiny` (tiny checkpoints for tests).

The names below are re-exported from their homes (:mod:`lorascope.data`, :mod:`lorascope.models`) and
loaded on first use, so ``import lorascope.train.config`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Example": "lorascope.data",
    "TaskData": "lorascope.data",
    "find_data_root": "lorascope.data",
    "load_corpus": "lorascope.data",
    "load_task": "lorascope.data",
    "TrainConfig": "lorascope.train.config",
    "FineTuned": "lorascope.train.recipes",
    "fine_tune": "lorascope.train.recipes",
    "train": "lorascope.train.recipes",
    "write_run": "lorascope.train.recipes",
    "load_trained": "lorascope.models",
    "merge_lora": "lorascope.models",
    "read_run": "lorascope.models",
    "transplant": "lorascope.models",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lorascope.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
