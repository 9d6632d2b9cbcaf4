"""Fine-tuning recipes (LoRA and full) for sequence classification and causal LM; see docs/training.md."""

from lorascope.train.data import Example, TaskData, find_data_root, load_corpus, load_task
from lorascope.train.recipes import FineTuned, TrainConfig, fine_tune, train, write_run
from lorascope.train.runs import load_trained, merge_lora, read_run, transplant

__all__ = [
    "Example",
    "FineTuned",
    "TaskData",
    "TrainConfig",
    "find_data_root",
    "fine_tune",
    "load_corpus",
    "load_task",
    "load_trained",
    "merge_lora",
    "read_run",
    "train",
    "transplant",
    "write_run",
]
