"""``load_task``: one entry point for built-in tasks, local files and folders, and ``hf:`` names.

Every loader returns a :class:`~lorascope.data.examples.TaskData`: a train and a test list of
:class:`~lorascope.data.examples.Example` plus the label names. Four kinds of task exist:

- ``classification``: ``text`` (and optionally ``text_pair``) with an integer ``label``;
- ``regression``: the same with a float ``label`` (STS-B);
- ``text``: plain text for causal-LM training (the loss is on every token);
- ``prompt_response``: ``text`` is the prompt, ``response`` the answer; the loss is on the response only.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorascope.data.examples import TaskData
from lorascope.data.files import SPLIT_FILE_TYPES, file_task, find_split_file, hf_task, parse_columns
from lorascope.data.readers import BUILTIN_TASKS, canonical_task_name
from lorascope.errors import InputError


def load_task(
    task: str,
    *,
    columns: str | dict[str, str] | None = None,
    labels: list[str] | None = None,
    test: str | os.PathLike | None = None,
) -> TaskData:
    """Load a task by built-in name, local file or folder, or ``hf:NAME[:CONFIG]``.

    - built-in: ``sst2 agnews rte subj trec rt-polarity stsb bbc wikitext2 state-union arithmetic strings``;
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
        return hf_task(task, mapping, labels)
    path = Path(task)
    if path.is_dir():
        train_file = find_split_file(path, "train")
        if train_file is None:
            raise InputError(f"{path} holds no train{'/'.join(SPLIT_FILE_TYPES)} file")
        test = test if test is not None else find_split_file(path, "test")
        path = train_file
    if path.is_file():
        return file_task(path, test, mapping, labels)
    known = ", ".join(BUILTIN_TASKS)
    raise InputError(f"unknown task {task!r}: not a built-in task ({known}), a file, a folder or hf:NAME")
