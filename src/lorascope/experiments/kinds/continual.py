"""``continual`` (paper §6): stage i trains task i from stage i-1's model (LoRA merged in first), then
accuracy on every task so far (each with the head trained on it), forgetting and intruders, all against
the original pretrained model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope.experiments.arms import ArmsGrid
from lorascope.experiments.steps import SCAN_FILE, forgetting_metrics, scan_metrics, scan_unit, task_metrics, timed
from lorascope.experiments.store import Store
from lorascope.experiments.units import Unit, shared_params, task_label, train_unit

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig

SEQUENCE = True  # the tasks are the stages, in order


class Grid(ArmsGrid):
    methods: list[Any] = [{"method": "lora", "rank": 8}, {"method": "full"}]


def plan(cfg: ExperimentConfig) -> list[Unit]:
    units = []
    for arm in cfg.grid["methods"]:
        for seed in cfg.seeds:
            earlier: list[tuple[str, str]] = []  # (task, key) of the stages before
            for stage, task in enumerate(cfg.tasks, 1):
                first = train_unit(cfg, arm, task, seed, "continual")
                train = {**first.train, "model": cfg.model if stage == 1 else None}
                labels = {**first.labels, "stage": stage}
                params = {**shared_params(cfg), "stage": stage, "heads": [list(e) for e in earlier]}
                unit = Unit("continual", "continual", labels, train, params, tuple(k for _, k in earlier))
                units.append(unit)
                earlier.append((task, unit.key))
    return units


def stage_model(store: Store, key: str) -> Path:
    """The run folder holding a continual stage's whole model: the merged LoRA, or the full run."""
    folder = store.unit_dir(key)
    return folder / "merged" if (folder / "merged").is_dir() else folder / "run"


def run_continual(u: Unit, folder: Path, store: Store):
    from lorascope.models import merge_lora
    from lorascope.train import TrainConfig, train

    base = u.params["base"]
    start = base if not u.deps else str(stage_model(store, u.deps[-1]))
    cfg = TrainConfig(**{**u.train, "model": start})
    with timed("train"):
        run = train(cfg, folder / "run", progress=False)
    if run["method"] == "lora":  # fold the adapter in; the next stage starts a fresh one on top
        merge_lora(folder / "run", folder / "merged")
    model_run = stage_model(store, u.key)
    result = scan_unit(u, model_run / "model", folder, cfg.device)  # accumulated against the original base

    metrics = {**task_metrics(run), **scan_metrics(result.summary())}
    heads = [(t, store.unit_dir(k) / "run") for t, k in u.params["heads"]] + [(cfg.task, folder / "run")]
    scores = []
    for task, head_run in heads:
        name, value = head_score(head_run, model_run, task, cfg.max_eval_examples, cfg.max_length, cfg.device)
        metrics[f"{name}/{task_label(task)}"] = value
        scores.append((name, value))
    metrics["task_score"] = scores[-1][1]  # the stage's own task, scored like the earlier ones
    if name in ("accuracy", "exact_match"):
        metrics["accuracy"] = scores[-1][1]
    gains = [v for n, v in scores if n != "lm_loss"]  # a loss is no score to average with accuracies
    if gains:
        metrics["mean_task_score"] = sum(gains) / len(gains)
    metrics.update(forgetting_metrics(base, model_run, u.params["forgetting"], cfg.device))
    return metrics, result, {"run": folder / "run", "model": model_run, "scan": folder / SCAN_FILE}


def head_score(head_run: Path, backbone_run: Path, task: str, max_examples: int | None, max_length: int,
               device: str) -> tuple[str, float]:
    """A task's test score with the head trained on it (``head_run``) on another stage's backbone
    (``lorascope.models.transplant``): how much of task j survives the later stages. A decoder task
    (prompt/response, text) needs no head: the stage's causal LM itself is scored."""
    from lorascope.data import load_task, subsample
    from lorascope.evaluate.metrics import LM_KINDS, score_examples
    from lorascope.models import load_trained, transplant
    from lorascope.runtime import resolve_device

    dev = resolve_device(device)
    data = load_task(task)
    test = subsample(data.test, max_examples)
    donor, tokenizer = load_trained(backbone_run, device=dev)
    if data.kind in LM_KINDS:
        return score_examples(donor.to(dev), tokenizer, test, data.kind, max_length, 32, dev)
    head, tokenizer = load_trained(head_run, device=dev)
    model = transplant(head, donor).to(dev)
    return score_examples(model, tokenizer, test, data.kind, max_length, 32, dev)


ACTIONS = {"continual": run_continual}
