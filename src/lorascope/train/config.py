"""``TrainConfig``: everything that defines a fine-tuning run, with its defaults and their help text.

The single place of training defaults: the recipe, ``lorascope train`` (its options and help are read
from the fields here) and experiment configs (``[train]``) all take them from this class. Only the
standard library is imported, so the command line can read the defaults without importing torch.

Defaults follow the paper's recipe (Shuttleworth et al., arXiv 2410.21228):

- AdamW, no weight decay; linear schedule with 6% warm-up; batch 16;
- LoRA with alpha = 2r and lr * alpha held at 2.4e-3, i.e. lr = 2.4e-3 / alpha; the update is
  W + (alpha / r) B A, or W + (alpha / sqrt(r)) B A with rsLoRA;
- LoRA on every linear layer of the transformer blocks (not the embeddings, pooler or head);
- full fine-tuning at lr = 1e-5.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from lorascope.errors import InputError

LORA_LR_TIMES_ALPHA = 2.4e-3
FULL_LR = 1e-5
METHODS = ("lora", "full")
TUNERS = ("lora", "adalora", "vera")  # the PEFT tuner of an adapter run
DEFAULT_LORAPLUS_RATIO = 16.0  # Hayou et al. 2024 recommend 2^4 for most tasks
# Method names (``lorascope train --method``, experiment arms): plain LoRA or full fine-tuning plus the
# TrainConfig fields that make the variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "rslora": True},  # Kalajdzievski 2023: scale alpha/sqrt(r)
    "dora": {"method": "lora", "lora_options": {"use_dora": True}},  # Liu et al. 2024
    "pissa": {"method": "lora", "lora_options": {"init_lora_weights": "pissa"}},  # Meng et al. 2024
    "olora": {"method": "lora", "lora_options": {"init_lora_weights": "olora"}},  # Büyükakyüz 2024
    "milora": {"method": "lora", "lora_options": {"init_lora_weights": "milora"}},  # Wang et al. 2024 (ours)
    "mica": {"method": "lora", "lora_options": {"init_lora_weights": "mica"}},  # peft: minor B frozen, A = 0
    "corda": {"method": "lora", "lora_options": {"init_lora_weights": "corda"}},  # Yang et al. 2024 (IPM)
    "lora-ga": {"method": "lora", "lora_options": {"init_lora_weights": "lora_ga"}},  # Wang et al. 2024
    "loraplus": {"method": "lora", "loraplus_lr_ratio": DEFAULT_LORAPLUS_RATIO},  # Hayou et al. 2024
    "lora-a-frozen": {"method": "lora", "freeze_lora_a": True},  # paper §7: only B is trained
    "adalora": {"method": "lora", "tuner": "adalora"},  # Zhang et al. 2023: ranks re-allocated in training
    "vera": {"method": "lora", "tuner": "vera"},  # Kopiczko et al. 2024: frozen shared A, B; trained scalings
}
OBJECTIVES = ("auto", "classify", "lm")
PRECISIONS = ("auto", "fp32", "bf16")
MILORA = "milora"  # minor singular components (not a peft init: train.lora.milora_init)
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", MILORA)  # LoRA inits that move part of W into the adapter
CALIBRATED_INITS = ("corda", "lora_ga")  # peft inits that first run the model on training batches
CALIBRATION_BATCHES = 8  # of the training set, in order: CorDA's input covariance, LoRA-GA's gradient
# Set by the recipe itself; everything else in lora_options goes to peft's LoraConfig as given.
LORA_FIXED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "modules_to_save", "bias",
              "task_type"}
TUNER_FIXED = {"target_r", "init_r", "total_step", "vera_dropout"}  # AdaLoRA and VeRA fields the recipe sets


def _option(help: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields are filled by :meth:`resolved`."""

    model: str = _option("Base model: HF folder, hub id, .gguf file, or a full / merged run.")
    task: str = _option("Built-in task (sst2 agnews rte subj trec rt-polarity stsb bbc wikitext2 state-union "
                        "arithmetic), a .tsv/.csv/.jsonl/.txt file or folder, or hf:NAME[:CONFIG].")
    method: str = _option("lora or full.", "lora")
    tuner: str = _option("PEFT tuner of a lora run: lora, adalora (AdaLoRA: --rank is the target average rank, "
                         "starting from 1.5x) or vera (VeRA: no alpha).", "lora")
    objective: str = _option("auto (classify for labelled tasks, lm for text and prompt/response tasks), "
                             "classify (sequence classification) or lm (causal LM).", "auto")
    rank: int = _option("LoRA rank r.", 8)
    alpha: float | None = _option("LoRA alpha [default: 2r].", None)
    rslora: bool = _option("Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r.", False)
    target_modules: list[str] | str | None = _option(
        "Module names (comma-separated on the command line), a peft regex or all-linear [default: every "
        "linear layer of the transformer blocks].", None)
    lora_dropout: float = _option("Dropout on the LoRA branch.", 0.0)
    lora_options: dict[str, Any] = _option("More peft LoraConfig arguments: use_dora, init_lora_weights, ...",
                                           factory=dict)
    loraplus_lr_ratio: float | None = _option("LoRA+ (Hayou et al. 2024): lr of B = ratio * lr of A.", None)
    freeze_lora_a: bool = _option("Train B only, A stays at its random init (paper §7 ablation).", False)
    lr: float | None = _option("Learning rate [default: 2.4e-3/alpha for LoRA, 1e-5 full].", None)
    epochs: int = _option("Training epochs.", 3)
    batch_size: int = _option("Batch size.", 16)
    max_length: int = _option("Truncate (classification) or block (LM) length in tokens.", 128)
    warmup: float = _option("Warm-up fraction of the steps (linear schedule).", 0.06)
    weight_decay: float = _option("AdamW weight decay.", 0.0)
    max_grad_norm: float = _option("Gradient clipping norm (0: off).", 1.0)
    seed: int = _option("Seed for initialisation, dropout and data order.", 0)
    max_examples: int | None = _option("Train on a seeded subset of this many examples.", None)
    max_eval_examples: int | None = _option("Score on at most this many test examples.", None)
    columns: str | dict[str, str] | None = _option(
        "Column mapping for files, e.g. text=review,label=stars (roles: text, text_pair, label, prompt, "
        "response).", None)
    labels: list[str] | None = _option("The label set, in order (comma-separated on the command line) "
                                       "[default: sorted].", None)
    test_file: str | None = _option("Test file for a file task [default: seeded 10% split].", None)
    device: str = _option("auto, cpu or cuda.", "auto")
    precision: str = _option("auto (bf16 autocast + tf32 on CUDA, fp32 on CPU), fp32, bf16.", "auto")
    trust_remote_code: bool = _option("Allow model code from the checkpoint.", False)
    extra: dict[str, Any] = _option("Free-form notes kept in run.json.", factory=dict)

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
        test_file = path_ref(self.test_file) if self.test_file is not None else None
        labels = list(self.labels) if self.labels is not None else None
        return dataclasses.replace(self, model=str(self.model), task=path_ref(self.task), test_file=test_file,
                                   labels=labels, alpha=alpha, lr=lr)


