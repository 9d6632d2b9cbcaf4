"""Generic text for forgetting metrics: built-in corpora (WikiText-2, State of the Union) or a file."""

from __future__ import annotations

from pathlib import Path

from lorascope.data.examples import nonempty_lines
from lorascope.data.files import DEFAULT_COLUMNS, read_records, resolve_columns
from lorascope.data.readers import canonical_task_name, state_union_speeches, wikitext_paragraphs, wikitext_raw
from lorascope.errors import InputError


def load_corpus(name: str | None = None, split: str = "test") -> list[str]:
    """Generic text for forgetting metrics: ``wikitext2`` (default; paragraphs), ``state-union``
    (speeches), or a local ``.txt`` (non-empty lines) / ``.jsonl|.tsv|.csv`` (its text column) file."""
    name = name or "wikitext2"
    key = canonical_task_name(name)
    if key == "wikitext2" and not Path(name).exists():
        return wikitext_paragraphs(split)
    if key == "state-union" and not Path(name).exists():
        return state_union_speeches()
    path = Path(name)
    if not path.is_file():
        raise InputError(f"unknown corpus {name!r}: use wikitext2, state-union or a text file")
    if path.suffix.lower() == ".txt":
        texts = nonempty_lines(path.read_text(encoding="utf-8"))
    else:
        records = read_records(path)
        if not records:
            raise InputError(f"{path}: the data set is empty")
        column = resolve_columns(list(records[0].keys()), {}, str(path)).get("text")
        if column is None:
            raise InputError(f"{path}: no text column (tried {DEFAULT_COLUMNS['text']})")
        texts = [str(r[column]) for r in records if str(r[column]).strip()]
    if not texts:
        raise InputError(f"{path}: the data set is empty")
    return texts


def load_corpus_text(name: str | None = None, split: str = "test") -> str:
    """One string for perplexity: raw WikiText-2, the speeches joined by blank lines, or a file."""
    name = name or "wikitext2"
    if canonical_task_name(name) == "wikitext2" and not Path(name).exists():
        return wikitext_raw(split)
    path = Path(name)
    if path.is_file() and path.suffix.lower() == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise InputError(f"{path}: the data set is empty")
        return text
    return "\n\n".join(load_corpus(name, split))

