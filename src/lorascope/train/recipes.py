"""Fine-tuning recipes: LoRA or full fine-tuning, for sequence classification or causal LM.

The defaults (the paper's recipe) and their checks are :class:`~lorascope.train.config.TrainConfig`'s;
LoRA wrapping and base-mutating inits are in :mod:`lorascope.train.lora`. A plain PyTorch loop over
transformers models and peft adapters; nothing hand-written beyond the loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm import tqdm

from lorascope.data import TaskData, load_task, subsample
from lorascope.data.features import encode, make_loader
from lorascope.errors import InputError, NonFiniteError
from lorascope.evaluate.metrics import causal_lm_scores, score_examples
from lorascope.io.writers import atomic_dir, atomic_write_json, guard_output
from lorascope.models import (
    RUN_FILE,
    RUN_FORMAT,
    classifier_kwargs,
    head_class,
    load_pretrained,
    load_tokenizer,
    require_decoder,
    resolve_model_path,
    set_pad_token,
)
from lorascope.runtime import library_versions, resolve_device
from lorascope.train.config import (  # noqa: F401 - re-exported: lorascope.train.recipes.<name> keeps working
    CALIBRATED_INITS,
    CALIBRATION_BATCHES,
    FULL_LR,
    LORA_LR_TIMES_ALPHA,
    METHODS,
    MUTATING_INITS,
    OBJECTIVES,
    PRECISIONS,
    TrainConfig,
    check_lora_variant,
    mutates_base,
    path_ref,
)
from lorascope.train.lora import (  # noqa: F401 - re-exported (experiments/tracking.py uses them from here)
    apply_lora,
    default_target_modules,
    lora_factors,
    lora_targets,
    save_adapter,
    unmutate_lora,
)

# ------------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_objective(objective: str, task: TaskData) -> str:
    """``classify`` / ``regress`` for labelled tasks, ``lm`` for text and prompt-response tasks."""
    labelled = task.kind in ("classification", "regression")
    if objective == "auto":
        objective = "classify" if labelled else "lm"
    if objective == "classify" and not labelled:
        raise InputError(f"task {task.name!r} has no labels; it can only train a causal LM (objective lm)")
    if objective == "lm" and labelled:
        raise InputError(f"task {task.name!r} is a {task.kind} task; use objective classify")
    return "regress" if task.kind == "regression" else objective


def build_model(cfg: TrainConfig, task: TaskData, objective: str, tokenizer: Any) -> torch.nn.Module:
    """The base model with a head for the objective (a new classifier for classify / regress)."""
    path = resolve_model_path(cfg.model)
    if objective == "lm":
        model = load_pretrained(head_class("lm"), path, require_head="causal-LM",
                                trust_remote_code=cfg.trust_remote_code)
        require_decoder(model, path)
    else:
        model = load_pretrained(head_class(objective), path, trust_remote_code=cfg.trust_remote_code,
                                **classifier_kwargs(task.labels, objective))
    set_pad_token(model, tokenizer)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- loop


def fit(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    cfg: TrainConfig,
    device: torch.device,
    bf16: bool,
    progress: bool = True,
    log_every: int = 10,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """The training loop: AdamW (no weight decay by default), linear schedule with warm-up, optional
    gradient clipping, bf16 autocast on CUDA. Returns loss and timing history.

    Each callback's ``on_step(model, step)`` is called before the first update (step 0) and after
    every optimizer step; ``on_train_loss(step, loss)``, when it has one, with each step's training
    loss just before; ``on_fit_end(model, step)``, when it has one, after the last."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr,
                                              loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                              loraplus_weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup * total), total)
    history: dict[str, Any] = {"epoch_loss": [], "epoch_seconds": [], "loss_curve": [], "steps": total}
    step, window = 0, []
    allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
    model.train()
    for cb in callbacks:
        cb.on_step(model, 0)
    for epoch in range(cfg.epochs):
        start, losses = time.perf_counter(), []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the training loss became {loss.item()} at step {step}; lower the lr")
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if allocate is not None:  # AdaLoRA: update importance scores and masks from this step's gradients
                allocate(step)
            optimizer.zero_grad(set_to_none=True)
            for cb in callbacks:
                if hasattr(cb, "on_train_loss"):
                    cb.on_train_loss(step, loss.item())
                cb.on_step(model, step)
            losses.append(loss.item())
            window.append(loss.item())
            if len(window) == log_every or step == total:
                history["loss_curve"].append([step, float(np.mean(window))])
                window = []
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["epoch_loss"].append(float(np.mean(losses)))
    model.eval()
    for cb in callbacks:
        if hasattr(cb, "on_fit_end"):
            cb.on_fit_end(model, step)
    return history


def score_run(
    model: torch.nn.Module, tokenizer: Any, task: TaskData, objective: str, cfg: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Test-set metrics right after training: accuracy (classification), Spearman and Pearson
    (regression) or per-token NLL and perplexity (LM), plus exact match for prompt/response tasks."""
    test = subsample(task.test, cfg.max_eval_examples)
    if not test:
        return {}
    batch_size = max(cfg.batch_size, 32)
    if objective == "lm":
        features = encode(test, objective, task.kind, tokenizer, cfg.max_length)
        nll, n, exact = causal_lm_scores(model, features, tokenizer, batch_size, device)
        out = {"test_loss": nll / n, "test_perplexity": math.exp(nll / n), "test_tokens": n}
        if task.kind == "prompt_response":  # greedy decoding would write the whole response
            out.update(test_exact_match=exact / len(features), test_examples=len(features))
        return out
    name, value = score_examples(model, tokenizer, test, task.kind, cfg.max_length, batch_size, device)
    return {f"test_{name}": value, "test_examples": len(test)}


def task_scorer(config: TrainConfig) -> Any:
    """``score(model) -> {test_accuracy: ...}``: :func:`score_run` on ``config``'s task, for a model in
    training (it is put back in training mode afterwards); e.g. an IntruderTracker's ``score``."""
    cfg = config.resolved()
    task = load_task(cfg.task, columns=cfg.columns, labels=cfg.labels, test=cfg.test_file)
    objective = resolve_objective(cfg.objective, task)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.trust_remote_code)

    def score(model: torch.nn.Module) -> dict[str, float]:
        training = model.training
        try:
            device = next(model.parameters()).device
            return score_run(model, tokenizer, task, objective, cfg, device)
        finally:
            model.train(training)

    return score


