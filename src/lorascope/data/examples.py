"""What every task is made of: :class:`Example`, :class:`TaskData`, and the seeded splits and samples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from lorascope.errors import InputError

KINDS = ("classification", "regression", "text", "prompt_response")
SPLIT_SEED = 0
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    """One example. ``label`` is an int (classification), a float (regression) or None (LM)."""

    text: str
    text_pair: str | None = None
    label: int | float | None = None
    response: str | None = None


@dataclass
class TaskData:
    name: str
    kind: str
    train: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.labels)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "n_train": len(self.train),
            "n_test": len(self.test),
            "source": self.source,
        }


def seeded_split(
    examples: list[Example], test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``random.Random(seed)`` and hold out the last ``test_fraction`` as the test set."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(examples) * test_fraction))
    return [examples[i] for i in order[n_test:]], [examples[i] for i in order[:n_test]]


def subsample(examples: list[Example], n: int | None, seed: int = SPLIT_SEED) -> list[Example]:
    """The first ``n`` examples of a seeded shuffle (all of them, in file order, when ``n`` is None)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise InputError(f"max examples must be positive, got {n}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


def nonempty_lines(text: str) -> list[str]:
    """The stripped non-empty lines of ``text``."""
    return [line.strip() for line in text.splitlines() if line.strip()]
