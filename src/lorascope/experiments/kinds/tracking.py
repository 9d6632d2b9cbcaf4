"""``tracking`` (paper §4, intruders appear during training): per arm, a fine-tune watched by an
``IntruderTracker`` every ``every`` steps; the last tracked scan must agree with the post-hoc scan."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import field_validator

from lorascope.experiments.arms import ArmsGrid
from lorascope.experiments.units import Unit, train_unit
from lorascope.scanning.options import ScanOptions

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig
    from lorascope.train.config import TrainConfig


class Grid(ArmsGrid):
    methods: list[Any] = [{"method": "lora", "rank": 8}, {"method": "full"}]
    every: int = 50  # steps between scans
    tensorboard: bool = True  # write units/KEY/tensorboard/ when TensorBoard is installed

    @field_validator("every")
    @classmethod
    def _every(cls, every: int) -> int:
        if every < 1:
            raise ValueError("every must be a positive number of steps")
        return every


def plan(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    tracking = {"every": g["every"], "tensorboard": bool(g["tensorboard"])}
    return [train_unit(cfg, arm, task, seed, "tracking", params={"tracking": tracking})
            for task in cfg.tasks for seed in cfg.seeds for arm in g["methods"]]


def train_hooks(u: Unit, folder: Path, cfg: TrainConfig) -> tuple[list[Any], dict[str, Path], Callable]:
    """An IntruderTracker in the training loop, logging to units/KEY/tracking.jsonl with the task score
    on the test split at every scanned step."""
    from lorascope.experiments.tracking import TRACKING_FILE, IntruderTracker
    from lorascope.train.recipes import task_scorer

    tracking, s = u.params["tracking"], u.params["scan"]
    tb = folder / "tensorboard" if tracking["tensorboard"] else None
    tracker = IntruderTracker(u.params["base"], every=tracking["every"], log=folder / TRACKING_FILE,
                              tensorboard=tb, unit=u.labels, options=ScanOptions(**{**s, "device": cfg.device}),
                              score=task_scorer(cfg))

    def finish(result: Any) -> dict[str, Any]:
        last = tracker.history[-1][1]["sides"]
        # the last tracked scan is of the saved weights: it must agree with the post-hoc scan
        sides = result.summary()["sides"].items()
        matches = all(last[side]["n_intruders"] == post["n_intruders"] for side, post in sides)
        return {"tracked_steps": len(tracker.history), "tracking_matches_scan": matches}

    return [tracker], {"tracking": folder / TRACKING_FILE}, finish
