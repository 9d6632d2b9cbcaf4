"""Fine-tuning recipes: LoRA or full fine-tuning, for sequence classification or causal LM.

Defaults follow the paper's recipe (Shuttleworth et al., arXiv 2410.21228), each can be overridden:

- AdamW, no weight decay; linear schedule with 6% warm-up; batch 16;
- LoRA with alpha = 2r and lr * alpha held at 2.4e-3, i.e. lr = 2.4e-3 / alpha; the update is
  W + (alpha / r) B A, or W + (alpha / sqrt(r)) B A with rsLoRA;
- LoRA on every linear layer of the transformer blocks (not the embeddings, pooler or head);
- full fine-tuning at lr = 1e-5.

A plain PyTorch loop over transformers models and peft adapters; nothing hand-written beyond the loop.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import LoraConfig, TaskType, get_peft_model
from tqdm import tqdm

import lorascope
from lorascope.errors import InputError, NonFiniteError
from lorascope.io.writers import atomic_dir, atomic_write_json
from lorascope.train.data import TaskData, load_task, subsample
from lorascope.train.features import (
    encode_classification,
    encode_prompt_response,
    encode_text_blocks,
    make_loader,
    pad_id_of,
)
from lorascope.train.runs import (
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

LORA_LR_TIMES_ALPHA = 2.4e-3
FULL_LR = 1e-5
METHODS = ("lora", "full")
OBJECTIVES = ("auto", "classify", "lm")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields are filled by :meth:`resolved`."""

    model: str
    task: str
    method: str = "lora"
    objective: str = "auto"  # auto: classify for labelled tasks, lm for text / prompt-response tasks
    rank: int = 8
    alpha: float | None = None  # None -> 2 * rank
    rslora: bool = False
    target_modules: list[str] | str | None = None  # None -> every linear layer of the blocks
    lora_dropout: float = 0.0
    lora_options: dict[str, Any] = field(default_factory=dict)  # more peft LoraConfig arguments: use_dora, ...
    loraplus_lr_ratio: float | None = None  # LoRA+ (Hayou et al. 2024): lr of B = ratio * lr of A
    freeze_lora_a: bool = False  # train B only, A stays at its random init (paper §7 ablation)
    lr: float | None = None  # None -> 2.4e-3 / alpha (LoRA) or 1e-5 (full)
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    warmup: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seed: int = 0
    max_examples: int | None = None
    max_eval_examples: int | None = None
    columns: str | dict[str, str] | None = None
    labels: list[str] | None = None
    test_file: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast (and tf32) on CUDA, fp32 on CPU
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in run.json

    def resolved(self) -> TrainConfig:
        """A copy with defaults filled in and every value checked."""
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("rank", "epochs", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise InputError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        check_lora_variant(self)
        alpha = float(self.alpha) if self.alpha is not None else 2.0 * self.rank
        if self.lr is not None:
            lr = self.lr
        else:
            lr = LORA_LR_TIMES_ALPHA / alpha if self.method == "lora" else FULL_LR
        if lr <= 0:
            raise InputError(f"lr must be positive, got {lr}")
        test_file = _path_ref(self.test_file) if self.test_file is not None else None
        labels = list(self.labels) if self.labels is not None else None
        return dataclasses.replace(self, model=str(self.model), task=_path_ref(self.task), test_file=test_file,
                                   labels=labels, alpha=alpha, lr=lr)


# ------------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda asked for, but CUDA is not available")
    return device


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


def versions() -> dict[str, str]:
    import peft

    return {
        "lorascope": lorascope.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }


BLOCK_LINEAR = re.compile(r".*\.\d+\.")  # inside a numbered transformer block: layer.3., layers.3., h.3.


def default_target_modules(model: torch.nn.Module) -> str:
    """A peft regex for every linear layer inside the numbered transformer blocks (attention and MLP),
    leaving out embeddings, pooler and heads. Conv1D (GPT-2) counts as linear."""
    leaves = set()
    for name, module in model.named_modules():
        if BLOCK_LINEAR.match(name) and type(module).__name__ in ("Linear", "Conv1D"):
            leaves.add(name.rsplit(".", 1)[-1])
    if not leaves:
        raise InputError("found no linear layers inside transformer blocks; pass target_modules")
    return r".*\.\d+\.(?:.*\.)?(?:" + "|".join(sorted(leaves)) + r")$"


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, objective: str) -> torch.nn.Module:
    """Wrap with peft LoRA. For classification the head is trained and saved (``modules_to_save``), and
    so is any other module the checkpoint lacked (e.g. BERT's pooler when starting from an MLM)."""
    target = cfg.target_modules if cfg.target_modules is not None else default_target_modules(model)
    new_modules = sorted({key.rsplit(".", 1)[0] for key in getattr(model, "lorascope_new_weights", [])})
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if objective == "lm" else TaskType.SEQ_CLS,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.rslora,
        target_modules=target,
        modules_to_save=new_modules or None,
        bias="none",
        **cfg.lora_options,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise InputError(f"cannot apply LoRA with target modules {target!r}: {e}") from e
    if cfg.freeze_lora_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


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


