"""Tasks from local files (``.tsv .csv .jsonl .json .txt``) and Hugging Face ``datasets`` names.

Columns are found by role (text, text_pair, label, prompt, response), from a mapping the user gives or
from common names; the kind of task (classification, regression, text, prompt/response) and the label set
are inferred from the columns and the values.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from lorascope.data.examples import TEST_FRACTION, Example, TaskData, nonempty_lines, seeded_split
from lorascope.errors import InputError

ROLES = ("text", "text_pair", "label", "prompt", "response")
# Column names tried, in order, when the user gives no mapping for a role.
DEFAULT_COLUMNS = {
    "text": ("text", "sentence", "sentence1", "premise", "question", "content"),
    "text_pair": ("text_pair", "sentence2", "hypothesis"),
    "label": ("label", "labels", "score"),
    "prompt": ("prompt", "instruction", "input"),
    "response": ("response", "output", "completion", "answer"),
}
SPLIT_FILE_TYPES = (".tsv", ".csv", ".jsonl", ".json", ".txt")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.tsv`` (no quoting), ``.csv``, ``.jsonl`` or ``.json`` (a list of objects) file,
    as dicts keyed by the header (or the JSON keys)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".tsv", ".csv"):
        kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"delimiter": ","}
        return [dict(r) for r in csv.DictReader(io.StringIO(text), **kw)]
    if suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON line: {e}") from e
    if suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON list of objects")
        return rows
    raise InputError(f"{path}: unknown file type {suffix!r} (use .tsv, .csv, .jsonl, .json or .txt)")


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``"text=review,label=stars"`` -> ``{"text": "review", "label": "stars"}``; roles are checked."""
    if spec is None:
        return {}
    mapping = dict(spec) if isinstance(spec, dict) else {}
    if isinstance(spec, str):
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise InputError(f"column mapping {item!r} must look like role=column")
            role, column = (s.strip() for s in item.split("=", 1))
            mapping[role] = column
    unknown = sorted(set(mapping) - set(ROLES))
    if unknown:
        raise InputError(f"unknown column role(s) {unknown}; roles are {list(ROLES)}")
    return mapping


def resolve_columns(header: list[str], columns: dict[str, str], source: str) -> dict[str, str]:
    """The user's mapping checked against ``header``, completed from :data:`DEFAULT_COLUMNS`."""
    for role, column in columns.items():
        if column not in header:
            raise InputError(f"{source}: unknown column {column!r} for {role}; the columns are {header}")
    resolved = dict(columns)
    for role, candidates in DEFAULT_COLUMNS.items():
        if role not in resolved:
            found = next((c for c in candidates if c in header and c not in resolved.values()), None)
            if found is not None:
                resolved[role] = found
    return resolved


def _infer_kind(columns: dict[str, str], records: list[dict[str, Any]], labels: list[str] | None) -> str:
    if "prompt" in columns and "response" in columns:
        return "prompt_response"
    if "label" not in columns:
        if "text" not in columns:
            raise InputError("no text column found; map one with columns text=NAME")
        return "text"
    if labels:
        return "classification"
    values = [r[columns["label"]] for r in records]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return "classification"
    return "regression" if any(x != int(x) for x in numbers) else "classification"


def _label_names(values: list[Any]) -> list[str]:
    """Sorted distinct label values: numerically when they are all integers, else as strings."""
    names = {str(v).strip() for v in values}
    try:
        return sorted(names, key=lambda s: int(float(s)))
    except ValueError:
        return sorted(names)


def _label_key(value: Any) -> str:
    s = str(value).strip()
    try:
        f = float(s)
        return str(int(f)) if f == int(f) else s
    except ValueError:
        return s


def records_to_examples(
    records: list[dict[str, Any]], columns: dict[str, str], kind: str, labels: list[str], source: str
) -> list[Example]:
    """Turn rows into examples; a label outside ``labels`` is an error."""
    index = {_label_key(name): i for i, name in enumerate(labels)}
    out = []
    for n, r in enumerate(records, start=1):
        try:
            if kind == "prompt_response":
                out.append(Example(text=str(r[columns["prompt"]]), response=str(r[columns["response"]])))
                continue
            text = str(r[columns["text"]])
            pair = str(r[columns["text_pair"]]) if "text_pair" in columns else None
        except KeyError as e:
            raise InputError(f"{source}: row {n} has no column {e.args[0]!r}") from e
        if kind == "text":
            out.append(Example(text=text))
        elif kind == "regression":
            out.append(Example(text=text, text_pair=pair, label=float(r[columns["label"]])))
        else:
            key = _label_key(r[columns["label"]])
            if key not in index:
                raise InputError(f"{source}: row {n} has label {key!r}, outside the label set {labels}")
            out.append(Example(text=text, text_pair=pair, label=index[key]))
    return out


