"""``intervention`` (paper §5): one fine-tune per arm, then its intruders scaled by λ (Eq. 1), or their
best-matching pre-trained directions (the neighbour control, Eq. 2); then accuracy, forgetting and the
intruders left. ``derive`` gives Tables 3-4: the % change against λ = 1 of the same fine-tune."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from lorascope.errors import InputError
from lorascope.experiments.arms import ArmsGrid
from lorascope.experiments.checks import each
from lorascope.experiments.steps import (
    SCAN_FILE,
    dependency_base_values,
    forgetting_metrics,
    scan_metrics,
    scan_unit,
    timed,
)
from lorascope.experiments.store import Store
from lorascope.experiments.units import Unit, shared_params, train_unit

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig

PAPER_LAMS = [0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 0.9, 1.0, 1.5, 2.0]  # paper §5, Tables 3-4
CONTROLS = ("intruder", "neighbour")
# Methods the intervention can write back exactly (a plain LoRA adapter or a full model).
INTERVENABLE = ("lora", "full", "pissa", "loraplus", "lora-a-frozen")


class Grid(ArmsGrid):
    methods: list[Any] = [{"method": "lora", "rank": 8}]
    lams: Annotated[list[float], each(lambda lam: 0 <= lam <= 2, "λ must lie in [0, 2], got {}")] = PAPER_LAMS
    # intruder: scale the intruders; neighbour: the control
    controls: Annotated[list[str], each(lambda c: c in CONTROLS, "controls are 'intruder' (scale the "
                                        "intruders) and 'neighbour', not {}")] = list(CONTROLS)
    # the highest-ranked intruder per matrix, or all of them; a list runs each on the same fine-tunes
    which: Literal["top1", "all"] | list[Literal["top1", "all"]] = "top1"
    scan_each: bool = True  # scan every λ unit again


def plan(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    whichs = [g["which"]] if isinstance(g["which"], str) else list(dict.fromkeys(g["which"]))
    units = []
    for arm in g["methods"]:
        if arm.get("method") not in INTERVENABLE:
            raise InputError(f"intervention: method {arm.get('method')!r} cannot be written back exactly; "
                             f"use one of {INTERVENABLE}")
        for task in cfg.tasks:
            for seed in cfg.seeds:
                tuned = train_unit(cfg, arm, task, seed, "intervention")
                units.append(tuned)
                for which, lam, control in itertools.product(whichs, g["lams"], g["controls"]):
                    labels = {**tuned.labels, "lam": float(lam), "control": control, "which": which}
                    params = {**shared_params(cfg), "lam": float(lam), "control": control,
                              "which": which, "scan_each": bool(g["scan_each"])}
                    units.append(Unit("intervention", "mitigate", labels, tuned.train, params, (tuned.key,)))
    return units


def run_mitigate(u: Unit, folder: Path, store: Store):
    """Scale by λ (Eq. 1) or the neighbour control (Eq. 2); a derived run folder makes the result loadable
    like any run (``run.json`` of the fine-tune, the new weights, its tokenizer)."""
    from lorascope.mitigation.api import mitigate_run
    from lorascope.models import read_run

    source = store.unit_dir(u.deps[0]) / "run"
    layout = read_run(source)["layout"]
    s, device = u.params["scan"], u.train.get("device", "auto")
    control = None if u.params["control"] == "intruder" else "neighbour"
    with timed("edit"):
        result, target = mitigate_run(u.params["base"], source, folder / "run", origin=store.rel(source),
                                      lam=u.params["lam"], epsilon=s["epsilon"], k=s["k"], which=u.params["which"],
                                      control=control, modules=s["modules"],
                                      format="adapter" if layout["adapter"] else "merged", device=device)

    summary = result.summary()
    metrics: dict[str, Any] = {"n_directions": summary["n_directions"], "n_changed": summary["n_changed"],
                               "n_intruders_before": summary["n_intruders"],
                               "max_rel_error": summary["max_rel_error"]}
    train = u.train
    metrics.update(task_score(folder / "run", train["task"], train.get("max_eval_examples"),
                               train.get("max_length", 128), device))
    scan = None
    if u.params["scan_each"]:
        scan = scan_unit(u, target, folder, device)
        metrics.update(scan_metrics(scan.summary()))
    metrics.update(forgetting_metrics(u.params["base"], folder / "run", u.params["forgetting"], device,
                                      known_base=dependency_base_values(u, store)))
    paths = {"run": folder / "run", "mitigation": target / "mitigation.json"}
    if scan is not None:
        paths["scan"] = folder / SCAN_FILE
    return metrics, scan, paths


@timed("task")
def task_score(run_dir: Path, task: str, max_examples: int | None, max_length: int, device: str) -> dict:
    from lorascope.evaluate import evaluate

    r = evaluate(str(run_dir), metric="accuracy", data=task, max_examples=max_examples, max_length=max_length,
                 device=device, progress=False, score_base=False)  # the tuned model's score only
    name = r["details"].get("score", "accuracy")
    out = {name: r["tuned"], "task_score": r["tuned"]}
    if name == "exact_match":  # a decoder's accuracy, as steps.task_metrics names it
        out["accuracy"] = r["tuned"]
    return out


ACTIONS = {"mitigate": run_mitigate}


def derive(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"lambda": lambda_changes(records)}


def lambda_changes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paper Tables 3-4: for each fine-tune, control and λ, the % change in accuracy and in forgetting
    against λ = 1 (the unmodified fine-tune) of the same fine-tune and control."""
    from lorascope.evaluate.metrics import relative_change

    rows = []
    lam_records = [r for r in records if r["unit"].get("lam") is not None]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in lam_records:
        rest = {k: v for k, v in r["unit"].items() if k not in ("lam",)}
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append(r)
    for key, recs in groups.items():
        ref = next((r["metrics"] for r in recs if r["unit"]["lam"] == 1.0), None) or {}
        for r in sorted(recs, key=lambda r: r["unit"]["lam"]):
            m = r["metrics"]
            rows.append({"arm": json.loads(key), "lam": r["unit"]["lam"], "accuracy": m.get("accuracy"),
                         "forgetting": m.get("forgetting"), "n_intruders": m.get("n_intruders"),
                         "accuracy_change_pct": relative_change(ref.get("accuracy"), m.get("accuracy")),
                         "forgetting_change_pct": relative_change(ref.get("forgetting"), m.get("forgetting"))})
    return rows
