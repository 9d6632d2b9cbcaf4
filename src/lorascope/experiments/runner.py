"""Run a study: plan its units, skip the finished ones, run the rest in dependency order, record each.

Backends (the same units and records either way):
- ``local``, ``workers=1``: one unit at a time in this process;
- ``local``, ``workers=N``: a ``ProcessPoolExecutor`` (spawn) of N processes, torch threads split;
- ``ray``: each unit a Ray task (``pip install 'lorascope[ray]'``), N at a time; an existing cluster is
  used when ``ray.init`` finds one (``RAY_ADDRESS``), else a local one is started.

Only this process writes records.jsonl; workers write their unit folder and return the record.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lorascope
from lorascope.errors import InputError
from lorascope.experiments.config import ExperimentConfig
from lorascope.experiments.store import EXPERIMENT, PLAN, SUMMARY, Store
from lorascope.experiments.studies import Unit, derive, execute, plan

BACKENDS = ("local", "ray")


@dataclass
class RunReport:
    root: Path
    planned: int  # units in the grid
    already_done: int  # finished before this run (never recomputed)
    recovered: int  # finished by a killed run whose record line was missing, appended now
    computed: list[str]  # keys run now, in the order they finished
    remaining: int  # not finished yet (max_units reached, or a unit failed)
    seconds: float


def default_out(config: ExperimentConfig) -> Path:
    return Path(config.out) if config.out else Path("experiments") / config.name


def run_experiment(
    config: ExperimentConfig,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    workers: int = 1,
    backend: str = "local",
    max_units: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Run every unit of ``config`` not finished yet into the store at ``out``.

    A store that already holds this experiment needs ``resume`` (its finished units are kept, never
    recomputed); one made from a different model or shared settings is refused. ``max_units``: start
    at most this many units now, then stop (the rest stays pending for ``--resume``). The first unit
    that fails stops new work; the units already running finish and are recorded; then it is raised.
    ``threads``: torch threads per unit (default: all cores in one process, cores / workers in a pool;
    on a machine busy with other work, 1 thread can be many times faster than 2).
    """
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if max_units is not None and max_units < 0:
        raise InputError(f"max_units must be >= 0, got {max_units}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    start = time.perf_counter()
    root = Path(out) if out is not None else default_out(config)
    units = plan(config)
    store = Store(root)
    _check_folder(store, config, resume)
    # the backend first: one that cannot start (Ray missing) must not leave a new store behind
    runner = _backend(backend, workers, root, threads)
    try:
        with store.lock():
            store.read_records()  # a corrupt store is refused before anything in it is rewritten
            _write_header(store, config, units)
            store.repair()
            recovered = store.recover()
            done = set(store.finished())
            todo = [u for u in units if u.key not in done]
            already = len(units) - len(todo) - sum(1 for r in recovered if r["key"] in {u.key for u in units})
            log(f"{config.kind} study '{config.name}': {len(units)} units, {len(units) - len(todo)} finished, "
                f"{len(todo)} to run ({backend}, {workers} worker{'s' if workers > 1 else ''}) -> {root}")
            computed: list[str] = []
            error = _schedule(store, todo, done, runner, max_units, computed, len(units), log)
            store.write_json(SUMMARY, derive(config.kind, store.read_records()))
    finally:
        runner.close()
    if error is not None:
        raise error
    remaining = len([u for u in units if u.key not in set(store.finished())])
    return RunReport(root, len(units), already, len(recovered), computed, remaining,
                     round(time.perf_counter() - start, 3))


def _check_folder(store: Store, config: ExperimentConfig, resume: bool) -> None:
    if store.exists:
        if not resume:
            raise InputError(f"{store.root} already holds an experiment; pass --resume to continue it "
                             "(finished units are kept) or choose another --out")
        old = (store.read_json(EXPERIMENT) or {}).get("fingerprint")
        new = config.fingerprint()
        if old != new:
            changed = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            raise InputError(f"{store.root} holds an experiment with different shared settings ({changed}); "
                             "only the grid may change between runs of one store: use another --out")
    elif store.root.exists() and any(p.name != ".lock" for p in store.root.iterdir()):
        raise InputError(f"{store.root} exists and is not an experiment folder (no {EXPERIMENT})")


def _write_header(store: Store, config: ExperimentConfig, units: list[Unit]) -> None:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    old = store.read_json(EXPERIMENT) or {}
    store.write_json(EXPERIMENT, {
        "name": config.name, "kind": config.kind, "config": config.to_dict(),
        "fingerprint": config.fingerprint(), "lorascope": lorascope.__version__,
        "created": old.get("created", now), "updated": now,
    })
    store.write_json(PLAN, {"units": [{"key": u.key, "study": u.study, "action": u.action, "unit": u.labels,
                                       "deps": list(u.deps)} for u in units]})


def _schedule(store: Store, todo: list[Unit], done: set[str], runner: _Backend, max_units: int | None,
              computed: list[str], total: int, log: Callable[[str], None]) -> BaseException | None:
    """Submit units whose dependencies are finished, up to the backend's capacity; record each result
    as it arrives. Returns the first error (after the running units have finished)."""
    pending = list(todo)
    running: dict[Any, Unit] = {}
    started = 0
    error: BaseException | None = None
    while True:
        while error is None and pending and len(running) < runner.capacity and \
                (max_units is None or started < max_units):
            ready = next((u for u in pending if all(d in done for d in u.deps)), None)
            if ready is None:
                break
            pending.remove(ready)
            running[runner.submit(ready)] = ready
            started += 1
        if not running:
            return error
        handle, record, exc = runner.wait(list(running))
        unit = running.pop(handle)
        if exc is not None:
            log(f"failed: {_label(unit)}: {type(exc).__name__}: {exc}")
            error = error or exc
            continue
        store.append(record)
        done.add(unit.key)
        computed.append(unit.key)
        log(f"[{len(done)}/{total}] {_label(unit)}: {_brief(record)} ({record['seconds']:.0f} s)")


def _label(unit: Unit) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in unit.labels.items()
                    if k not in ("seed", "which") and v is not None and v is not False)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _brief(record: dict[str, Any]) -> str:
    m = record["metrics"]
    parts = []
    for key, name in (("accuracy", "acc"), ("task_score", "score"), ("n_intruders", "intruders"),
                      ("effective_rank", "eff. rank"), ("forgetting", "forgetting")):
        if m.get(key) is not None and not (key == "task_score" and "accuracy" in m):
            parts.append(f"{name} {_fmt(m[key])}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------- backends


class _Backend:
    capacity = 1

    def submit(self, unit: Unit) -> Any: ...

    def wait(self, handles: list[Any]) -> tuple[Any, dict[str, Any] | None, BaseException | None]: ...

    def close(self) -> None:
        pass


class _Inline(_Backend):
    """In this process, one unit at a time (exceptions come back as errors, not as crashes)."""

    def __init__(self, root: Path, threads: int | None):
        self.root, self.threads = root, threads
        self._queued: dict[int, Unit] = {}

    def submit(self, unit: Unit) -> int:
        handle = len(self._queued)
        self._queued[handle] = unit
        return handle

    def wait(self, handles: list[int]):
        handle = handles[0]
        try:
            return handle, execute(self._queued.pop(handle).to_dict(), str(self.root), self.threads), None
        except Exception as e:  # noqa: BLE001 - reported by the scheduler, raised at the end
            return handle, None, e


def _die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker within a second of its parent's death. A parent killed with
    SIGKILL cannot shut its pool down, and a worker in the middle of a unit would otherwise train on for
    minutes, holding its memory, with nobody to take its result."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="lorascope-parent-watch", daemon=True).start()


class _Pool(_Backend):
    def __init__(self, root: Path, workers: int, threads: int | None):
        self.root, self.capacity = root, workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        spawn = multiprocessing.get_context("spawn")  # no forked copies of torch's threads and state
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=spawn, initializer=_die_with_parent,
                                           initargs=(os.getpid(),))

    def submit(self, unit: Unit) -> cf.Future:
        return self.pool.submit(execute, unit.to_dict(), str(self.root), self.threads)

    def wait(self, handles: list[cf.Future]):
        finished, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        future = next(iter(finished))
        exc = future.exception()
        return future, (None if exc else future.result()), exc

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Ray(_Backend):
    def __init__(self, root: Path, workers: int, threads: int | None):
        try:
            import ray
        except ImportError as e:
            raise InputError("--backend ray needs Ray: pip install 'lorascope[ray]'") from e
        self.ray = ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        self.root, self.capacity = root, workers
        cpus = int(ray.available_resources().get("CPU", 1))
        self.threads = threads or max(1, cpus // workers)
        self.task = ray.remote(max_retries=0, num_cpus=1)(execute)

    def submit(self, unit: Unit) -> Any:
        return self.task.remote(unit.to_dict(), str(self.root), self.threads)

    def wait(self, handles: list[Any]):
        ready, _ = self.ray.wait(handles, num_returns=1)
        try:
            return ready[0], self.ray.get(ready[0]), None
        except Exception as e:  # noqa: BLE001 - RayTaskError is also an instance of the unit's error
            return ready[0], None, e


def _backend(name: str, workers: int, root: Path, threads: int | None) -> _Backend:
    if name == "ray":
        return _Ray(root, workers, threads)
    return _Inline(root, threads) if workers == 1 else _Pool(root, workers, threads)


# ------------------------------------------------------------------------------------------- status


def experiment_status(root: str | os.PathLike) -> dict[str, Any]:
    """Progress of a store, from its files alone: one row per planned unit (done, running, partial,
    pending), records of units no longer in the grid (stale), and the derived numbers."""
    store = Store(root)
    if not store.exists:
        raise InputError(f"{root} is not an experiment folder (no {EXPERIMENT})")
    exp = store.read_json(EXPERIMENT) or {}
    planned = (store.read_json(PLAN) or {}).get("units", [])
    records = store.finished()
    pid = store.running_pid()
    rows = []
    for p in planned:
        rec = records.get(p["key"])
        if rec is not None:
            state = "done"
        elif store.unit_dir(p["key"]).is_dir():
            state = "running" if pid is not None else "partial"
        else:
            state = "pending"
        rows.append({"key": p["key"], "action": p["action"], "unit": p["unit"], "state": state,
                     "metrics": rec["metrics"] if rec else {}, "seconds": rec["seconds"] if rec else None,
                     "phase_seconds": rec.get("phase_seconds") if rec else None})
    keys = {p["key"] for p in planned}
    for key, rec in records.items():
        if key not in keys:
            rows.append({"key": key, "action": rec.get("action"), "unit": rec["unit"], "state": "stale",
                         "metrics": rec["metrics"], "seconds": rec.get("seconds"),
                         "phase_seconds": rec.get("phase_seconds")})
    return {"root": str(store.root), "name": exp.get("name"), "kind": exp.get("kind"), "running_pid": pid,
            "total": len(planned), "done": sum(1 for r in rows if r["state"] == "done"), "rows": rows,
            "derived": derive(exp.get("kind", ""), list(records.values()))}