# -------------------------------------------------------------------------------------------- train


@dataclass
class FineTuned:
    """A fine-tuned model still in memory, with everything its run record needs."""

    model: torch.nn.Module
    tokenizer: Any
    config: TrainConfig  # resolved
    task: TaskData
    objective: str
    n_train: int
    device: torch.device
    bf16: bool
    parameters: dict[str, int]
    history: dict[str, Any]
    metrics: dict[str, Any]
    initial_lora: dict[str, torch.Tensor] | None = None  # LoRA factors at init, for base-mutating inits


def fine_tune(config: TrainConfig, *, progress: bool = True, callbacks: Sequence[Any] = ()) -> FineTuned:
    """Load the task and the model, train, and score on the test split; nothing is written.

    ``callbacks``: objects with ``on_step(model, step)`` (see :func:`fit`), e.g.
    ``lorascope.experiments.IntruderTracker``.
    """
    cfg = config.resolved()
    task = load_task(cfg.task, columns=cfg.columns, labels=cfg.labels, test=cfg.test_file)
    objective = resolve_objective(cfg.objective, task)
    train_examples = subsample(task.train, cfg.max_examples)
    device = resolve_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise InputError("bf16 autocast is only used on CUDA; use precision fp32 on CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.trust_remote_code)
    features = encode(train_examples, objective, task.kind, tokenizer, cfg.max_length)
    if not features:
        raise InputError(f"task {task.name!r}: no training example is long enough to learn from")
    seed_everything(cfg.seed)
    model = build_model(cfg, task, objective, tokenizer)
    loader = make_loader(features, cfg.batch_size, tokenizer, shuffle=True, seed=cfg.seed)
    initial = None
    if cfg.method == "lora":
        calibration = None
        if cfg.lora_options.get("init_lora_weights") in CALIBRATED_INITS:  # CorDA, LoRA-GA read data first
            model.to(device)
            ordered = make_loader(features, cfg.batch_size, tokenizer, shuffle=False)
            calibration = [{k: v.to(device) for k, v in b.items()}
                           for b in itertools.islice(ordered, CALIBRATION_BATCHES)]
        model = apply_lora(model, cfg, objective, total_steps=cfg.epochs * len(loader), calibration=calibration)
        initial = lora_factors(model) if mutates_base(cfg) else None
    model.to(device)
    trainable, total = count_parameters(model)
    history = fit(model, loader, cfg, device, bf16, progress, callbacks=callbacks)
    metrics = {**score_run(model, tokenizer, task, objective, cfg, device), "train_loss": history["epoch_loss"][-1]}
    return FineTuned(model, tokenizer, cfg, task, objective, len(train_examples), device, bf16,
                     {"trainable": trainable, "total": total}, history, metrics, initial)


def write_run(ft: FineTuned, folder: str | Path, wall_time_s: float | None = None) -> dict:
    """Save a fine-tuned model as a run folder (``adapter/`` or ``model/``, ``tokenizer/``, ``run.json``)
    into ``folder`` and return the run record."""
    folder, cfg = Path(folder), ft.config
    layout = {"tokenizer": "tokenizer", "adapter": None, "model": None}
    ft.tokenizer.save_pretrained(folder / "tokenizer")
    if cfg.method == "lora":
        save_adapter(ft.model, folder / "adapter", ft.initial_lora)
        layout["adapter"] = "adapter"
    else:
        ft.model.save_pretrained(folder / "model")
        ft.tokenizer.save_pretrained(folder / "model")
        layout["model"] = "model"
    record = {
        "format": RUN_FORMAT,
        "model": path_ref(cfg.model),
        "method": cfg.method,
        "objective": ft.objective,
        "task": {**ft.task.describe(), "n_train_used": ft.n_train},
        "config": dataclasses.asdict(cfg),
        "target_modules": (cfg.target_modules if cfg.target_modules is not None else
                           lora_targets(ft.model) if cfg.method == "lora" else None),
        "seed": cfg.seed,
        "device": str(ft.device),
        "precision": "bf16" if ft.bf16 else "fp32",
        "parameters": ft.parameters,
        "metrics": ft.metrics,
        "history": ft.history,
        "wall_time_s": wall_time_s if wall_time_s is not None else sum(ft.history["epoch_seconds"]),
        "versions": library_versions(),
        "layout": layout,
    }
    atomic_write_json(folder / RUN_FILE, record)
    return record


def train(
    config: TrainConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict:
    """Fine-tune ``config.model`` on ``config.task`` and write a run folder to ``out``.

    Returns the run record (also written as ``out/run.json``). The folder is written atomically: an
    existing ``out`` is refused before training unless ``overwrite``, and on error nothing is left at
    ``out``. Deterministic for a given seed on CPU. ``callbacks``: see :func:`fine_tune`.
    """
    start = time.perf_counter()
    guard_output(out, {"model": config.model, "task": config.task, "test file": config.test_file})
    with atomic_dir(out, overwrite) as tmp:
        ft = fine_tune(config, progress=progress, callbacks=callbacks)
        record = write_run(ft, tmp, wall_time_s=time.perf_counter() - start)
    return record
