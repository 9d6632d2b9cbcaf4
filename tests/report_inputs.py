"""Realistic report inputs made by the experiment machinery on a tiny random BERT (about 15 s on one
CPU thread): three experiment stores side by side, so one report shows scans at different k and ε.

    ROOT/tiny/              the tiny assets (lorascope.experiments.tiny)
    ROOT/results/sweeps/        LoRA r=2 at four learning rates (k = 4, ε = 0.5): forgetting, Spearman ρ
    ROOT/results/intervention/  LoRA r=4, λ ∈ {0, 0.5, 1} × {intruder, neighbour}, which = all (k = 6, ε = 0.6)
    ROOT/results/tracking/      LoRA r=4 tracked every 5 steps (k = 4, ε = 0.5): loss and task score

Used by tests/test_report_page.py and docs/report/make_screenshots.py.
"""

from __future__ import annotations

from pathlib import Path

SCANS = {"sweeps": (4, 0.5), "intervention": (6, 0.6), "tracking": (4, 0.5)}  # (k, ε) of each store
LAMS = [0.0, 0.5, 1.0]
SWEEP_LRS = [2e-3, 1e-2, 4e-2, 8e-2]


def build(root: Path) -> Path:
    """Write the three stores under ROOT/results (nothing is redone when they are there); returns it."""
    from lorascope.experiments import parse_config, run_experiment
    from lorascope.experiments.tiny import write_tiny_assets

    write_tiny_assets(root)
    grids = {
        "sweeps": {"methods": [{"method": "lora", "rank": 2}], "lrs": SWEEP_LRS},
        "intervention": {"methods": [{"method": "lora", "rank": 4}], "lams": LAMS, "which": "all"},
        "tracking": {"methods": [{"method": "lora", "rank": 4}], "every": 5, "tensorboard": False},
    }
    for kind, grid in grids.items():
        k, eps = SCANS[kind]
        raw = {"kind": kind, "name": f"tiny_{kind}", "model": "tiny/bert", "tasks": ["tiny/sentiment"],
               "train": {"epochs": 1 if kind == "sweeps" else 2, "max_length": 16, "lr": 2e-2, "device": "cpu"},
               "scan": {"k": k, "epsilon": eps}, "forgetting": {"data": "tiny/corpus.txt", "max_examples": 6},
               "grid": grid}
        run_experiment(parse_config(raw, root), root / "results" / kind, resume=True, log=lambda line: None)
    return root / "results"


def merge_study(root: Path):
    """A tiny merge study (two tasks, task arithmetic and EMR, a λ arm for TIES) run in ROOT/store;
    returns the run's report."""
    from lorascope.experiments import parse_config, run_experiment
    from lorascope.experiments.tiny import write_tiny_assets

    write_tiny_assets(root)
    raw = {"kind": "merge", "name": "t_merge", "model": "tiny/bert", "tasks": ["tiny/sentiment", "tiny/topics"],
           "train": {"epochs": 2, "max_length": 16, "lr": 2e-2, "device": "cpu", "max_eval_examples": 16},
           "scan": {"k": 4}, "forgetting": {"data": "tiny/corpus.txt", "max_examples": 6},
           "grid": {"methods": [{"method": "lora", "rank": 4}], "merges": ["task_arithmetic", "emr"],
                    "lams": [0.5], "lam_merges": ["ties"]}}
    return run_experiment(parse_config(raw, root), root / "store", log=lambda line: None)
