"""The results store: one folder per experiment, one append-only line per finished unit.

Layout (docs/experiments.md; the report reads it as described in docs/report.md)::

    DIR/experiment.json   the config as run, its fingerprint, lorascope version (rewritten each run)
    DIR/plan.json         every unit of the current grid: key, study, action, unit labels, deps
    DIR/records.jsonl     one JSON object per finished unit, appended in the order they finished
    DIR/summary.json      derived numbers (e.g. Spearman ρ of a sweep), recomputable from records.jsonl
    DIR/units/KEY/        a unit's files: unit.json, record.json (written last), run/, scan.json, ...
    DIR/.lock             locked (filelock, with the pid in it) while a run is writing

A unit is finished exactly when its line is in records.jsonl; its folder's record.json is the same
record, written before the line is appended, so a run killed between the two is recovered on resume.
Unit folders without record.json are partial and are redone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_json

RECORDS = "records.jsonl"
EXPERIMENT = "experiment.json"
PLAN = "plan.json"
SUMMARY = "summary.json"
UNITS = "units"
LOCK = ".lock"
RECORD = "record.json"
RECORD_VERSION = 1


class Store:
    """An experiment folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- paths ------------------------------------------------------------------------------------
    def unit_dir(self, key: str) -> Path:
        return self.root / UNITS / key

    def rel(self, path: Path) -> str:
        """A path inside the store, relative to its root (how records name files)."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    @property
    def exists(self) -> bool:
        return (self.root / EXPERIMENT).is_file()

    # -- records ----------------------------------------------------------------------------------
    def read_records(self) -> list[dict[str, Any]]:
        """Every finished unit's record, in file order. A last line cut short by a kill is ignored
        (and removed by :meth:`repair`); any other bad line is an error naming the line."""
        path = self.root / RECORDS
        if not path.is_file():
            return []
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
        lines = data.split(b"\n")
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if n == len(lines) and not data.endswith(b"\n"):
                    break  # a torn last line (a kill can cut a multi-byte character too)
                raise InputError(f"{path}:{n}: not a UTF-8 JSON line ({e}); remove or fix that line") from e
            if not isinstance(rec, dict) or "key" not in rec or "unit" not in rec or "metrics" not in rec:
                raise InputError(f"{path}:{n}: not an experiment record (needs key, unit, metrics)")
            out.append(rec)
        return out

    def to_pandas(self):  # -> pandas.DataFrame
        """One row per finished unit (the last record of a key), nested fields as dotted columns:
        ``key``, ``unit.method``, ``unit.rank``, ``metrics.accuracy``, ``metrics.n_intruders``, ..."""
        import pandas as pd

        return pd.json_normalize(list(self.finished().values()), sep=".")

    def finished(self) -> dict[str, dict[str, Any]]:
        """key -> record of every finished unit (the last record wins if a key repeats)."""
        return {r["key"]: r for r in self.read_records()}

    def repair(self) -> None:
        """Drop a torn last line of records.jsonl, so appends start on a fresh line."""
        path = self.root / RECORDS
        if not path.is_file():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(keep))

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line (a single write, flushed and fsynced)."""
        line = json.dumps(record, allow_nan=False, sort_keys=False) + "\n"
        fd = os.open(self.root / RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def recover(self) -> list[dict[str, Any]]:
        """Units that wrote record.json but whose line never reached records.jsonl (killed in
        between): append their lines now. Returns the recovered records."""
        done = self.finished()
        recovered = []
        for folder in sorted((self.root / UNITS).glob("*")) if (self.root / UNITS).is_dir() else []:
            rec_file = folder / RECORD
            if folder.name not in done and rec_file.is_file():
                try:
                    rec = json.loads(rec_file.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    continue  # not a finished record: the unit runs again (reset_unit clears it)
                if not isinstance(rec, dict) or rec.get("key") != folder.name or "metrics" not in rec:
                    continue
                self.append(rec)
                recovered.append(rec)
        return recovered

    def reset_unit(self, key: str) -> Path:
        """An empty folder for a unit about to run (a partial one from a killed run is removed)."""
        folder = self.unit_dir(key)
        if folder.exists():
            shutil.rmtree(folder)
        for stale in (self.root / UNITS).glob(f".{key}*"):  # temporaries of atomic writes
            shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    # -- experiment and plan ------------------------------------------------------------------------
    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not JSON ({e})") from e

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.root / name, obj)

    # -- lock ---------------------------------------------------------------------------------------
    def running_pid(self) -> int | None:
        """The pid of the live run holding the lock, else None. The lock file alone proves nothing: a
        killed run leaves it behind, and its pid may since belong to another process; only a lock that
        is actually held counts."""
        lock = self.root / LOCK
        if not lock.is_file():
            return None
        probe = FileLock(str(lock))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            try:
                return int(lock.read_text().strip())
            except (OSError, ValueError):  # held, the pid not written yet
                return None
        probe.release()
        return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one run (a ``filelock`` lock on ``DIR/.lock``, with the pid in it); a
        second run on it is refused. The OS releases the lock when its process dies, so a lock file
        left by a killed run does not block."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pid = self.running_pid()
            raise InputError(f"{self.root} is being written by another run ({f'pid {pid}, ' if pid else ''}"
                             f"holding the lock {path})") from None
        try:
            path.write_text(str(os.getpid()))  # for `experiment status`; the OS lock is what counts
            yield
        finally:
            lock.release()

