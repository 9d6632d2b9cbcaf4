"""The paper's studies as units: what each kind plans, and how one unit runs.

A unit is one piece of work with a JSON description (``Unit``); its key is a hash of that description,
so the same settings always give the same key and a finished unit is never run again. Three actions:

- ``train``: fine-tune (``lorascope.train.train``), scan against the base (Alg. 1, ``lorascope.scan``),
  forgetting (``lorascope.evaluate``). Units of the methods, sweeps and tracking studies (tracking adds
  an ``IntruderTracker`` to the training loop) and the fine-tunes an intervention starts from.
- ``mitigate``: scale the intruders of a finished fine-tune by λ (paper §5, ``lorascope.mitigate``),
  or their best-matching pre-trained directions (the neighbour control), then accuracy, forgetting and
  the intruders left.
- ``continual``: one stage of a task sequence (paper §6): train on the stage's task from the previous
  stage's model, merge the LoRA, then accuracy on every task so far (each with the head trained on it),
  forgetting and intruders, both against the original pretrained model.

Forgetting (``metrics["forgetting"]``, higher = more forgetting) is the primary forgetting metric:
pseudo-loss or lm-loss: the tuned model's loss on generic text (the paper's measure); sts: the % drop of
STS-B Spearman against the base, −100 (tuned − base) / |base|; drift: 1 − linear CKA(base, tuned).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.errors import InputError, NonFiniteError
from lorascope.experiments.config import ExperimentConfig, arm_train_fields
from lorascope.experiments.store import RECORD, RECORD_VERSION, Store
from lorascope.io.writers import atomic_write_json

SCAN_FILE = "scan.json"
# Methods the intervention can write back exactly (a plain LoRA adapter or a full model).
INTERVENABLE = ("lora", "full", "pissa", "loraplus", "lora-a-frozen")


@dataclass(frozen=True)
class Unit:
    study: str  # the experiment kind
    action: str  # train | mitigate | continual
    labels: dict[str, Any]  # the report's "unit": method, rank, alpha, task, lr, n_examples, seed, lam, ...
    train: dict[str, Any]  # TrainConfig fields (model None: the previous continual stage's model)
    params: dict[str, Any]  # base model, scan and forgetting settings, and the action's own settings
    deps: tuple[str, ...] = field(default_factory=tuple)  # keys of the units whose folders this one reads

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "action": self.action, "labels": self.labels, "train": self.train,
                "params": self.params, "deps": list(self.deps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        return cls(d["study"], d["action"], d["labels"], d["train"], d["params"], tuple(d.get("deps", ())))

    @property
    def key(self) -> str:
        """sha256 of the canonical JSON of the description, first 16 hex digits."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- plan


def task_label(task: str) -> str:
    """A short name for a task: built-in names as given, files and folders by their stem."""
    p = Path(task)
    return p.stem if p.exists() else task


def _shared(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"base": cfg.model, "scan": dataclasses.asdict(cfg.scan),
            "forgetting": dataclasses.asdict(cfg.forgetting)}


