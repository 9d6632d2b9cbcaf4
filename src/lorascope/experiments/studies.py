"""The paper's studies as units: planning a study, and running one unit.

A unit is one piece of work with a JSON description (:class:`~lorascope.experiments.units.Unit`); its key
is a hash of that description, so the same settings always give the same key and a finished unit is
never run again. What each study kind plans, and the unit actions it brings, live in its own module of
:mod:`lorascope.experiments.kinds`. Three actions:

- ``train`` (here): fine-tune (``lorascope.train.train``), scan against the base (Alg. 1,
  ``lorascope.scan``), forgetting (``lorascope.evaluate``). Units of the methods, sweeps and tracking
  studies (tracking adds an ``IntruderTracker`` to the training loop) and the fine-tunes an intervention
  starts from.
- ``mitigate`` (``kinds.intervention``): scale the intruders of a finished fine-tune by λ (paper §5).
- ``continual`` (``kinds.continual``): one stage of a task sequence (paper §6).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorascope.experiments.config import ExperimentConfig
from lorascope.experiments.kinds import KINDS
from lorascope.experiments.steps import (
    SCAN_FILE,
    clean,
    forgetting_metrics,
    phase_times,
    scan_metrics,
    scan_unit,
    task_metrics,
    timed,
)
from lorascope.experiments.store import RECORD, RECORD_VERSION, Store
from lorascope.experiments.units import Unit, dedupe
from lorascope.io.writers import atomic_write_json

__all__ = ["Unit", "actions", "derive", "execute", "plan"]


def plan(cfg: ExperimentConfig) -> list[Unit]:
    """Every unit of the study, dependencies before dependants, duplicates removed."""
    return dedupe(KINDS[cfg.kind].plan(cfg))


def actions() -> dict[str, Callable[[Unit, Path, Store], tuple[dict[str, Any], Any, dict[str, Path]]]]:
    """Action name -> the function that runs a unit of it: ``train`` here, the rest from the kinds."""
    out = {"train": _run_train}
    for kind in KINDS.values():
        out.update(getattr(kind, "ACTIONS", {}))
    return out


def execute(unit: dict[str, Any], root: str, threads: int | None = None) -> dict[str, Any]:
    """Run one unit into ``root/units/KEY`` and return its record (also written as record.json).

    Runs in the calling process, a pool worker or a Ray task: everything comes in as plain data.
    """
    if threads:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return execute(unit, root)
        finally:
            torch.set_num_threads(before)
    u = Unit.from_dict(unit)
    store = Store(root)
    folder = store.reset_unit(u.key)
    atomic_write_json(folder / "unit.json", {"key": u.key, **u.to_dict()})
    start = time.perf_counter()
    try:
        with phase_times() as phases:
            metrics, scan, paths = actions()[u.action](u, folder, store)
    finally:
        _release_gpu_cache()
    from lorascope.runtime import library_versions

    record = {
        "record_version": RECORD_VERSION,
        "key": u.key,
        "study": u.study,
        "action": u.action,
        "unit": u.labels,
        "metrics": clean(metrics),
        "scan": store.rel(folder / SCAN_FILE) if scan is not None else None,
        "scan_summary": clean(scan.summary()) if scan is not None else None,
        "paths": {name: store.rel(p) for name, p in paths.items()},
        "deps": list(u.deps),
        "seconds": round(time.perf_counter() - start, 3),
        "phase_seconds": {name: round(t, 3) for name, t in phases.items()},  # train, edit, task, scan, forgetting
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    atomic_write_json(folder / RECORD, record)
    return record


def _release_gpu_cache() -> None:
    """Give the caching allocator's free blocks back after a unit: a pool worker keeps its CUDA memory
    between units, and several workers share one GPU, so a finished unit's peak must not stay held."""
    import sys

    torch = sys.modules.get("torch")  # a unit that never imported torch has nothing to release
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_train(u: Unit, folder: Path, store: Store):
    from lorascope.train import TrainConfig, train

    cfg = TrainConfig(**u.train)
    hooks = getattr(KINDS.get(u.study), "train_hooks", None)
    callbacks, paths, finish = hooks(u, folder, cfg) if hooks else ([], {}, None)
    with timed("train"):
        run = train(cfg, folder / "run", progress=False, callbacks=callbacks)
    tuned = folder / "run" / (run["layout"]["adapter"] or run["layout"]["model"])
    result = scan_unit(u, tuned, folder, cfg.device)
    metrics = {**task_metrics(run), **scan_metrics(result.summary())}
    metrics.update(forgetting_metrics(u.params["base"], folder / "run", u.params["forgetting"], cfg.device))
    if finish is not None:
        metrics.update(finish(result))
    paths.update(run=folder / "run", scan=folder / SCAN_FILE)
    return metrics, result, paths


def derive(kind: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers computed from the records alone (written to summary.json; ``status`` shows them)."""
    out: dict[str, Any] = {"n_records": len(records)}
    derived = getattr(KINDS.get(kind), "derive", None)
    if derived is not None:
        out.update(derived(records))
    return out
