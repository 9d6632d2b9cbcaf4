"""Tiny assets for the example configs in examples/experiments/tiny_*.toml and for the tests.

``write_tiny_assets(DIR)`` writes, in seconds and with no download::

    DIR/tiny/bert/            a seeded random BERT with an MLM head (lorascope.train.tiny)
    DIR/tiny/sentiment/       train.tsv / test.tsv: "the movie was very good" -> positive / negative
    DIR/tiny/topics/          train.tsv / test.tsv: three topics (sports, business, science)
    DIR/tiny/corpus.txt       generic sentences for pseudo-loss forgetting

Copy a tiny config next to DIR/tiny (or run it from DIR) and ``lorascope experiment run`` it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from lorascope.train.tiny import save_tiny_model

POSITIVE = "good great fine nice fun best wonderful excellent brilliant lovely moving charming".split()
NEGATIVE = "bad awful poor worst boring dull terrible horrible weak messy tedious painful bland".split()
NOUNS = "movie film story plot music ending script cast scene actors".split()
TOPICS = {
    "sports": "sports team game".split(),
    "business": "business market company".split(),
    "science": "science report world".split(),
}
FILLER = "the a this that it is was of in on for with at by from day year city country people".split()


def _sentiment(rng: random.Random, n: int) -> list[str]:
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append(f"the {rng.choice(NOUNS)} was very {word}\t{'positive' if label else 'negative'}")
    return rows


def _topics(rng: random.Random, n: int) -> list[str]:
    rows = []
    for _ in range(n):
        topic = rng.choice(sorted(TOPICS))
        words = [rng.choice(TOPICS[topic]), *rng.sample(FILLER, 3), rng.choice(TOPICS[topic])]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{topic}")
    return rows


def _write_task(folder: Path, rows_train: list[str], rows_test: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("text\tlabel\n" + "\n".join(rows_train) + "\n", encoding="utf-8")
    (folder / "test.tsv").write_text("text\tlabel\n" + "\n".join(rows_test) + "\n", encoding="utf-8")


def write_tiny_assets(root: str | os.PathLike, n_train: int = 96, n_test: int = 48, seed: int = 0) -> Path:
    """Write DIR/tiny (model, two tasks, a corpus); returns DIR/tiny. Deterministic for a seed."""
    tiny = Path(root) / "tiny"
    rng = random.Random(seed)
    if not (tiny / "bert" / "config.json").is_file():
        save_tiny_model(tiny / "bert", "bert", seed=seed)
    _write_task(tiny / "sentiment", _sentiment(rng, n_train), _sentiment(rng, n_test))
    _write_task(tiny / "topics", _topics(rng, n_train), _topics(rng, n_test))
    words = POSITIVE + NEGATIVE + NOUNS + FILLER + [w for ws in TOPICS.values() for w in ws]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))) for _ in range(64)]
    (tiny / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tiny