def _train_unit(cfg: ExperimentConfig, arm: dict[str, Any], task: str, seed: int, study: str,
                extra: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Unit:
    from lorascope.train import TrainConfig

    arm_labels, fields = arm_train_fields(arm, f"{cfg.source or 'config'} [grid]")
    train = {**cfg.train, **fields, **(extra or {}), "model": cfg.model, "task": task, "seed": seed}
    resolved = TrainConfig(**train).resolved()  # checks every value now, not in the middle of a run
    labels = {**arm_labels, "task": task_label(task), "lr": resolved.lr, "n_examples": resolved.max_examples,
              "seed": seed}
    return Unit(study, "train", labels, train, {**_shared(cfg), **(params or {})})


def plan(cfg: ExperimentConfig) -> list[Unit]:
    """Every unit of the study, dependencies before dependants, duplicates removed."""
    units = {"methods": _plan_methods, "sweeps": _plan_sweeps, "intervention": _plan_intervention,
             "continual": _plan_continual, "tracking": _plan_tracking}[cfg.kind](cfg)
    seen: dict[str, Unit] = {}
    for u in units:
        seen.setdefault(u.key, u)
    return list(seen.values())


def _plan_methods(cfg: ExperimentConfig) -> list[Unit]:
    """Paper §3-4: full fine-tuning, LoRA over ranks and α rules, and the PEFT variants."""
    g = cfg.grid
    arms: list[dict[str, Any]] = []
    if g["full"]:
        arms.append({"method": "full", **({"lr": g["full_lr"]} if "full_lr" in g else {})})
    arms += [{"method": "lora", "rank": r, "alpha": a} for r in g["ranks"] for a in g["alphas"]]
    for v in g["variants"]:
        for r in g["variant_ranks"]:
            arm = {"method": v, "rank": r}
            if v == "loraplus" and "loraplus_lr_ratio" in g:
                arm["loraplus_lr_ratio"] = g["loraplus_lr_ratio"]
            arms.append(arm)
    arms += g["methods"]
    return [_train_unit(cfg, arm, task, seed, "methods") for task in cfg.tasks for seed in cfg.seeds
            for arm in arms]


def _plan_sweeps(cfg: ExperimentConfig) -> list[Unit]:
    """Learning rate and training-set size, each swept with the other at its default."""
    g = cfg.grid
    units = []
    for arm in g["methods"]:
        full = arm.get("method") == "full"
        lrs = arm.get("lrs") or (g["full_lrs"] if full else g["lrs"])
        base_arm = {k: v for k, v in arm.items() if k != "lrs"}
        points = [({**base_arm, "lr": lr}, None) for lr in lrs]
        points += [(base_arm, {"max_examples": n}) for n in g["n_examples"]]
        for task in cfg.tasks:
            for seed in cfg.seeds:
                for a, extra in points or [(base_arm, None)]:
                    units.append(_train_unit(cfg, a, task, seed, "sweeps", extra))
    return units


def _plan_intervention(cfg: ExperimentConfig) -> list[Unit]:
    """Paper §5: one fine-tune per arm, then λ × {intruder, neighbour control} on it."""
    g = cfg.grid
    units = []
    for arm in g["methods"]:
        if arm.get("method") not in INTERVENABLE:
            raise InputError(f"intervention: method {arm.get('method')!r} cannot be written back exactly; "
                             f"use one of {INTERVENABLE}")
        for task in cfg.tasks:
            for seed in cfg.seeds:
                tuned = _train_unit(cfg, arm, task, seed, "intervention")
                units.append(tuned)
                for lam in g["lams"]:
                    for control in g["controls"]:
                        labels = {**tuned.labels, "lam": float(lam), "control": control, "which": g["which"]}
                        params = {**_shared(cfg), "lam": float(lam), "control": control, "which": g["which"],
                                  "scan_each": bool(g["scan_each"])}
                        unit = Unit("intervention", "mitigate", labels, tuned.train, params, (tuned.key,))
                        units.append(unit)
    return units


def _plan_continual(cfg: ExperimentConfig) -> list[Unit]:
    """Paper §6: stage i trains task i from stage i-1's (merged) model."""
    units = []
    for arm in cfg.grid["methods"]:
        for seed in cfg.seeds:
            earlier: list[tuple[str, str]] = []  # (task, key) of the stages before
            for stage, task in enumerate(cfg.tasks, 1):
                first = _train_unit(cfg, arm, task, seed, "continual")
                train = {**first.train, "model": cfg.model if stage == 1 else None}
                labels = {**first.labels, "stage": stage}
                params = {**_shared(cfg), "stage": stage, "heads": [list(e) for e in earlier]}
                unit = Unit("continual", "continual", labels, train, params, tuple(k for _, k in earlier))
                units.append(unit)
                earlier.append((task, unit.key))
    return units


def _plan_tracking(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    tracking = {"every": g["every"], "tensorboard": bool(g["tensorboard"])}
    return [_train_unit(cfg, arm, task, seed, "tracking", params={"tracking": tracking})
            for task in cfg.tasks for seed in cfg.seeds for arm in g["methods"]]


# ------------------------------------------------------------------------------------------ execute


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
    action = {"train": _run_train, "mitigate": _run_mitigate, "continual": _run_continual}[u.action]
    metrics, scan, paths = action(u, folder, store)
    from lorascope.scan import library_versions

    record = {
        "record_version": RECORD_VERSION,
        "key": u.key,
        "study": u.study,
        "action": u.action,
        "unit": u.labels,
        "metrics": _clean(metrics),
        "scan": store.rel(folder / SCAN_FILE) if scan is not None else None,
        "scan_summary": _clean(scan.summary()) if scan is not None else None,
        "paths": {name: store.rel(p) for name, p in paths.items()},
        "deps": list(u.deps),
        "seconds": round(time.perf_counter() - start, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    atomic_write_json(folder / RECORD, record)
    return record


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (records are written with allow_nan=False)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None


def _scan(u: Unit, tuned: Path, folder: Path, device: str):
    """Alg. 1 of ``tuned`` against the pretrained base, saved as folder/scan.json."""
    from lorascope.scan import scan

    s = u.params["scan"]
    result = scan(u.params["base"], str(tuned), k=s["k"], epsilon=s["epsilon"], side=s["side"],
                  modules=s["modules"], device=device, dtype=s["dtype"])
    result.save(folder)
    return result


def scan_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Intruders at the scan's (ε, k) and the mean effective rank of ΔW, from a scan summary."""
    sides = summary["sides"]
    s = sides["left"] if "left" in sides else sides[sorted(sides)[0]]
    return {"n_intruders": s["n_intruders"], "matrices_with_intruders": s["matrices_with_intruders"],
            "n_matrices": s["n_matrices"], "effective_rank": s["mean_delta_effective_rank"]}


def forgetting_metrics(base: str, tuned_run: Path, settings: dict[str, Any], device: str) -> dict[str, Any]:
    """Every forgetting metric of ``tuned_run`` (a run folder) against ``base``: value, base value and
    % change, plus ``forgetting`` from the primary one (see the module docstring)."""
    from lorascope.evaluate import evaluate

    out: dict[str, Any] = {}
    for metric in settings["metrics"]:
        data = settings["sts_data"] if metric == "sts" else settings["data"]
        r = evaluate(base, adapter=str(tuned_run), metric=metric, data=data,
                     max_examples=settings["max_examples"], batch_size=settings["batch_size"],
                     max_length=settings["max_length"], device=device, progress=False)
        out[metric] = r["tuned"]
        out[f"{metric}_base"] = r["base"]
        out[f"{metric}_change_pct"] = r["change_pct"]
    primary = settings["primary"]
    if primary == "sts":
        change = out["sts_change_pct"]
        out["forgetting"] = None if change is None else -change
    else:
        out["forgetting"] = out[primary]
    out["forgetting_metric"] = primary
    return out


def _task_metrics(run: dict[str, Any]) -> dict[str, Any]:
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


def _run_train(u: Unit, folder: Path, store: Store):
    from lorascope.experiments.tracking import TRACKING_FILE, IntruderTracker
    from lorascope.train import TrainConfig, train

    cfg = TrainConfig(**u.train)
    tracking = u.params.get("tracking")
    callbacks, paths = [], {}
    if tracking:
        s = u.params["scan"]
        tb = folder / "tensorboard" if tracking["tensorboard"] else None
        tracker = IntruderTracker(u.params["base"], every=tracking["every"], k=s["k"], epsilon=s["epsilon"],
                                  modules=s["modules"], side=s["side"], device=cfg.device, dtype=s["dtype"],
                                  log=folder / TRACKING_FILE, tensorboard=tb, unit=u.labels)
        callbacks = [tracker]
        paths["tracking"] = folder / TRACKING_FILE
    run = train(cfg, folder / "run", progress=False, callbacks=callbacks)
    tuned = folder / "run" / (run["layout"]["adapter"] or run["layout"]["model"])
    result = _scan(u, tuned, folder, cfg.device)
    metrics = {**_task_metrics(run), **scan_metrics(result.summary())}
    metrics.update(forgetting_metrics(u.params["base"], folder / "run", u.params["forgetting"], cfg.device))
    if tracking:
        last = tracker.history[-1][1]["sides"]
        metrics["tracked_steps"] = len(tracker.history)
        # the last tracked scan is of the saved weights: it must agree with the post-hoc scan
        metrics["tracking_matches_scan"] = all(
            last[side]["n_intruders"] == s["n_intruders"] for side, s in result.summary()["sides"].items())
    paths.update(run=folder / "run", scan=folder / SCAN_FILE)
    return metrics, result, paths


def _run_mitigate(u: Unit, folder: Path, store: Store):
    """Scale by λ (Eq. 1) or the neighbour control (Eq. 2); a derived run folder makes the result loadable
    like any run (``run.json`` of the fine-tune, the new weights, its tokenizer)."""
    from lorascope.mitigate import mitigate
    from lorascope.models import read_run

    source = store.unit_dir(u.deps[0]) / "run"
    run = read_run(source)
    layout = run["layout"]
    tuned = source / (layout["adapter"] or layout["model"])
    target = folder / "run" / ("adapter" if layout["adapter"] else "model")
    s, device = u.params["scan"], u.train.get("device", "auto")
    control = None if u.params["control"] == "intruder" else "neighbour"
    result = mitigate(u.params["base"], str(tuned), target, lam=u.params["lam"], epsilon=s["epsilon"],
                      k=s["k"], which=u.params["which"], control=control, modules=s["modules"],
                      format="adapter" if layout["adapter"] else "merged", device=device)
    shutil.copytree(source / layout["tokenizer"], folder / "run" / layout["tokenizer"])
    derived = {**run, "mitigation": result.settings, "mitigated_from": store.rel(source)}
    atomic_write_json(folder / "run" / "run.json", derived)

    summary = result.summary()
    metrics: dict[str, Any] = {"n_directions": summary["n_directions"], "n_changed": summary["n_changed"],
                               "n_intruders_before": summary["n_intruders"],
                               "max_rel_error": summary["max_rel_error"]}
    train = u.train
    acc = _evaluate_task(folder / "run", train["task"], train.get("max_eval_examples"),
                         train.get("max_length", 128), device)
    metrics.update(acc)
    scan = None
    if u.params["scan_each"]:
        scan = _scan(u, target, folder, device)
        metrics.update(scan_metrics(scan.summary()))
    metrics.update(forgetting_metrics(u.params["base"], folder / "run", u.params["forgetting"], device))
    paths = {"run": folder / "run", "mitigation": target / "mitigation.json"}
    if scan is not None:
        paths["scan"] = folder / SCAN_FILE
    return metrics, scan, paths


def _evaluate_task(run_dir: Path, task: str, max_examples: int | None, max_length: int, device: str) -> dict:
    from lorascope.evaluate import evaluate

    r = evaluate(str(run_dir), metric="accuracy", data=task, max_examples=max_examples, max_length=max_length,
                 device=device, progress=False)
    name = r["details"].get("score", "accuracy")
    return {name: r["tuned"], "task_score": r["tuned"]}


def stage_model(store: Store, key: str) -> Path:
    """The run folder holding a continual stage's whole model: the merged LoRA, or the full run."""
    folder = store.unit_dir(key)
    return folder / "merged" if (folder / "merged").is_dir() else folder / "run"


def _run_continual(u: Unit, folder: Path, store: Store):
    from lorascope.models import merge_lora
    from lorascope.train import TrainConfig, train

    base = u.params["base"]
    start = base if not u.deps else str(stage_model(store, u.deps[-1]))
    cfg = TrainConfig(**{**u.train, "model": start})
    run = train(cfg, folder / "run", progress=False)
    if run["method"] == "lora":  # fold the adapter in; the next stage starts a fresh one on top
        merge_lora(folder / "run", folder / "merged")
    model_run = stage_model(store, u.key)
    result = _scan(u, model_run / "model", folder, cfg.device)  # accumulated against the original base

    metrics = {**_task_metrics(run), **scan_metrics(result.summary())}
    heads = [(t, store.unit_dir(k) / "run") for t, k in u.params["heads"]] + [(cfg.task, folder / "run")]
    scores = []
    for task, head_run in heads:
        name, value = head_score(head_run, model_run, task, cfg.max_eval_examples, cfg.max_length, cfg.device)
        metrics[f"{name}/{task_label(task)}"] = value
        scores.append(value)
    metrics["task_score"] = scores[-1]  # the stage's own task, scored like the earlier ones
    if name == "accuracy":
        metrics["accuracy"] = scores[-1]
    metrics["mean_task_score"] = sum(scores) / len(scores)
    metrics.update(forgetting_metrics(base, model_run, u.params["forgetting"], cfg.device))
    return metrics, result, {"run": folder / "run", "model": model_run, "scan": folder / SCAN_FILE}


def head_score(head_run: Path, backbone_run: Path, task: str, max_examples: int | None, max_length: int,
               device: str) -> tuple[str, float]:
    """A task's test score with the head trained on it (``head_run``) on another stage's backbone
    (``lorascope.models.transplant``): how much of task j survives the later stages."""
    from lorascope.data import load_task, subsample
    from lorascope.evaluate.metrics import score_examples
    from lorascope.models import load_trained, transplant
    from lorascope.runtime import resolve_device

    dev = resolve_device(device)
    head, tokenizer = load_trained(head_run, device=dev)
    donor, _ = load_trained(backbone_run, device=dev)
    model = transplant(head, donor).to(dev)
    data = load_task(task)
    test = subsample(data.test, max_examples)
    return score_examples(model, tokenizer, test, data.kind, max_length, 32, dev)


# ------------------------------------------------------------------------------------------ derived


def derive(kind: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers computed from the records alone (written to summary.json; ``status`` shows them)."""
    out: dict[str, Any] = {"n_records": len(records)}
    if kind == "sweeps":
        out["spearman"] = sweep_correlations(records)
    if kind == "intervention":
        out["lambda"] = lambda_changes(records)
    return out


def pct_change(value: float | None, ref: float | None) -> float | None:
    """100 (value − ref) / |ref|, the paper's % change (None when undefined)."""
    if value is None or ref is None or ref == 0:
        return None
    return 100.0 * (value - ref) / abs(ref)


def lambda_changes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paper Tables 3-4: for each fine-tune, control and λ, the % change in accuracy and in forgetting
    against λ = 1 (the unmodified fine-tune) of the same fine-tune and control."""
    rows = []
    lam_records = [r for r in records if r["unit"].get("lam") is not None]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in lam_records:
        rest = {k: v for k, v in r["unit"].items() if k not in ("lam",)}
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append(r)
    for key, recs in groups.items():
        ref = next((r["metrics"] for r in recs if r["unit"]["lam"] == 1.0), None)
        for r in sorted(recs, key=lambda r: r["unit"]["lam"]):
            m = r["metrics"]
            rows.append({"arm": json.loads(key), "lam": r["unit"]["lam"], "accuracy": m.get("accuracy"),
                         "forgetting": m.get("forgetting"), "n_intruders": m.get("n_intruders"),
                         "accuracy_change_pct": pct_change(m.get("accuracy"), ref and ref.get("accuracy")),
                         "forgetting_change_pct": pct_change(m.get("forgetting"),
                                                             ref and ref.get("forgetting"))})
    return rows


def sweep_correlations(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spearman ρ between intruder count and forgetting (paper: ρ = 0.971, RoBERTa r = 8, MNLI):
    over every unit of an arm, and along each sweep line (lr at a fixed n, n at a fixed lr)."""
    from lorascope.evaluate import spearman

    rows = []
    swept = ("lr", "n_examples", "seed")

    def arm_of(r: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in r["unit"].items() if k not in swept}, sort_keys=True)

    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((arm_of(r), "all", None), []).append(r)
        groups.setdefault((arm_of(r), "lr", r["unit"].get("n_examples")), []).append(r)
        groups.setdefault((arm_of(r), "n_examples", r["unit"].get("lr")), []).append(r)
    for (arm, axis, fixed), recs in groups.items():
        pts = [(r["metrics"].get("n_intruders"), r["metrics"].get("forgetting")) for r in recs]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if axis != "all" and len({r["unit"].get(axis) for r in recs}) < 3:
            continue
        rho = None
        if len(pts) >= 3:
            try:
                rho = spearman([p[0] for p in pts], [p[1] for p in pts])
            except NonFiniteError:  # constant intruder counts or forgetting: undefined
                rho = None
        fixed_name = {"lr": "n_examples", "n_examples": "lr"}.get(axis)
        rows.append({"arm": json.loads(arm), "axis": axis, **({fixed_name: fixed} if fixed_name else {}),
                     "n": len(pts), "spearman_intruders_forgetting": rho})
    return rows