def encode(task_examples: list, objective: str, kind: str, tokenizer: Any, max_length: int) -> list:
    if objective != "lm":
        return encode_classification(task_examples, tokenizer, max_length)
    if kind == "prompt_response":
        return encode_prompt_response(task_examples, tokenizer, max_length)
    return encode_text_blocks(task_examples, tokenizer, max_length)


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
    every optimizer step; ``on_fit_end(model, step)``, when it has one, after the last."""
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
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for cb in callbacks:
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
    # Imported here: lorascope.evaluate builds on lorascope.train, not the other way round.
    from lorascope.evaluate.metrics import causal_lm_scores, predict, task_score

    test = subsample(task.test, cfg.max_eval_examples)
    if not test:
        return {}
    batch_size = max(cfg.batch_size, 32)
    if objective == "lm":
        features = encode(test, objective, task.kind, tokenizer, cfg.max_length)
        nll, n, exact = causal_lm_scores(model, features, pad_id_of(tokenizer), batch_size, device)
        out = {"test_loss": nll / n, "test_perplexity": math.exp(nll / n), "test_tokens": n}
        if task.kind == "prompt_response":  # greedy decoding would write the whole response
            out.update(test_exact_match=exact / len(features), test_examples=len(features))
        return out
    features = encode_classification(test, tokenizer, cfg.max_length)
    logits = predict(model, features, pad_id_of(tokenizer), batch_size, device)
    name, value = task_score(logits, [e.label for e in test], task.kind)
    return {f"test_{name}": value, "test_examples": len(test)}


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
    initial = None
    if cfg.method == "lora":
        model = apply_lora(model, cfg, objective)
        initial = lora_factors(model) if mutates_base(cfg) else None
    model.to(device)
    trainable, total = count_parameters(model)
    loader = make_loader(features, cfg.batch_size, pad_id_of(tokenizer), shuffle=True, seed=cfg.seed)
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
        "model": _model_ref(cfg.model),
        "method": cfg.method,
        "objective": ft.objective,
        "task": {**ft.task.describe(), "n_train_used": ft.n_train},
        "config": dataclasses.asdict(cfg),
        "target_modules": (cfg.target_modules if cfg.target_modules is not None else
                           _lora_targets(ft.model) if cfg.method == "lora" else None),
        "seed": cfg.seed,
        "device": str(ft.device),
        "precision": "bf16" if ft.bf16 else "fp32",
        "parameters": ft.parameters,
        "metrics": ft.metrics,
        "history": ft.history,
        "wall_time_s": wall_time_s if wall_time_s is not None else sum(ft.history["epoch_seconds"]),
        "versions": versions(),
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
    with atomic_dir(out, overwrite) as tmp:
        ft = fine_tune(config, progress=progress, callbacks=callbacks)
        record = write_run(ft, tmp, wall_time_s=time.perf_counter() - start)
    return record


def _path_ref(value: str | Path) -> str:
    """Local files and folders as absolute paths (a run is read back from anywhere), names as given."""
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


def _model_ref(model: str) -> str:
    """Local paths are stored absolute, so the run can be loaded from anywhere; hub ids as given."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def _lora_targets(model: torch.nn.Module) -> list[str]:
    """The module names peft actually wrapped with LoRA (short leaf names)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")})


# ---------------------------------------------------------------------------------- LoRA variants

# Set by the grid itself; everything else in lora_options goes to peft's LoraConfig as given.
_LORA_FIXED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "modules_to_save", "bias",
               "task_type"}
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")  # inits that move part of W into the adapter


def check_lora_variant(cfg: TrainConfig) -> None:
    """LoRA-only options on a LoRA run; lora_options are LoraConfig fields the recipe does not set."""
    variant = cfg.lora_options or cfg.loraplus_lr_ratio is not None or cfg.freeze_lora_a
    if variant and cfg.method != "lora":
        raise InputError("lora_options, loraplus_lr_ratio and freeze_lora_a need method lora")
    unknown = sorted(set(cfg.lora_options) - set(LoraConfig.__dataclass_fields__))
    fixed = sorted(set(cfg.lora_options) & _LORA_FIXED)
    if unknown or fixed:
        raise InputError(f"lora_options: {unknown or fixed} are not LoraConfig arguments the recipe leaves open")
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise InputError(f"loraplus_lr_ratio must be positive, got {cfg.loraplus_lr_ratio}")
    if mutates_base(cfg) and (cfg.freeze_lora_a or cfg.lora_options.get("use_dora")):
        raise InputError(f"init_lora_weights={cfg.lora_options['init_lora_weights']!r} cannot be combined with "
                         "DoRA or a frozen A")


def mutates_base(cfg: TrainConfig) -> bool:
    init = cfg.lora_options.get("init_lora_weights", True)
    return isinstance(init, str) and init.lower().startswith(MUTATING_INITS)


def lora_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA A and B tensors of a peft model, keyed as in its saved adapter."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def unmutate_lora(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter trained from a PiSSA-style init, as a plain LoRA on the *unchanged* base.

    The init set the base weight to W_res = W - s B0 A0, so the trained model is
    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]: rank 2r, same scaling s (alpha doubled,
    or times sqrt 2 with rsLoRA). PEFT's ``subtract_mutated_init``, keeping ``modules_to_save`` tensors.
    """
    state = dict(state)
    for key, init in initial.items():
        trained = state[key].to(init.device)
        state[key] = torch.cat([trained, init], 0) if ".lora_A." in key else torch.cat([trained, -init], 1)
    config = dict(config)
    factor = math.sqrt(2) if config.get("use_rslora") else 2.0
    config.update(r=2 * config["r"], lora_alpha=factor * config["lora_alpha"], init_lora_weights=True)
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}
    return state, config


def save_adapter(model: torch.nn.Module, folder: Path, initial: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained``; an adapter from a base-mutating init is rewritten by :func:`unmutate_lora`."""
    import json

    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    if initial is None:
        return
    weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    state, config = unmutate_lora(load_file(str(weights)), initial, json.loads(config_file.read_text()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    atomic_write_json(config_file, config)
