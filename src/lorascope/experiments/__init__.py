"""The paper's studies as reproducible, resumable runs; see docs/experiments.md.

``lorascope experiment run CONFIG.toml`` plans a study's units (methods, sweeps, intervention, continual,
tracking), runs the ones not finished yet and appends one record per unit to ``DIR/records.jsonl``.
"""

from lorascope.experiments.config import ExperimentConfig, load_config, parse_config
from lorascope.experiments.runner import RunReport, experiment_status, run_experiment
from lorascope.experiments.store import Store
from lorascope.experiments.studies import Unit, execute, plan
from lorascope.experiments.tracking import IntruderTracker

__all__ = [
    "ExperimentConfig",
    "IntruderTracker",
    "RunReport",
    "Store",
    "Unit",
    "execute",
    "experiment_status",
    "load_config",
    "parse_config",
    "plan",
    "run_experiment",
]
