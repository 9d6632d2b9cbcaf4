"""Tables and headline sentences from stored results: grouping and % changes, no recomputed maths.

% change follows the paper (Table 3): 100 · (v − v_ref) / |v_ref|, with v_ref the λ = 1 record
(the unmodified fine-tune) of the same sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lorascope.report.labels import unit_name, varying_keys
from lorascope.report.loader import Mitigation, Record, ReportData, Run

MAX_MATRIX_ROWS = 3000  # the per-matrix table keeps the matrices with the most intruders


@dataclass
class Table:
    """A sortable table: raw cell values (the page formats numbers and sorts on the raw value)."""

    id: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Group:
    """Records that share every unit setting except the ones a sweep varies (λ, stage, ...)."""

    label: str
    records: list[Record] = field(default_factory=list)


def number(v: Any) -> float | None:
    """A finite float, or None for anything else (missing, text, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def pct_change(value: Any, ref: Any) -> float | None:
    """100 · (value − ref) / |ref| (the paper's "% change"); None when either is missing or ref = 0."""
    v, r = number(value), number(ref)
    if v is None or r is None or r == 0:
        return None
    return 100.0 * (v - r) / abs(r) + 0.0  # + 0.0: no −0.0 when v = r


def group_records(records: list[Record], drop: tuple[str, ...]) -> list[Group]:
    """Group by the unit settings outside ``drop``; groups are named by the settings that differ."""
    groups: dict[str, Group] = {}
    rests: dict[str, dict[str, Any]] = {}
    for r in records:
        rest = {k: v for k, v in r.unit.items() if k not in drop}
        key = json.dumps(rest, sort_keys=True, default=str)
        groups.setdefault(key, Group(label="")).records.append(r)
        rests[key] = rest
    varying = varying_keys(list(rests.values()))
    for key, g in groups.items():
        g.label = unit_name(rests[key], varying) if varying else "all"
    return list(groups.values())


def same(values: list[Any]) -> Any:
    """The one value all of ``values`` share, else None."""
    distinct = {json.dumps(v, default=str) for v in values}
    return values[0] if len(distinct) == 1 else None


# ------------------------------------------------------------------------------------- scan tables


def scan_summary_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for side, s in run.summary.get("sides", {}).items():
            settings = run.result.settings if run.result is not None else {}
            rows.append([run.label, side, run.summary.get("epsilon"), run.summary.get("k"),
                         s.get("n_matrices"), s.get("n_intruders"), s.get("matrices_with_intruders"),
                         s.get("mean_delta_effective_rank"), settings.get("tuned_kind")])
    columns = ["run", "side", "ε", "k", "matrices", "intruders", "matrices with intruders",
               "mean eff. rank ΔW", "tuned"]
    return Table("scans", "Scans", columns, rows)


def matrix_table(runs: list[Run]) -> Table:
    rows = []
    for run in runs:
        for m in run.result.matrices if run.result is not None else []:
            rows.append([run.label, m.side, m.name, m.layer, m.module_type, "×".join(map(str, m.shape)),
                         m.n_intruders, min(m.max_cos) if m.max_cos else None, m.null_max_cos_q99,
                         m.delta_effective_rank, m.delta_stable_rank, m.delta_rel_norm, m.exact])
    rows.sort(key=lambda r: (-(r[6] or 0), r[7] if r[7] is not None else 1.0))
    note = ""
    if len(rows) > MAX_MATRIX_ROWS:
        note = f"The {MAX_MATRIX_ROWS} of {len(rows)} matrices with the most intruders."
        rows = rows[:MAX_MATRIX_ROWS]
    return Table("matrices", "Matrices", ["run", "side", "matrix", "layer", "module", "shape", "intruders",
                                          "min max|cos|", "chance max|cos| q99", "eff. rank ΔW",
                                          "stable rank ΔW", "‖ΔW‖/‖W0‖", "exact"], rows, note)


LAM_AXIS = ("lam", "control")  # what a mitigation sweep varies for one adapter


@dataclass
class MitigationGroup:
    """Every mitigation.json of one adapter (one fine-tune, one ``which``): the λ × control sweep."""

    label: str
    items: list[Mitigation] = field(default_factory=list)  # sorted by (control, λ)

    @property
    def changed(self) -> list[Mitigation]:
        """The mitigations that changed the weights: λ = 1 leaves W_t as it was."""
        return [m for m in self.items if m.lam != 1.0]


def mitigation_groups(mitigations: list[Mitigation]) -> list[MitigationGroup]:
    """One group per adapter: the unit that wrote it without λ and control, or, for a mitigation.json
    of its own, the tuned model it edited and its settings other than λ and control."""
    keys: dict[str, dict[str, Any]] = {}
    groups: dict[str, MitigationGroup] = {}
    for m in mitigations:
        if m.unit is not None:
            rest = {k: v for k, v in m.unit.items() if k not in LAM_AXIS}
        else:
            rest = {k: v for k, v in m.settings.items() if k not in LAM_AXIS}
        key = json.dumps(rest, sort_keys=True, default=str)
        keys[key] = rest
        groups.setdefault(key, MitigationGroup("")).items.append(m)
    varying = varying_keys([k for k in keys.values() if "method" in k])
    for key, g in groups.items():
        g.items.sort(key=lambda m: (m.control, m.lam if m.lam is not None else math.inf))
        rest = keys[key]
        if g.items[0].unit is not None:
            g.label = unit_name(rest, varying) or g.items[0].label
        else:
            g.label = str(rest.get("tuned") or g.items[0].label)
    return list(groups.values())


def mitigation_sweep_table(g: MitigationGroup, n: int) -> Table:
    """One row per λ and control: what was scaled, how exactly, and what it did (when a unit measured it)."""
    rows = []
    for m in g.items:
        s, rec = m.summary, m.record
        rescaled = 0 if m.lam == 1.0 else s["n_directions"]  # λ = 1 multiplies by one: nothing changes
        rows.append([m.lam, m.control, m.settings.get("which"), s["n_directions"], rescaled,
                     0 if m.lam == 1.0 else s["n_changed"], s["n_matrices"], s["max_rel_error"],
                     number(rec.metrics.get("accuracy")) if rec else None,
                     number(rec.metrics.get("forgetting")) if rec else None,
                     rec.n_intruders if rec else None])
    columns = ["λ", "control", "which", "directions selected", "directions rescaled", "matrices changed",
               "matrices", "max rel. error of written W", "accuracy", "forgetting", "intruders left"]
    keep = [i for i, _ in enumerate(columns) if any(r[i] is not None for r in rows)]
    return Table(f"mitigation-{n}", f"Mitigations: {g.label}", [columns[i] for i in keep],
                 [[r[i] for i in keep] for r in rows],
                 "W_t' = W_t + (λ−1) Σ_i σ_i u_i v_iᵀ over the selected directions; λ = 1 leaves W_t unchanged.")


def mitigation_table(g: MitigationGroup, n: int) -> Table:
    """The directions each control selects (the same for every λ of it), with σ before and at each λ."""
    lams = sorted({m.lam for m in g.changed if m.lam is not None})
    rows: dict[tuple[str, str, int], list[Any]] = {}
    for m in g.changed:
        for c in m.changes:
            index = c["base_index"] if c["target"] == "neighbour" else c["intruder_index"]
            row = rows.setdefault((c["matrix"], c["target"], index),
                                  [c["matrix"], c["target"], c["intruder_index"], c["base_index"], c["max_cos"],
                                   c["sigma_before"]] + [None] * len(lams) + [None])
            row[6 + lams.index(m.lam)] = c["sigma_after"]
            err = number(c["rel_error"])
            row[-1] = err if row[-1] is None or (err is not None and err > row[-1]) else row[-1]
    return Table(f"directions-{n}", f"Rescaled directions: {g.label}",
                 ["matrix", "target", "intruder j", "base match i*", "intruder max|cos|", "σ before"]
                 + [f"σ at λ = {lam:g}" for lam in lams] + ["rel. error of written W"], list(rows.values()),
                 "Indices are 0-based ranks among the singular vectors.")


# ------------------------------------------------------------------------------- experiment tables


def records_table(records: list[Record]) -> Table:
    ukeys = list(dict.fromkeys(k for r in records for k in r.unit))
    mkeys = list(dict.fromkeys(k for r in records for k in r.metrics))
    rows = [[_scalar(r.unit.get(k)) for k in ukeys] + [_scalar(r.metrics.get(k)) for k in mkeys]
            + [r.n_intruders, r.run.label if r.run is not None else None] for r in records]
    intruders = "intruders" if "n_intruders" in mkeys else "intruders (scan)"
    columns = ukeys + mkeys + [intruders, "scan"]
    return Table("records", "Experiment records", columns, rows)


def control_of(unit: dict[str, Any]) -> str:
    """'neighbour' for the paper's control (the best-matching base vector scaled), else 'intruder'."""
    c = str(unit.get("control") or "").lower()
    return "neighbour" if c in ("neighbour", "neighbor") else "intruder"


def sweep_records(records: list[Record]) -> list[Record]:
    """Fine-tunes of a sweep (paper Fig. 7): records of a sweeps study, else plain units (no λ, no
    stage); only those with both an intruder count and a forgetting number."""
    plain = [r for r in records if number(r.unit.get("lam")) is None and number(r.unit.get("stage")) is None
             and not r.unit.get("merge")]  # a merge is no fine-tune of a sweep (report/merges.py)
    sweeps = [r for r in plain if r.study == "sweeps"] or plain
    return [r for r in sweeps if r.n_intruders is not None and number(r.metrics.get("forgetting")) is not None]


SWEPT = ("lr", "n_examples", "seed")  # what a sweep varies within one arm (experiments/kinds/sweeps.py)


def arm_key(store: str, unit: dict[str, Any]) -> str:
    return json.dumps([store, {k: v for k, v in unit.items() if k not in SWEPT}], sort_keys=True, default=str)


def spearman_of(data: ReportData) -> dict[str, dict[str, Any]]:
    """The stored ρ over every unit of an arm (summary.json, axis "all"), by ``arm_key``."""
    return {arm_key(r.get("store", ""), r.get("arm") or {}): r for r in data.spearman if r.get("axis") == "all"}


def spearman_table(data: ReportData) -> Table:
    rows = []
    for r in data.spearman:
        arm = r.get("arm") or {}
        fixed = next(((k, r[k]) for k in ("n_examples", "lr") if k in r), None)
        along = {"all": "every unit", "lr": "learning rate", "n_examples": "training-set size"}.get(r.get("axis"))
        rows.append([r.get("store") or None, unit_name(arm) or json.dumps(arm), along or r.get("axis"),
                     None if fixed is None else f"{fixed[0]} = {'default' if fixed[1] is None else fixed[1]}",
                     r.get("n"),
                     number(r.get("spearman_intruders_forgetting"))])
    return Table("spearman", "Spearman ρ between intruder count and forgetting",
                 ["store", "arm", "over", "fixed", "n", "ρ"], rows,
                 "As stored in the store's summary.json; the paper reports ρ = 0.971 (RoBERTa, r = 8, MNLI). "
                 "ρ is undefined (–) when the intruder counts or the forgetting are constant.")


def lam_groups(records: list[Record]) -> list[Group]:
    # a merge study's λ (inputs' intruders scaled before the merge) is its own section (report/merges.py)
    return group_records([r for r in records if number(r.unit.get("lam")) is not None and not r.unit.get("merge")],
                         ("lam", "control"))


def lam_rows(group: Group) -> tuple[list[dict[str, Any]], Record | None]:
    """One row per λ: accuracy and forgetting per control, and their % change against λ = 1."""
    ref = next((r for r in group.records if number(r.unit["lam"]) == 1.0), None)
    by_lam: dict[float, dict[str, Any]] = {}
    # λ = 1 leaves the weights as they were, whatever the target: one record serves both controls.
    pairs = [(r, control_of(r.unit)) for r in group.records if r is not ref]
    if ref is not None:
        pairs += [(ref, "intruder"), (ref, "neighbour")]
    for r, c in pairs:
        row = by_lam.setdefault(float(r.unit["lam"]), {"lam": float(r.unit["lam"])})
        row[f"{c}_acc"] = number(r.metrics.get("accuracy"))
        row[f"{c}_forg"] = number(r.metrics.get("forgetting"))
        row[f"{c}_intr"] = r.n_intruders
        if ref is not None:
            row[f"{c}_dacc"] = pct_change(r.metrics.get("accuracy"), ref.metrics.get("accuracy"))
            row[f"{c}_dforg"] = pct_change(r.metrics.get("forgetting"), ref.metrics.get("forgetting"))
    return [by_lam[lam] for lam in sorted(by_lam)], ref


def lam_table(group: Group, n: int) -> Table:
    """Paper Table 3: rows λ; % change in accuracy and in forgetting, intruders vs. the neighbour control."""
    rows, ref = lam_rows(group)
    cols = [("intruder_dacc", "intruder Δacc %"), ("intruder_dforg", "intruder Δforgetting %"),
            ("neighbour_dacc", "neighbour Δacc %"), ("neighbour_dforg", "neighbour Δforgetting %"),
            ("intruder_acc", "intruder acc"), ("intruder_forg", "intruder forgetting"),
            ("neighbour_acc", "neighbour acc"), ("neighbour_forg", "neighbour forgetting"),
            ("intruder_intr", "intruders left")]
    if ref is None:
        cols = cols[4:]
    present = [(k, title) for k, title in cols if any(r.get(k) is not None for r in rows)]
    note = ("% change = 100·(v − v(λ=1)) / |v(λ=1)|." if ref is not None
            else "No λ = 1 record in this sweep, so no % change.")
    title = "λ trade-off" + (f": {group.label}" if group.label != "all" else "")
    return Table(f"lam-{n}", title, ["λ"] + [t for _, t in present],
                 [[r["lam"]] + [r.get(k) for k, _ in present] for r in rows], note)


def continual_groups(records: list[Record]) -> list[Group]:
    groups = group_records([r for r in records if number(r.unit.get("stage")) is not None], ("stage", "task"))
    for g in groups:
        g.records.sort(key=lambda r: r.unit["stage"])
    return groups


# A continual stage's score on each task so far: accuracy (classification) or exact match (a decoder's
# prompt/response task), both higher-is-better; a decoder's text task has an LM loss instead.
TASK_SCORES = ("accuracy/", "exact_match/")
TASK_LOSS = "lm_loss/"


def task_score(metrics: dict[str, Any], task: str) -> float | None:
    """The stage's score on ``task`` (:data:`TASK_SCORES`), or None."""
    return next((number(metrics[p + task]) for p in TASK_SCORES if number(metrics.get(p + task)) is not None), None)


def task_names(records: list[Record], prefixes: tuple[str, ...] = TASK_SCORES) -> list[str]:
    """Tasks with a metric of one of ``prefixes`` (``accuracy/<task>``, ...), in the order they were first
    trained or seen."""
    keyed = [k.split("/", 1)[1] for r in records for k in r.metrics if k.startswith(prefixes)]
    names, known = [r.unit["task"] for r in records if "task" in r.unit] + keyed, set(keyed)
    return [t for t in dict.fromkeys(names) if t in known]


def forgetting_metric(records: list[Record]) -> str | None:
    """The name of the forgetting metric the records store (``forgetting_metric``), if any."""
    return next((r.metrics["forgetting_metric"] for r in records if r.metrics.get("forgetting_metric")), None)


def forgetting_axis(records: list[Record]) -> str:
    """An axis label for ``metrics.forgetting`` that names the metric the records used."""
    metric = forgetting_metric(records)
    return f"forgetting ({metric})" if metric else "forgetting"


def continual_table(group: Group, n: int) -> Table:
    tasks, texts = task_names(group.records), task_names(group.records, (TASK_LOSS,))
    rows = [[r.unit["stage"], r.unit.get("task")] + [task_score(r.metrics, t) for t in tasks]
            + [number(r.metrics.get(TASK_LOSS + t)) for t in texts]
            + [number(r.metrics.get("accuracy")), number(r.metrics.get("forgetting")), r.n_intruders]
            for r in group.records]
    metric = forgetting_metric(group.records)
    title = "Continual learning" + (f": {group.label}" if group.label != "all" else "")
    return Table(f"continual-{n}", title, ["stage", "task trained"] + [f"score {t}" for t in tasks]
                 + [f"LM loss {t}" for t in texts]
                 + ["score", f"forgetting ({metric})" if metric else "forgetting", "intruders"], rows)


def _scalar(v: Any) -> Any:
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else v


# ---------------------------------------------------------------------------------------- headline


def _fmt(v: Any) -> str:
    x = number(v)
    return "–" if x is None else (f"{x:.0f}" if x == int(x) and abs(x) < 1e6 else f"{x:.3g}")


def _count(run: Run) -> str:
    s = run.stats
    if not s.get("n_matrices"):
        return "no matrices scanned"
    return (f"{_fmt(s.get('n_intruders'))} intruder dimensions in "
            f"{_fmt(s.get('matrices_with_intruders'))} of {_fmt(s.get('n_matrices'))} matrices")


def _risk(run: Run) -> float | None:
    """The stored data-free risk (schema ≥ 1.1: summary.sides.<side>.risk.scores.risk), else None."""
    return number((run.stats.get("risk") or {}).get("scores", {}).get("risk"))


def _pct(v: float | None) -> str:
    """'+4.0 %', '-12.1 %', and '0.0 %' for anything that rounds to zero (never '-0.0 %')."""
    if v is None:
        return "–"
    text = f"{v:+.1f}"
    return "0.0 %" if float(text) == 0 else f"{text} %"


def where(run: Run) -> str:
    """The settings a scan's numbers hold at: 'ε = 0.5, k = 10' (each scan its own)."""
    return f"ε = {run.summary.get('epsilon')}, k = {run.summary.get('k')}"


def _lams(values: list[float]) -> str:
    return "λ = " + ", ".join(f"{v:g}" for v in values)


def mitigation_line(g: MitigationGroup) -> str:
    """One sentence per adapter: the λ values, what each control rescaled, and how exactly."""
    lams = sorted({m.lam for m in g.items if m.lam is not None})
    which = same([m.settings.get("which") for m in g.items])
    head = f"Mitigation ({g.label}, {_lams(lams)}" + (f", which = {which}" if which else "") + ")"
    parts = []
    for control in ("intruder", "neighbour"):
        mine = [m for m in g.changed if m.control == control]
        if mine:
            s = max(mine, key=lambda m: m.summary["n_directions"]).summary
            what = "directions rescaled" if control == "intruder" else "base neighbours rescaled (control)"
            parts.append(f"{s['n_directions']} {what} in {s['n_changed']} of {s['n_matrices']} matrices")
    if 1.0 in lams:
        parts.append("λ = 1 leaves the weights unchanged")
    errs = [number(m.summary.get("max_rel_error")) for m in g.changed]
    errs = [e for e in errs if e is not None]
    text = f"{head}: " + "; ".join(parts)
    return text + (f"; largest relative error of the written weights {max(errs):.1e}." if errs else ".")


def headline(data: ReportData) -> list[str]:
    """Sentences for the top of the report, most important first."""
    lines = []
    # Scans with their full records lead; summaries kept by λ or continual records have their own lines.
    runs = [r for r in data.runs if r.result is not None] or data.runs
    if runs:
        r0, sides = runs[0], {r.side for r in runs}
        shared = same([where(r) for r in runs])  # each scan's counts hold at its own ε and k
        at = shared or "each scan's own ε and k"
        at = f"{r0.side} singular vectors, {at}" if len(sides) == 1 else at
        counts = [_count(r) + ("" if len(sides) == 1 else f" ({r.side})") + ("" if shared else f" at {where(r)}")
                  for r in runs]
        if len(runs) == 1:
            lines.append(f"{counts[0]} ({at}); mean effective rank of ΔW "
                         f"{_fmt(r0.stats.get('mean_delta_effective_rank'))}.")
        elif len(runs) <= 4:
            parts = [f"{r.label}: {c}" for r, c in zip(runs, counts, strict=True)]
            lines.append("; ".join(parts) + f" ({at}).")
        else:
            ranked = sorted(runs, key=lambda r: number(r.stats.get("n_intruders")) or 0)
            lo, hi = ranked[0], ranked[-1]
            lo_at, hi_at = ("", "") if shared else (f" at {where(lo)}", f" at {where(hi)}")
            lines.append(f"Across {len(runs)} scans ({at}), intruder dimensions range from "
                         f"{_fmt(lo.stats.get('n_intruders'))} ({lo.label}{lo_at}) to "
                         f"{_fmt(hi.stats.get('n_intruders'))} ({hi.label}{hi_at}).")
        risky = [r for r in runs if _risk(r) is not None]
        if risky:
            worst = max(risky, key=_risk)
            scores = worst.stats["risk"]["scores"]
            which = "" if len(risky) == 1 else f"highest of {len(risky)} scans: {worst.label}, "
            lines.append(f"Data-free risk {_risk(worst):.2f} ({which}the worst matrix's σ-weighted share of its "
                         f"top-{worst.stats['risk'].get('k')} spectrum in directions new to the base; strength "
                         f"{_fmt(scores.get('strength'))}); "
                         f"{worst.stats['risk'].get('validation') or 'not validated against measured forgetting'}.")
    forg = [r for r in data.records if number(r.metrics.get("forgetting")) is not None
            and number(r.unit.get("lam")) is None and number(r.unit.get("stage")) is None]
    if len(forg) == 1:
        lines.append(f"Forgetting {_fmt(forg[0].metrics['forgetting'])}.")
    elif forg:
        groups = group_records(forg, ())
        lo = min(forg, key=lambda r: r.metrics["forgetting"])
        hi = max(forg, key=lambda r: r.metrics["forgetting"])
        name = {id(r): g.label for g in groups for r in g.records}
        lines.append(f"Forgetting ranges from {_fmt(lo.metrics['forgetting'])} ({name[id(lo)]}) to "
                     f"{_fmt(hi.metrics['forgetting'])} ({name[id(hi)]}) over {len(forg)} records.")
    rho = spearman_of(data)
    for row in rho.values():
        arm = unit_name(row.get("arm") or {}) or "all units"
        value = number(row.get("spearman_intruders_forgetting"))
        text = (f"{value:.2f}" if value is not None
                else "undefined (the intruder counts or the forgetting are constant)")
        lines.append(f"Sweep ({arm}): Spearman ρ between intruders and forgetting {text} over "
                     f"{row.get('n')} fine-tunes (paper Fig. 7: ρ = 0.971).")
    for g in mitigation_groups(data.mitigations):
        lines.append(mitigation_line(g))
    for g in lam_groups(data.records):
        rows, ref = lam_rows(g)
        rows = [r for r in rows if r["lam"] != 1.0 and r.get("intruder_dforg") is not None]
        if ref is None or not rows:
            continue
        best = min(rows, key=lambda r: r["intruder_dforg"])
        prefix = "λ trade-off" + ("" if g.label == "all" else f" ({g.label})")
        lines.append(f"{prefix}: scaling intruders with λ = {best['lam']:g} changes accuracy by "
                     f"{_pct(best.get('intruder_dacc'))} and forgetting by {_pct(best['intruder_dforg'])} "
                     f"(neighbour control: {_pct(best.get('neighbour_dacc'))}, "
                     f"{_pct(best.get('neighbour_dforg'))}).")
    for g in continual_groups(data.records):
        first, last = g.records[0], g.records[-1]
        prefix = "Continual learning" + ("" if g.label == "all" else f" ({g.label})")
        task = first.unit.get("task")
        acc = f"accuracy/{task}"
        text = f"{prefix}: {len(g.records)} stages"
        if task is not None and acc in first.metrics and acc in last.metrics:
            text += f"; accuracy on {task} went from {_fmt(first.metrics[acc])} to {_fmt(last.metrics[acc])}"
        if first.n_intruders is not None and last.n_intruders is not None:
            text += f"; intruders from {_fmt(first.n_intruders)} to {_fmt(last.n_intruders)}"
        lines.append(text + ".")
    for g in group_records(data.tracking, ()):
        pts = sorted((r for r in g.records if r.n_intruders is not None), key=lambda r: r.step)
        if pts:
            prefix = "During training" + ("" if g.label == "all" else f" ({g.label})")
            lines.append(f"{prefix}: intruders went from {_fmt(pts[0].n_intruders)} at step {pts[0].step} to "
                         f"{_fmt(pts[-1].n_intruders)} at step {pts[-1].step}.")
    return lines
