"""A generated string-manipulation task for decoders: a second generated task beside arithmetic, for
continual learning (arithmetic, then this, then text completion).

Each example applies one operation to a list of three to five common words, e.g.::

    Task: reverse the order of the words: river moon apple stone
    Result: stone apple moon river

The operations are reversing the order, sorting alphabetically, and writing the words in capitals.
As in :mod:`lorascope.data.arithmetic` the prompt ends at ``Result:``, the response is the rest, the
generator is seeded and train and test share no (operation, words) combination.
"""

from __future__ import annotations

import random

WORDS = ["apple", "river", "stone", "moon", "garden", "window", "candle", "forest", "silver", "bread",
         "cloud", "tiger", "paper", "horse", "lemon", "bridge", "winter", "pocket", "island", "violin"]
OPERATIONS = {
    "reverse the order of the words": lambda ws: ws[::-1],
    "sort the words alphabetically": sorted,
    "write the words in capitals": lambda ws: [w.upper() for w in ws],
}


def string_problems(n_train: int = 5000, n_test: int = 500, seed: int = 0) -> tuple[list, list]:
    """``n_train`` and ``n_test`` distinct (prompt, response) pairs; no problem is in both."""
    rng = random.Random(seed)
    names = list(OPERATIONS)
    seen: set[tuple] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_train + n_test:
        op, words = rng.choice(names), rng.sample(WORDS, rng.randint(3, 5))
        if (op, *words) not in seen:
            seen.add((op, *words))
            pairs.append((f"Task: {op}: {' '.join(words)}\nResult:", " " + " ".join(OPERATIONS[op](words))))
    return pairs[:n_train], pairs[n_train:]
