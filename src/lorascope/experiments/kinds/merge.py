"""``merge``: one LoRA per task, merged with each method (``lorascope.merge``); then each task's accuracy
with the merged encoder and the head trained on that task, forgetting (STS-B, drift) and intruders of
the merge against the inputs'. One extra arm: each input's intruders scaled by λ (paper §5, Eq. 1, every
intruder of the top-k) before the merge. ``derive`` gives the table of docs/results (one row per merge)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from lorascope.errors import InputError
from lorascope.experiments.arms import ArmsGrid
from lorascope.experiments.checks import each
from lorascope.experiments.kinds.continual import head_score
from lorascope.experiments.steps import SCAN_FILE, forgetting_metrics, scan_metrics, scan_unit
from lorascope.experiments.store import Store
from lorascope.experiments.units import Unit, shared_params, task_label, train_unit
from lorascope.io.writers import atomic_write_json
from lorascope.merging.options import DEFAULT_DENSITY, METHOD_NAMES, SPARSIFYING

if TYPE_CHECKING:
    from lorascope.experiments.config import ExperimentConfig

SEQUENCE = True  # at least two tasks (their order does not matter to a merge)
Methods = Annotated[list[str], each(lambda m: m in METHOD_NAMES, f"unknown merge method {{}}; choose from "
                                    f"{list(METHOD_NAMES)}")]


class Grid(ArmsGrid):
    methods: list[Any] = [{"method": "lora", "rank": 8}]  # how each task's adapter is trained
    merges: Methods = list(METHOD_NAMES)
    density: float = DEFAULT_DENSITY  # TIES' trim / DARE's drop
    lams: Annotated[list[float], each(lambda lam: 0 <= lam < 1, "λ must lie in [0, 1), got {}")] = [0.5]
    lam_merges: Methods = ["task_arithmetic", "ties", "knots_ties"]  # merged again after the λ scaling


def plan(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    units = []
    for arm in g["methods"]:
        if arm.get("method") != "lora":
            raise InputError(f"merge: the tasks' adapters must be plain LoRA, not {arm.get('method')!r}")
        for seed in cfg.seeds:
            trained = [train_unit(cfg, arm, task, seed, "merge") for task in cfg.tasks]
            units += trained
            heads = [[task, u.key] for task, u in zip(cfg.tasks, trained, strict=True)]
            arms = [(m, None) for m in g["merges"]] + [(m, lam) for lam in g["lams"] for m in g["lam_merges"]]
            for method, lam in arms:
                labels = {**trained[0].labels, "task": "+".join(task_label(t) for t in cfg.tasks),
                          "merge": method, "lam": lam}
                params = {**shared_params(cfg), "merge": method, "lam": lam, "heads": heads,
                          "density": float(g["density"]) if method in SPARSIFYING else None}
                units.append(Unit("merge", "merge", labels, trained[0].train, params,
                                  tuple(u.key for u in trained)))
    return units


def run_merge(u: Unit, folder: Path, store: Store):
    from lorascope.merging.api import merge
    from lorascope.merging.options import MergeOptions
    from lorascope.mitigation.api import mitigate
    from lorascope.models import read_run

    p, device = u.params, u.train.get("device", "auto")
    s = p["scan"]
    runs = [store.unit_dir(key) / "run" for _, key in p["heads"]]
    adapters = [str(r / read_run(r)["layout"]["adapter"]) for r in runs]
    metrics: dict[str, Any] = {}
    if p["lam"] is not None:  # each input's intruders scaled by λ first (Eq. 1, all of the top-k)
        scaled = []
        for (task, _), a in zip(p["heads"], adapters, strict=True):
            out = folder / "scaled" / task_label(task)
            r = mitigate(p["base"], a, out, lam=p["lam"], which="all", k=s["k"], epsilon=s["epsilon"],
                         modules=s["modules"], format="adapter", device=device)
            metrics[f"scaled_directions/{task_label(task)}"] = r.summary()["n_directions"]
            scaled.append(str(out))
        adapters = scaled
    opts = MergeOptions(method=p["merge"], density=p["density"], modules=s["modules"], device=device)
    result = merge(p["base"], adapters, folder / "merged", opts, labels=[task_label(t) for t, _ in p["heads"]])
    outputs = [Path(o["path"]) for o in result.output["outputs"]]
    per_task = outputs if len(outputs) > 1 else outputs * len(runs)  # EMR: each task its own adapter

    scores, forgetting, intruders, scans = [], [], [], []
    for i, ((task, _), run, adapter) in enumerate(zip(p["heads"], runs, per_task, strict=True)):
        backbone = _as_run(run, adapter, folder / "runs" / f"{i}-{task_label(task)}")
        name, value = head_score(run, backbone, task, u.train.get("max_eval_examples"),
                                 u.train.get("max_length", 128), device)
        metrics[f"{name}/{task_label(task)}"] = value
        scores.append(value)
        if i == 0 or len(outputs) > 1:  # one forgetting and one scan per distinct output
            f = forgetting_metrics(p["base"], backbone, p["forgetting"], device)
            forgetting.append(f)
            sub = folder if len(outputs) == 1 else folder / "scans" / task_label(task)
            scan = scan_unit(u, adapter, sub, device)
            scans.append(scan)
            intruders.append(scan_metrics(scan.summary())["n_intruders"])
    metrics["mean_task_score"] = sum(scores) / len(scores)
    for key in forgetting[0]:  # EMR: the mean over its per-task models
        vals = [f[key] for f in forgetting]
        metrics[key] = sum(vals) / len(vals) if all(isinstance(v, int | float) for v in vals) else vals[0]
    metrics["n_intruders"] = sum(intruders) / len(intruders)
    metrics["n_intruders_inputs"] = sum(_record(store, key)["metrics"].get("n_intruders", 0)
                                        for _, key in p["heads"])
    st = result.output["storage"]
    metrics.update(max_rel_error=result.summary()["max_rel_error"], mean_rank=result.summary()["mean_rank_after"],
                   written_bytes=st["written_bytes"], inputs_bytes=st["inputs_bytes"],
                   **({"emr_compact_bytes": st["emr_compact_bytes"]} if "emr_compact_bytes" in st else {}))
    scan = scans[0] if len(outputs) == 1 else None
    paths = {"merged": folder / "merged", **({"scan": folder / SCAN_FILE} if scan is not None else {})}
    return metrics, scan, paths


def _as_run(run: Path, adapter: Path, target: Path) -> Path:
    """A run folder for a merged adapter: the task run's run.json and tokenizer, the merged adapter with the
    task's own head (its modules_to_save), so it loads like any LoRA run of that task."""
    from safetensors.torch import load_file, save_file

    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    layout = record["layout"]
    target.mkdir(parents=True)
    shutil.copytree(adapter, target / "adapter", ignore=shutil.ignore_patterns("scans", "merge.json"))
    # the task's own head (modules_to_save: classifier, pooler), which the merge leaves out
    own = run / layout["adapter"]
    head = {k: v for k, v in load_file(own / "adapter_model.safetensors").items() if ".lora_" not in k}
    state = load_file(target / "adapter" / "adapter_model.safetensors")
    save_file({**state, **head}, str(target / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    config["modules_to_save"] = json.loads((own / "adapter_config.json").read_text(encoding="utf-8")).get(
        "modules_to_save")
    atomic_write_json(target / "adapter" / "adapter_config.json", config)
    shutil.copytree(run / layout["tokenizer"], target / layout["tokenizer"])
    atomic_write_json(target / "run.json", {**record, "layout": {**layout, "adapter": "adapter"},
                                            "merged_adapter": str(adapter)})
    return target


def _record(store: Store, key: str) -> dict[str, Any]:
    return json.loads((store.unit_dir(key) / "record.json").read_text(encoding="utf-8"))


ACTIONS = {"merge": run_merge}


def derive(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per merge: the mean task score, each task's, forgetting and intruders (merge vs inputs)."""
    rows = []
    for r in records:
        if r["action"] != "merge":
            continue
        m = r["metrics"]
        rows.append({"merge": r["unit"]["merge"], "lam": r["unit"].get("lam"), "seed": r["unit"].get("seed"),
                     "mean_task_score": m.get("mean_task_score"),
                     "task_scores": {k: v for k, v in m.items() if "/" in k and not k.startswith("scaled")},
                     "forgetting": m.get("forgetting"), "sts_change_pct": m.get("sts_change_pct"),
                     "drift": m.get("drift"), "n_intruders": m.get("n_intruders"),
                     "n_intruders_inputs": m.get("n_intruders_inputs"), "written_bytes": m.get("written_bytes")})
    own = {r["unit"]["task"]: r["metrics"].get("accuracy") for r in records if r["action"] == "train"}
    return {"merges": sorted(rows, key=lambda x: (x["lam"] is not None, x["merge"])), "single_task": own}
