"""A unit: one piece of work of a study, described by plain JSON and keyed by the hash of it.

The same settings always give the same key, so a finished unit is never run again; the key depends on
the description only (``to_dict``), never on which module planned it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorascope.experiments.arms import arm_train_fields
from lorascope.scanning.options import ScanOptions
from lorascope.train.config import TrainConfig

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig


@dataclass(frozen=True)
class Unit:
    study: str  # the experiment kind
    action: str  # train | mitigate | continual
    labels: dict[str, Any]  # the report's "unit": method, rank, alpha, task, lr, n_examples, seed, lam, ...
    train: dict[str, Any]  # TrainConfig fields (model None: the previous continual stage's model)
    params: dict[str, Any]  # base model, scan and forgetting settings, and the action's own settings
    deps: tuple[str, ...] = field(default_factory=tuple)  # keys of the units whose folders this one reads

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "action": self.action, "labels": self.labels, "train": self.train,
                "params": self.params, "deps": list(self.deps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(d["study"], d["action"], d["labels"], d["train"], d["params"], tuple(d.get("deps", ())))

    @property
    def key(self) -> str:
        """sha256 of the canonical JSON of the description, first 16 hex digits."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def task_label(task: str) -> str:
    """A short name for a task: built-in names as given, files and folders by their stem."""
    p = Path(task)
    return p.stem if p.exists() else task


def scan_params(scan: ScanOptions) -> dict[str, Any]:
    """The scan settings a study records (fingerprint, unit keys): the five it always had, plus any
    other ``ScanOptions`` setting given a non-default value, so stores written before stay valid."""
    d = {"k": scan.k, "epsilon": scan.epsilon, "modules": scan.modules, "side": scan.side, "dtype": scan.dtype}
    d.update({f.name: getattr(scan, f.name) for f in fields(ScanOptions)
              if f.name not in d and getattr(scan, f.name) != f.default})
    return d


def shared_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """What every unit of a study carries: the base model, the scan and the forgetting settings."""
    return {"base": cfg.model, "scan": scan_params(cfg.scan),
            "forgetting": dataclasses.asdict(cfg.forgetting)}


def train_unit(cfg: ExperimentConfig, arm: dict[str, Any], task: str, seed: int, study: str,
               extra: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Unit:
    """A fine-tune of ``arm`` on ``task`` with ``seed`` (``extra``: more TrainConfig fields)."""
    arm_labels, fields = arm_train_fields(arm, f"{cfg.source or 'config'} [grid]")
    train = {**cfg.train, **fields, **(extra or {}), "model": cfg.model, "task": task, "seed": seed}
    resolved = TrainConfig(**train).resolved()  # checks every value now, not in the middle of a run
    labels = {**arm_labels, "task": task_label(task), "lr": resolved.lr, "n_examples": resolved.max_examples,
              "seed": seed}
    return Unit(study, "train", labels, train, {**shared_params(cfg), **(params or {})})


def dedupe(units: list[Unit]) -> list[Unit]:
    """The units in order, each key once (dependencies are planned before their dependants)."""
    seen: dict[str, Unit] = {}
    for u in units:
        seen.setdefault(u.key, u)
    return list(seen.values())
