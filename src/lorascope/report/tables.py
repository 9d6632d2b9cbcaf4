"""Tables and headline sentences from stored results: grouping and % changes, no recomputed maths.

% change follows the paper (Table 3): 100 · (v − v_ref) / |v_ref|, with v_ref the λ = 1 record
(the unmodified fine-tune) of the same sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

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
    return 100.0 * (v - r) / abs(r)


def group_records(records: list[Record], drop: tuple[str, ...]) -> list[Group]:
    """Group by the unit settings outside ``drop``; groups are named by the settings that differ."""
    groups: dict[str, Group] = {}
    rests: dict[str, dict[str, Any]] = {}
    for r in records:
        rest = {k: v for k, v in r.unit.items() if k not in drop}
        key = json.dumps(rest, sort_keys=True, default=str)
        groups.setdefault(key, Group(label="")).records.append(r)
        rests[key] = rest
    units = list(rests.values())
    keys = sorted({k for u in units for k in u})
    varying = [k for k in keys if len({json.dumps(u.get(k), default=str) for u in units}) > 1]
    for key, g in groups.items():
        g.label = " ".join(f"{k}={rests[key][k]}" for k in varying if rests[key].get(k) is not None) or "all"
    return list(groups.values())


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


def mitigation_table(m: Mitigation, n: int) -> Table:
    rows = [[c["matrix"], c["target"], c["intruder_index"], c["base_index"], c["max_cos"], c["sigma_before"],
             c["sigma_after"], c["rel_error"]] for c in m.changes]
    return Table(f"mitigation-{n}", f"Rescaled directions: {m.label}",
                 ["matrix", "target", "intruder j", "base match i*", "intruder max|cos|", "σ before",
                  "σ after", "rel. error of written W"], rows,
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


def lam_groups(records: list[Record]) -> list[Group]:
    return group_records([r for r in records if number(r.unit.get("lam")) is not None], ("lam", "control"))


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


def task_names(records: list[Record]) -> list[str]:
    """Tasks with an ``accuracy/<task>`` metric, in the order they were first trained or seen."""
    names = [r.unit["task"] for r in records if "task" in r.unit]
    names += [k.split("/", 1)[1] for r in records for k in r.metrics if k.startswith("accuracy/")]
    seen = {k.split("/", 1)[1] for r in records for k in r.metrics if k.startswith("accuracy/")}
    return [t for t in dict.fromkeys(names) if t in seen]


def continual_table(group: Group, n: int) -> Table:
    tasks = task_names(group.records)
    rows = [[r.unit["stage"], r.unit.get("task")] + [number(r.metrics.get(f"accuracy/{t}")) for t in tasks]
            + [number(r.metrics.get("accuracy")), number(r.metrics.get("forgetting")), r.n_intruders]
            for r in group.records]
    title = "Continual learning" + (f": {group.label}" if group.label != "all" else "")
    return Table(f"continual-{n}", title, ["stage", "task trained"] + [f"acc {t}" for t in tasks]
                 + ["accuracy", "forgetting", "intruders"], rows)


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
    return "–" if v is None else f"{v:+.1f} %"


def headline(data: ReportData) -> list[str]:
    """Sentences for the top of the report, most important first."""
    lines = []
    # Scans with their full records lead; summaries kept by λ or continual records have their own lines.
    runs = [r for r in data.runs if r.result is not None] or data.runs
    if runs:
        r0, sides = runs[0], {r.side for r in runs}
        where = f"ε = {r0.summary.get('epsilon')}, k = {r0.summary.get('k')}"
        where = f"{r0.side} singular vectors, {where}" if len(sides) == 1 else where
        counts = [_count(r) + ("" if len(sides) == 1 else f" ({r.side})") for r in runs]
        if len(runs) == 1:
            lines.append(f"{counts[0]} ({where}); mean effective rank of ΔW "
                         f"{_fmt(r0.stats.get('mean_delta_effective_rank'))}.")
        elif len(runs) <= 4:
            parts = [f"{r.label}: {c}" for r, c in zip(runs, counts, strict=True)]
            lines.append("; ".join(parts) + f" ({where}).")
        else:
            ranked = sorted(runs, key=lambda r: number(r.stats.get("n_intruders")) or 0)
            lines.append(f"Across {len(runs)} scans ({where}), intruder dimensions range from "
                         f"{_fmt(ranked[0].stats.get('n_intruders'))} ({ranked[0].label}) to "
                         f"{_fmt(ranked[-1].stats.get('n_intruders'))} ({ranked[-1].label}).")
        risky = [r for r in runs if _risk(r) is not None]
        if risky:
            worst = max(risky, key=_risk)
            scores = worst.stats["risk"]["scores"]
            which = "" if len(risky) == 1 else f"highest of {len(risky)} scans: {worst.label}, "
            lines.append(f"Data-free risk {_risk(worst):.2f} ({which}the worst matrix's σ-weighted share of its "
                         f"top-{worst.stats['risk'].get('k')} spectrum in directions new to the base; strength "
                         f"{_fmt(scores.get('strength'))}); not yet validated against measured forgetting "
                         "(docs/risk.md).")
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
    for m in data.mitigations:
        s, opts = m.summary, m.settings
        lines.append(f"Mitigation ({m.label}, λ = {opts.get('lam')}, which = {opts.get('which')}, control = "
                     f"{opts.get('control') or 'none'}): {s['n_directions']} directions rescaled in "
                     f"{s['n_changed']} of {s['n_matrices']} matrices; largest relative error of the written "
                     f"weights {s['max_rel_error']:.1e}.")
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
