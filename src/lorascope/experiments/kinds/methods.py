"""``methods`` (paper §3-4): full fine-tuning, LoRA over ranks and α rules, and the PEFT variants."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import field_validator, model_validator

from lorascope.experiments.arms import VARIANTS, ArmsGrid, parse_alpha
from lorascope.experiments.checks import checked, each
from lorascope.experiments.units import Unit, train_unit

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig

EXTRA_VARIANTS = [v for v in VARIANTS if v not in ("lora", "full")]
Ranks = Annotated[list[int], each(lambda r: r >= 1, "ranks must be positive integers, got {}")]


class Grid(ArmsGrid):
    full: bool = True  # one full fine-tune
    full_lr: float | None = None
    ranks: Ranks = [1, 2, 4, 8, 16, 64]  # plain LoRA at each rank and α rule
    alphas: list[Any] = ["2r"]
    # dora, pissa, loraplus, lora-a-frozen at each variant rank
    variants: Annotated[list[str], each(lambda v: v in EXTRA_VARIANTS,
                                        f"unknown variant {{}}; choose from {EXTRA_VARIANTS}")] = []
    variant_ranks: Ranks | None = None  # default: ranks
    loraplus_lr_ratio: float | None = None

    @field_validator("alphas")
    @classmethod
    def _alpha_rules(cls, alphas: list[Any]) -> list[Any]:
        for a in alphas:
            checked(parse_alpha, a, 1)
        return alphas

    @model_validator(mode="after")
    def _variant_ranks(self) -> Grid:
        if self.variant_ranks is None:
            self.variant_ranks = list(self.ranks)
        return self


def plan(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    arms: list[dict[str, Any]] = []
    if g["full"]:
        arms.append({"method": "full", **({"lr": g["full_lr"]} if "full_lr" in g else {})})
    arms += [{"method": "lora", "rank": r, "alpha": a} for r in g["ranks"] for a in g["alphas"]]
    for v in g["variants"]:
        for r in g["variant_ranks"]:
            arm = {"method": v, "rank": r}
            if v == "loraplus" and "loraplus_lr_ratio" in g:
                arm["loraplus_lr_ratio"] = g["loraplus_lr_ratio"]
            arms.append(arm)
    arms += g["methods"]
    return [train_unit(cfg, arm, task, seed, "methods") for task in cfg.tasks for seed in cfg.seeds
            for arm in arms]
