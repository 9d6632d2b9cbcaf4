"""``mitigations``: one λ edit of every intruder (paper Eq. 1, ``--which all``), done three ways on the
same fine-tune, side by side:

- ``exact``: ``lorascope mitigate --which all``, which writes ΔW' = ΔW + (λ − 1) Σ_{i∈I} σ_i u_i v_iᵀ
  (σ_i, u_i, v_i from W_t = W_0 + ΔW) exactly, as a LoRA of rank r + |I|;
- ``compress``: the same, re-factorised to rank R (``--compress R``, default the arm's rank r): the best
  rank-R approximation of ΔW' (Eckart–Young);
- ``peft``: PEFT's own ``reduce_intruder_dimension`` (peft.tuners.lora.intruders), which applies Eq. 1
  and truncates ΔW' back to rank r.

Each unit scores the task, scans the edited model and measures forgetting; ``compress`` and ``peft``
also give their distance from the exact edit, ‖ΔW'_x − ΔW'‖_F / ‖ΔW'‖_F over all adapted matrices.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from lorascope.errors import InputError
from lorascope.experiments.arms import ArmsGrid
from lorascope.experiments.checks import each
from lorascope.experiments.kinds.intervention import task_score
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

EDITS = ("exact", "compress", "peft")
PEFT_ADAPTER = "intruder_reduced"  # the adapter name reduce_intruder_dimension creates


class Grid(ArmsGrid):
    methods: list[Any] = [{"method": "lora", "rank": 1}]
    lams: Annotated[list[float], each(lambda lam: 0 <= lam <= 2, "λ must lie in [0, 2], got {}")] = [0.75]
    edits: Annotated[list[str], each(lambda e: e in EDITS, f"edits are {EDITS}, not {{}}")] = list(EDITS)
    compress: int | None = None  # the rank of the compress edit [default: the arm's LoRA rank]


def plan(cfg: ExperimentConfig) -> list[Unit]:
    g = cfg.grid
    units = []
    for arm in g["methods"]:
        if arm.get("method", "lora") != "lora":
            raise InputError(f"mitigations: PEFT's reduce_intruder_dimension takes a plain LoRA, not {arm}")
        for task in cfg.tasks:
            for seed in cfg.seeds:
                tuned = train_unit(cfg, arm, task, seed, "mitigations")
                units.append(tuned)
                rank = g.get("compress") or tuned.labels["rank"]
                for lam in g["lams"]:
                    exact = _edit_unit(cfg, tuned, float(lam), "exact", None, (tuned.key,))
                    units.append(exact)  # the other edits are measured against it: always run
                    units += [_edit_unit(cfg, tuned, float(lam), e, rank if e == "compress" else None,
                                         (tuned.key, exact.key)) for e in g["edits"] if e != "exact"]
    return units


def _edit_unit(cfg: ExperimentConfig, tuned: Unit, lam: float, edit: str, rank: int | None,
               deps: tuple[str, ...]) -> Unit:
    labels = {**tuned.labels, "lam": lam, "edit": edit, "which": "all", **({"compress": rank} if rank else {})}
    params = {**shared_params(cfg), "lam": lam, "edit": edit, "compress": rank}
    return Unit("mitigations", "edit", labels, tuned.train, params, deps)


def run_edit(u: Unit, folder: Path, store: Store):
    """One edit of the fine-tune (see the module docstring) into ``folder/run``, then its numbers."""
    from lorascope.mitigation.api import mitigate_run

    source = store.unit_dir(u.deps[0]) / "run"
    s, device, lam = u.params["scan"], u.train.get("device", "auto"), u.params["lam"]
    metrics: dict[str, Any] = {}
    if u.params["edit"] == "peft":
        with timed("edit"):
            metrics.update(peft_reduce(u, source, folder / "run", store.rel(source)))
        target = folder / "run" / "adapter"
    else:
        with timed("edit"):
            result, target = mitigate_run(u.params["base"], source, folder / "run", origin=store.rel(source),
                                          lam=lam, epsilon=s["epsilon"], k=s["k"], which="all",
                                          modules=s["modules"], format="adapter", compress=u.params["compress"],
                                          device=device)
        summary = result.summary()
        metrics.update(n_changed=summary["n_changed"], n_intruders_before=summary["n_intruders"],
                       max_rel_error=summary["max_rel_error"])
    train = u.train
    metrics.update(task_score(folder / "run", train["task"], train.get("max_eval_examples"),
                              train.get("max_length", 128), device))
    if len(u.deps) > 1:
        exact = store.unit_dir(u.deps[1]) / "run" / "adapter"
        metrics.update(update_distance(u.params["base"], exact, target, s["modules"]))
    scan = scan_unit(u, target, folder, device)
    metrics.update(scan_metrics(scan.summary()))
    metrics.update(forgetting_metrics(u.params["base"], folder / "run", u.params["forgetting"], device,
                                      known_base=dependency_base_values(u, store)))
    return metrics, scan, {"run": folder / "run", "scan": folder / SCAN_FILE}


ACTIONS = {"edit": run_edit}


def peft_reduce(u: Unit, run: Path, out: Path, origin: str) -> dict[str, Any]:
    """PEFT's ``reduce_intruder_dimension`` (at the unit's λ, k, ε) on a LoRA run, saved as a run folder
    at ``out``.

    PEFT's new adapter gets fresh copies of the *original* ``modules_to_save`` (for a classifier: the
    untrained head), so the task is scored twice: with that head (``task_score_peft_head``) and, for the
    comparison, with the run's trained head copied in (the saved adapter).
    """
    import torch
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from peft.utils import ModulesToSaveWrapper

    from lorascope.io.writers import atomic_write_json
    from lorascope.models import load_trained, read_run
    from lorascope.train.config import TrainConfig
    from lorascope.train.recipes import task_scorer

    record = read_run(run)
    lam, k, epsilon = u.params["lam"], u.params["scan"]["k"], u.params["scan"]["epsilon"]
    model, _ = load_trained(u.params["base"], run)
    with torch.no_grad():
        reduce_intruder_dimension(model, top_k=k, threshold_epsilon=epsilon, mitigation_lambda=lam,
                                  logging_sink=None)
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    as_left = task_scorer(TrainConfig(**{**u.train, "device": "cpu"}))(model) if heads else None
    for m in heads:
        m.modules_to_save[PEFT_ADAPTER].load_state_dict(m.modules_to_save["default"].state_dict())
    tmp = out / "_peft"
    model.save_pretrained(tmp, selected_adapters=[PEFT_ADAPTER])
    saved = tmp / PEFT_ADAPTER if (tmp / PEFT_ADAPTER).is_dir() else tmp
    out.mkdir(parents=True, exist_ok=True)
    shutil.move(str(saved), out / "adapter")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / record["layout"]["tokenizer"], out / record["layout"]["tokenizer"])
    settings = {"implementation": "peft.tuners.lora.intruders.reduce_intruder_dimension", "lam": lam, "k": k,
                "epsilon": epsilon}
    atomic_write_json(out / "run.json", {**record, "layout": {**record["layout"], "adapter": "adapter"},
                                         "mitigation": settings, "mitigated_from": origin})
    return {"task_score_peft_head": next(iter(as_left.values()))} if as_left else {}


def update_distance(base: str, exact: Path, other: Path, modules: str | None) -> dict[str, float]:
    """‖ΔW'_x − ΔW'‖_F / ‖ΔW'‖_F in float64, summed over every matrix either adapter changes
    (``rel_distance``), and the largest per-matrix ratio (``max_rel_distance``)."""
    from lorascope.io.checkpoint import Checkpoint
    from lorascope.io.layout import orient
    from lorascope.io.tuned import open_tuned
    from lorascope.models import resolve_model_path
    from lorascope.scanning.options import ScanOptions
    from lorascope.scanning.pairing import pair_matrices
    from lorascope.spectral.operators import dense

    ckpt = Checkpoint(resolve_model_path(base))
    opts = ScanOptions(modules=modules)
    sources = [open_tuned(exact), open_tuned(other)]
    pairs = [{p.name: p for p in pair_matrices(ckpt, src, opts)[0]} for src in sources]
    if set(pairs[0]) != set(pairs[1]):
        raise InputError(f"{exact} and {other} adapt different matrices: no distance between them")
    num = den = worst = 0.0
    for name, p in pairs[0].items():
        W0 = orient(ckpt.get(name), p.kind).double()
        d_exact, d_other = (dense(src.delta(pp[name].ref, W0, p.kind)).double()
                            for src, pp in zip(sources, pairs, strict=True))
        diff, norm = float((d_other - d_exact).norm()) ** 2, float(d_exact.norm()) ** 2
        num, den = num + diff, den + norm
        worst = max(worst, math.sqrt(diff / norm) if norm else 0.0)
    return {"rel_distance": math.sqrt(num / den), "max_rel_distance": worst}