def variant(name: str) -> dict[str, Any]:
    """The TrainConfig fields of a method name of :data:`VARIANTS` (a fresh copy)."""
    import copy

    if name not in VARIANTS:
        raise InputError(f"method must be one of {', '.join(VARIANTS)}, got {name!r}")
    return copy.deepcopy(VARIANTS[name])


def defaults() -> dict[str, Any]:
    """Field name -> default of every :class:`TrainConfig` field that has one (factories called)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def help_texts() -> dict[str, str]:
    """Field name -> help text of every :class:`TrainConfig` field."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def path_ref(value: str | Path) -> str:
    """Local files and folders as absolute paths (a run is read back from anywhere), names as given."""
    return str(Path(value).resolve()) if Path(value).exists() else str(value)


# ---------------------------------------------------------------------------------- LoRA variants


def is_mutating_init(init: Any) -> bool:
    """Whether a peft ``init_lora_weights`` value moves part of W into the adapter (PiSSA, OLoRA, ...)."""
    return isinstance(init, str) and init.lower().startswith(MUTATING_INITS)


def mutates_base(cfg: TrainConfig) -> bool:
    return is_mutating_init(cfg.lora_options.get("init_lora_weights", True))


def check_lora_variant(cfg: TrainConfig) -> None:
    """LoRA-only options on a LoRA run; lora_options are LoraConfig fields the recipe does not set."""
    import peft  # the fields peft knows, read only when a config is checked

    variant = cfg.lora_options or cfg.loraplus_lr_ratio is not None or cfg.freeze_lora_a or cfg.tuner != "lora"
    if variant and cfg.method != "lora":
        raise InputError("lora_options, loraplus_lr_ratio, freeze_lora_a and tuner need method lora")
    if cfg.tuner not in TUNERS:
        raise InputError(f"tuner must be one of {TUNERS}, got {cfg.tuner!r}")
    config_class = {"lora": peft.LoraConfig, "adalora": peft.AdaLoraConfig, "vera": peft.VeraConfig}[cfg.tuner]
    unknown = sorted(set(cfg.lora_options) - set(config_class.__dataclass_fields__))
    fixed = sorted(set(cfg.lora_options) & (LORA_FIXED | TUNER_FIXED))
    if unknown or fixed:
        raise InputError(f"lora_options: {unknown or fixed} are not {config_class.__name__} arguments the recipe "
                         "leaves open")
    if cfg.tuner != "lora" and (cfg.rslora or cfg.loraplus_lr_ratio is not None or cfg.freeze_lora_a
                                or mutates_base(cfg) or cfg.lora_options.get("use_dora")):
        raise InputError(f"tuner {cfg.tuner}: rsLoRA, LoRA+, a frozen A, DoRA and base-mutating inits are LoRA "
                         "variants; use tuner lora")
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise InputError(f"loraplus_lr_ratio must be positive, got {cfg.loraplus_lr_ratio}")
    if mutates_base(cfg) and (cfg.freeze_lora_a or cfg.lora_options.get("use_dora")):
        raise InputError(f"init_lora_weights={cfg.lora_options['init_lora_weights']!r} cannot be combined with "
                         "DoRA or a frozen A")
