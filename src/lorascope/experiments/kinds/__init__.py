"""Study kinds: one module each, one name each in :data:`KINDS`.

A kind module defines

- ``Grid``: the pydantic model of its ``[grid]`` table (unknown keys refused, defaults filled in);
- ``plan(cfg) -> list[Unit]``: every unit of the study, dependencies before dependants;

and, when it needs them,

- ``ACTIONS``: ``{action: run(unit, folder, store) -> (metrics, scan result or None, paths)}`` for the
  unit actions it brings (every kind may plan ``train`` units, run by :mod:`lorascope.experiments.studies`);
- ``train_hooks(unit, folder, train_config) -> (callbacks, paths, finish)``: training callbacks for its
  ``train`` units, and ``finish(scan_result) -> metrics`` called after the post-hoc scan;
- ``derive(records) -> dict``: numbers computed from the records alone (summary.json);
- ``SEQUENCE = True``: the tasks are a sequence (at least two, in order, part of the shared settings).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# a new kind: one file, one name here
NAMES = ("methods", "sweeps", "intervention", "continual", "tracking", "merge", "mitigations")
KINDS: dict[str, ModuleType] = {name: importlib.import_module(f"{__name__}.{name}") for name in NAMES}
