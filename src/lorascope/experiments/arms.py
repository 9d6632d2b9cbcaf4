"""The small languages of a grid: method names (variants of LoRA and full fine-tuning) and α rules.

An arm is one table of a grid's ``methods`` list, e.g. ``{method = "lora", rank = 8, alpha = "rslora"}``;
:func:`arm_train_fields` turns it into the unit's labels and its ``TrainConfig`` fields.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import field_validator

from lorascope.errors import InputError
from lorascope.experiments.checks import Table, checked, validate

# Method names and their TrainConfig fields live with TrainConfig (lorascope train --method takes them too).
from lorascope.train.config import DEFAULT_LORAPLUS_RATIO, VARIANTS, variant  # noqa: F401 - VARIANTS re-exported


class Arm(Table):
    """The keys an arm may have (sweeps also take ``lrs``); values are checked by :func:`arm_train_fields`."""

    method: Any = None
    rank: Any = None
    alpha: Any = None
    lr: Any = None
    loraplus_lr_ratio: Any = None
    lrs: list[float] | None = None


ARM_KEYS = set(Arm.model_fields)


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

    Arm keys: ``method`` (a name of ``train.config.VARIANTS``: full, lora, rslora, dora, pissa, olora,
    loraplus, lora-a-frozen, adalora, vera), ``rank``, ``alpha`` (an α
    rule, see :func:`parse_alpha`), ``lr``, ``loraplus_lr_ratio``; sweeps also take ``lrs``.
    """
    if not isinstance(arm, dict):
        raise InputError(f"{where}: a method must be a table like {{method = \"lora\", rank = 8}}, "
                         f"got {arm!r}")
    validate(Arm, arm, f"{where}: method {arm}")
    name = arm.get("method")
    if name not in VARIANTS:
        raise InputError(f"{where}: method must be one of {list(VARIANTS)}, got {name!r}")
    fields = variant(name)
    labels: dict[str, Any] = {"method": name}
    if fields["method"] == "lora":
        rank = arm.get("rank", 8)
        if not isinstance(rank, int) or rank < 1:
            raise InputError(f"{where}: rank must be a positive integer, got {rank!r}")
        alpha, rslora = parse_alpha(arm.get("alpha", "2r"), rank)
        rslora = rslora or fields.get("rslora", False)
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


class ArmsGrid(Table):
    """A grid whose ``methods`` is a list of arms (every kind's grid has one)."""

    methods: list[Any] = []

    @field_validator("methods")
    @classmethod
    def _arms(cls, arms: list[Any]) -> list[Any]:
        for i, arm in enumerate(arms):
            checked(arm_train_fields, arm, f"methods[{i}]")
        return arms
