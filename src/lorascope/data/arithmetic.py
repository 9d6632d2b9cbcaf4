"""A generated arithmetic word-problem task for decoders (the paper's math fine-tuning, in small).

Each example is a one- or two-step problem over whole numbers with a worked answer, e.g.::

    Question: Maya has 37 stamps. She buys 25 more. How many stamps does Maya have now?
    Answer: 37 + 25 = 62. The answer is 62.

The prompt is everything up to ``Answer:``; the response (the loss, and exact match, are on it alone)
is the worked line. Problems come from a seeded generator, so the data is the same on every machine
and needs no download; train and test share no (template, numbers) combination.
"""

from __future__ import annotations

import random

NAMES = ["Maya", "Tom", "Aisha", "Leo", "Sara", "Ben", "Priya", "Omar", "Nina", "Jack", "Lena", "Ravi"]
PRONOUNS = {"Maya": "She", "Aisha": "She", "Sara": "She", "Priya": "She", "Nina": "She", "Lena": "She"}
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "stickers", "pencils", "cards", "shells", "eggs"]


def _problem(rng: random.Random) -> tuple[tuple, str, str]:
    """(identity, question, worked answer) of one random problem."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    she = PRONOUNS.get(name, "He")
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        q = f"{name} has {a} {item}. {she} buys {b} more. How many {item} does {name} have now?"
        work, n = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them away. How many {item} does {name} have left?"
        work, n = f"{a} - {b} = {a - b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
        work, n = f"{a} * {b} = {a * b}", a * b
    elif kind == 3:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
        work, n = f"{a * b} / {b} = {a}", a
    else:
        a, b = rng.randint(10, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. "
             f"How many {item} does {name} have now?")
        work, n = f"{a} + {b} = {a + b}, {a + b} - {c} = {a + b - c}", a + b - c
    identity = (kind, a, b) + ((c,) if kind == 4 else ())
    return identity, f"Question: {q}\nAnswer:", f" {work}. The answer is {n}."


def arithmetic_problems(n_train: int = 5000, n_test: int = 500, seed: int = 0) -> tuple[list, list]:
    """``n_train`` and ``n_test`` distinct (prompt, response) pairs; no problem is in both."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_train + n_test:
        identity, prompt, response = _problem(rng)
        if identity not in seen:
            seen.add(identity)
            pairs.append((prompt, response))
    return pairs[:n_train], pairs[n_train:]