def records_task(
    name: str,
    train_records: list[dict[str, Any]],
    test_records: list[dict[str, Any]] | None,
    columns: dict[str, str],
    labels: list[str] | None,
    source: str,
) -> TaskData:
    """A task from rows; without test rows a seeded 10% split of the train rows is held out."""
    if not train_records:
        raise InputError(f"{source}: the data set is empty")
    header = list(train_records[0].keys())
    resolved = resolve_columns(header, columns, source)
    kind = _infer_kind(resolved, train_records, labels)
    if kind in ("text", "prompt_response"):
        resolved.pop("label", None)
    names = list(labels) if labels else (_label_names([r[resolved["label"]] for r in train_records])
                                         if kind == "classification" else [])
    if kind == "classification" and len(names) < 2:
        raise InputError(f"{source}: a classification task needs at least 2 labels, found {names}")
    train = records_to_examples(train_records, resolved, kind, names, source)
    if test_records is None:
        train, test = seeded_split(train)
    else:
        if not test_records:
            raise InputError(f"{source}: the test set is empty")
        test = records_to_examples(test_records, resolved, kind, names, f"{source} (test)")
    return TaskData(name, kind, train, test, names, source)


def text_file_task(path: Path, test: Path | None) -> TaskData:
    """A ``.txt`` corpus: one example per non-empty line; without a test file, the last 10% of the
    lines (contiguous, so the text stays coherent) are the test set."""
    lines = nonempty_lines(path.read_text(encoding="utf-8"))
    if not lines:
        raise InputError(f"{path}: the data set is empty")
    if test is not None:
        test_lines = nonempty_lines(Path(test).read_text(encoding="utf-8"))
    else:
        n_test = max(1, round(len(lines) * TEST_FRACTION))
        lines, test_lines = lines[:-n_test] or lines, lines[-n_test:]
    return TaskData(path.stem, "text", [Example(t) for t in lines], [Example(t) for t in test_lines], [],
                    str(path))


def file_task(path: Path, test: str | os.PathLike | None, columns: dict[str, str],
              labels: list[str] | None) -> TaskData:
    """A task from one file (and optionally its test file)."""
    if path.suffix.lower() == ".txt":
        return text_file_task(path, Path(test) if test is not None else None)
    test_records = read_records(test) if test is not None else None
    return records_task(path.stem, read_records(path), test_records, columns, labels, str(path))


def find_split_file(folder: Path, split: str) -> Path | None:
    """``folder/SPLIT.tsv`` (or .csv, .jsonl, .json, .txt), the first that exists."""
    for ext in SPLIT_FILE_TYPES:
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def hf_task(spec: str, columns: dict[str, str], labels: list[str] | None) -> TaskData:
    """``hf:NAME`` or ``hf:NAME:CONFIG``: the ``train`` split trains, ``test`` (else ``validation``) tests.
    ClassLabel features give the label names."""
    try:
        import datasets
    except ImportError as e:
        raise InputError("hf: tasks need the datasets package (pip install datasets)") from e
    _, name, *rest = spec.split(":")
    config = rest[0] if rest else None
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - any loading failure is the user's input
        raise InputError(f"cannot load data set {name!r}: {e}") from e
    if "train" not in ds:
        raise InputError(f"data set {name!r} has no train split (splits: {list(ds)})")
    label_col = columns.get("label", "label")
    feature = ds["train"].features.get(label_col)
    if labels is None and getattr(feature, "names", None):
        labels = list(feature.names)

    def rows(split: str) -> list[dict[str, Any]]:
        """The split's rows, ClassLabel ids as names; unlabelled rows (id -1, e.g. GLUE test) dropped."""
        out = [dict(r) for r in ds[split]]
        if getattr(feature, "names", None):
            out = [r for r in out if isinstance(r.get(label_col), int) and r[label_col] >= 0]
            for r in out:
                r[label_col] = feature.names[r[label_col]]
        return out

    # the first of test / validation that has labels; else a seeded split of train
    test_rows = next((r for r in (rows(s) for s in ("test", "validation") if s in ds) if r), None)
    return records_task(name, rows("train"), test_rows, columns, labels, f"hf:{name}")
