"""Steps that units of several study kinds share: scan against the base, forgetting, task scores.

Forgetting (``metrics["forgetting"]``, higher = more forgetting) is the primary forgetting metric:
pseudo-loss or lm-loss: the tuned model's loss on generic text (the paper's measure); sts: the % drop of
STS-B Spearman against the base, −100 (tuned − base) / |base|; drift: 1 − linear CKA(base, tuned).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from lorascope.experiments.store import RECORD, Store
from lorascope.experiments.units import Unit

SCAN_FILE = "scan.json"
_PHASES: ContextVar[dict[str, float] | None] = ContextVar("phases", default=None)


@contextlib.contextmanager
def phase_times() -> Iterator[dict[str, float]]:
    """Collect the wall time of every :func:`timed` step run inside (a unit's record keeps them, so a
    slow study says where its time went)."""
    times: dict[str, float] = {}
    token = _PHASES.set(times)
    try:
        yield times
    finally:
        _PHASES.reset(token)


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        times = _PHASES.get()
        if times is not None:
            times[name] = times.get(name, 0.0) + time.perf_counter() - start


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (records are written with allow_nan=False)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


@timed("scan")
def scan_unit(u: Unit, tuned: Path, folder: Path, device: str):
    """Alg. 1 of ``tuned`` against the pretrained base, saved as folder/scan.json."""
    from lorascope.scanning.api import scan
    from lorascope.scanning.options import ScanOptions

    result = scan(u.params["base"], str(tuned), ScanOptions(**{**u.params["scan"], "device": device}))
    result.save(folder)
    return result


def scan_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Intruders at the scan's (ε, k) and the mean effective rank of ΔW, from a scan summary."""
    sides = summary["sides"]
    s = sides["left"] if "left" in sides else sides[sorted(sides)[0]]
    return {"n_intruders": s["n_intruders"], "matrices_with_intruders": s["matrices_with_intruders"],
            "n_matrices": s["n_matrices"], "effective_rank": s["mean_delta_effective_rank"]}


@timed("forgetting")
def forgetting_metrics(base: str, tuned_run: Path, settings: dict[str, Any], device: str,
                       known_base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every forgetting metric of ``tuned_run`` (a run folder) against ``base``: value, base value and
    % change, plus ``forgetting`` from the primary one (see the module docstring). ``known_base``: the
    base's values (``{metric}_base``) measured by a unit with the same base and settings
    (:func:`dependency_base_values`); those are not measured again."""
    from lorascope.evaluate import evaluate
    from lorascope.evaluate.metrics import relative_change

    out: dict[str, Any] = {}
    for metric in settings["metrics"]:
        data = settings["sts_data"] if metric == "sts" else settings["data"]
        known = (known_base or {}).get(f"{metric}_base")
        r = evaluate(base, adapter=str(tuned_run), metric=metric, data=data,
                     max_examples=settings["max_examples"], batch_size=settings["batch_size"],
                     max_length=settings["max_length"], device=device, progress=False,
                     score_base=known is None)
        base_value = r["base"] if known is None else known
        out[metric] = r["tuned"]
        out[f"{metric}_base"] = base_value
        out[f"{metric}_change_pct"] = relative_change(base_value, r["tuned"])
    primary = settings["primary"]
    if primary == "sts":
        change = out["sts_change_pct"]
        out["forgetting"] = None if change is None else -change
    else:
        out["forgetting"] = out[primary]
    out["forgetting_metric"] = primary
    return out


def dependency_base_values(u: Unit, store: Store) -> dict[str, Any]:
    """The base's forgetting values (``{metric}_base``) of ``u``'s first dependency, when it measured them
    against the same base with the same settings (the fine-tune of an edit), else {}: an edit changes the
    tuned model only, so the base's numbers are the fine-tune's."""
    if not u.deps:
        return {}
    folder = store.unit_dir(u.deps[0])
    try:
        dep = json.loads((folder / "unit.json").read_text())
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    same = (dep.get("params", {}).get("base") == u.params["base"]
            and dep.get("params", {}).get("forgetting") == u.params["forgetting"])
    metrics = record.get("metrics", {}) if same else {}
    return {f"{m}_base": metrics[f"{m}_base"] for m in u.params["forgetting"]["metrics"]
            if isinstance(metrics.get(f"{m}_base"), (int, float))}


def task_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """The run's own test metrics (scored right after training) under the report's names."""
    m = run["metrics"]
    out = {k: v for k, v in m.items() if k.startswith("test_") or k == "train_loss"}
    if "test_accuracy" in m:
        out["accuracy"] = m["test_accuracy"]
    elif "test_exact_match" in m:  # a prompt/response task's accuracy: the whole answer, greedily
        out["accuracy"] = m["test_exact_match"]
    out["trainable_params"] = run["parameters"]["trainable"]
    out["train_seconds"] = run["wall_time_s"]
    return out
