"""Task data and evaluation corpora: built-in tasks, local files, ``hf:`` names, and text encoding.

- :mod:`~lorascope.data.examples`: ``Example``, ``TaskData``, seeded splits and samples;
- :mod:`~lorascope.data.readers`: the built-in tasks (``shared/data``, BBC News, arithmetic);
- :mod:`~lorascope.data.files`: tasks from ``.tsv .csv .jsonl .json .txt`` files and ``hf:`` names;
- :mod:`~lorascope.data.tasks`: ``load_task``, the one entry point;
- :mod:`~lorascope.data.corpora`: generic text for forgetting metrics;
- :mod:`~lorascope.data.arithmetic`: the generated word-problem task; :mod:`~lorascope.data.strings`: the
  generated string-manipulation task;
- :mod:`~lorascope.data.features`: examples -> token ids -> padded batches (needs torch; not imported here).
"""

from lorascope.data.corpora import load_corpus, load_corpus_text
from lorascope.data.examples import Example, TaskData, seeded_split, subsample
from lorascope.data.files import parse_columns, read_records
from lorascope.data.readers import BUILTIN_TASKS, canonical_task_name, find_data_root, read_stsb
from lorascope.data.tasks import load_task

__all__ = [
    "BUILTIN_TASKS",
    "Example",
    "TaskData",
    "canonical_task_name",
    "find_data_root",
    "load_corpus",
    "load_corpus_text",
    "load_task",
    "parse_columns",
    "read_records",
    "read_stsb",
    "seeded_split",
    "subsample",
]
