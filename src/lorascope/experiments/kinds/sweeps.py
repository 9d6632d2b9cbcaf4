"""``sweeps``: learning rate and training-set size, each swept with the other at its default; the
Spearman ρ between intruder count and forgetting over the units (paper: ρ = 0.971)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from lorascope.experiments.arms import ArmsGrid
from lorascope.experiments.checks import each
from lorascope.experiments.units import Unit, train_unit

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig


Rates = Annotated[list[float], each(lambda lr: lr > 0, "learning rates must be positive, got {}")]


class Grid(ArmsGrid):
    methods: list[Any] = [{"method": "lora", "rank": 8}]  # an arm may carry its own lrs
    lrs: Rates = []  # for LoRA arms
    full_lrs: Rates = []  # for full fine-tuning arms
    n_examples: Annotated[list[int], each(lambda n: n >= 1, "n_examples must be positive integers, got {}")] = []


def plan(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    units = []
    for arm in g["methods"]:
        full = arm.get("method") == "full"
        lrs = arm.get("lrs") or (g["full_lrs"] if full else g["lrs"])
        base_arm = {k: v for k, v in arm.items() if k != "lrs"}
        points = [({**base_arm, "lr": lr}, None) for lr in lrs]
        points += [(base_arm, {"max_examples": n}) for n in g["n_examples"]]
        for task in cfg.tasks:
            for seed in cfg.seeds:
                for a, extra in points or [(base_arm, None)]:
                    units.append(train_unit(cfg, a, task, seed, "sweeps", extra))
    return units


def derive(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"spearman": sweep_correlations(records)}


def sweep_correlations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman ρ between intruder count and forgetting (paper: ρ = 0.971, RoBERTa r = 8, MNLI):
    over every unit of an arm, and along each sweep line (lr at a fixed n, n at a fixed lr)."""
    from lorascope.errors import NonFiniteError
    from lorascope.evaluate.metrics import spearman

    rows = []
    swept = ("lr", "n_examples", "seed")

    def arm_of(r: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in r["unit"].items() if k not in swept}, sort_keys=True)

    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((arm_of(r), "all", None), []).append(r)
        groups.setdefault((arm_of(r), "lr", r["unit"].get("n_examples")), []).append(r)
        groups.setdefault((arm_of(r), "n_examples", r["unit"].get("lr")), []).append(r)
    for (arm, axis, fixed), recs in groups.items():
        pts = [(r["metrics"].get("n_intruders"), r["metrics"].get("forgetting")) for r in recs]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if axis != "all" and len({r["unit"].get(axis) for r in recs}) < 3:
            continue
        rho = None
        if len(pts) >= 3:
            try:
                rho = spearman([p[0] for p in pts], [p[1] for p in pts])
            except NonFiniteError:  # constant intruder counts or forgetting: undefined
                rho = None
        fixed_name = {"lr": "n_examples", "n_examples": "lr"}.get(axis)
        rows.append({"arm": json.loads(arm), "axis": axis, **({fixed_name: fixed} if fixed_name else {}),
                     "n": len(pts), "spearman_intruders_forgetting": rho})
    return rows
