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
import json
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import create_model, field_validator
from pydantic.dataclasses import dataclass as checked_dataclass

from lorascope.errors import InputError
from lorascope.experiments.aliases import resolve_model, resolve_path
from lorascope.experiments.checks import STRICT, Table, validate
from lorascope.experiments.kinds import KINDS as KIND_MODULES
from lorascope.experiments.units import scan_params
from lorascope.scanning.options import ScanOptions
from lorascope.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

KINDS = tuple(KIND_MODULES)
FORGETTING_METRICS = ("sts", "drift", "pseudo-loss", "lm-loss")  # lorascope.evaluate.METRICS that measure it
# The unit grid sets these; [train] may not.
GRID_FIELDS = ("model", "task", "method", "rank", "alpha", "rslora", "lora_options", "loraplus_lr_ratio",
               "freeze_lora_a", "seed")


# The study's scans: ``ScanOptions`` with one default of its own. Matrices inside the numbered
# transformer blocks are what LoRA adapts, so LoRA and full FT are compared on the same matrices (a
# full fine-tune also changes the pooler and the head).
STUDY_MODULES = r"\.\d+\."


@checked_dataclass(config=STRICT)
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


class ConfigFile(Table):
    """The top level of a config file; the tables are checked by their own models."""

    kind: str
    model: str
    name: str | int | float | None = None  # name = 2024 is a name
    tasks: list[str] | None = None
    task: str | None = None
    seeds: list[int] | None = None
    seed: int = 0
    out: str | None = None
    train: dict[str, Any] = {}
    scan: dict[str, Any] = {}
    forgetting: dict[str, Any] = {}
    grid: dict[str, Any] = {}

    @field_validator("kind")
    @classmethod
    def _kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return kind


def _train_table() -> type[Table]:
    """The [train] table: every TrainConfig field the grid does not set, with TrainConfig's types."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {name: (hints[name], None) for name in TrainConfig.__dataclass_fields__ if name not in GRID_FIELDS}
    return create_model("TrainTable", __base__=Table, **fields)


TrainTable = _train_table()


@dataclass
class ExperimentConfig:
    kind: str
    name: str
    model: str
    tasks: list[str]
    seeds: list[int]
    train: dict[str, Any]
    scan: ScanOptions
    forgetting: ForgettingSettings
    grid: dict[str, Any]
    out: str | None = None
    source: str | None = None  # the config file

    def fingerprint(self) -> dict[str, Any]:
        """What every unit shares: a store refuses to continue under a different one. The grid may
        grow (more ranks, more λ) without invalidating finished units."""
        d = {"kind": self.kind, "model": self.model, "train": self.train, "scan": scan_params(self.scan),
             "forgetting": asdict(self.forgetting)}
        if self.kind == "continual":
            d["tasks"] = self.tasks
        return json.loads(json.dumps(d, sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({**asdict(self), "scan": scan_params(self.scan)}, sort_keys=True))


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
    """Check a config dict (as read from TOML); paths are resolved against ``root``.

    Every table is a pydantic model with ``extra="forbid"``: an unknown key, or a value of the wrong
    type, is an InputError naming the file, the table and the key. Values are kept as written (an int
    stays an int), so the units they make hash as they always did.
    """
    where = source or "config"
    raw = copy.deepcopy(raw)
    top = validate(ConfigFile, raw, where)
    kind = top.kind
    tasks = top.tasks if top.tasks is not None else [top.task] if top.task is not None else None
    if not tasks:
        raise InputError(f"{where}: tasks must be a non-empty list of task names or files")
    if getattr(KIND_MODULES[kind], "SEQUENCE", False) and len(tasks) < 2:
        raise InputError(f"{where}: a {kind} study needs at least two tasks, in order")
    seeds = top.seeds if top.seeds is not None else [top.seed]
    if not seeds:
        raise InputError(f"{where}: seeds must be a non-empty list of integers")

    train = dict(top.train)
    fixed = sorted(set(train) & set(GRID_FIELDS))
    if fixed:
        raise InputError(f"{where} [train]: {fixed} are set by the study itself (top level or [grid])")
    validate(TrainTable, train, f"{where} [train]")  # checked; the values are kept as written
    for key in ("test_file",):
        if isinstance(train.get(key), str):
            train[key] = resolve_path(train[key], root)
    scan = ScanOptions.from_mapping({"modules": STUDY_MODULES, **raw.get("scan", {})}, f"{where} [scan]")
    model = resolve_model(top.model, root)
    forgetting = validate(ForgettingSettings, top.forgetting, f"{where} [forgetting]")
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

    grid_table = validate(KIND_MODULES[kind].Grid, top.grid, f"{where} [grid] ({kind})")
    grid = {**grid_table.model_dump(exclude_none=True), **top.grid}  # defaults filled, values as written
    return ExperimentConfig(
        kind=kind, name=str(top.name) if top.name is not None else default_name, model=model,
        tasks=[resolve_path(t, root) for t in tasks], seeds=seeds, train=train, scan=scan,
        forgetting=forgetting, grid=grid, out=resolve_path(top.out, root, must_exist=False) if top.out else None,
        source=source,
    )


def _no_unknown(d: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _dataclass_from(cls: type, values: dict[str, Any], where: str) -> Any:
    _no_unknown(values, set(cls.__dataclass_fields__), where)
    return cls(**values)


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
