"""The before/after picture of a merge and the merge study's trade-off, from stored results only.

- A merge.json (``lorascope merge``; ``schema.MergeResult``): one row in the merges table; with
  ``--scan`` (its ``analysis``, docs/merge.md) also intruders per input and for the merge (bars), the
  attribution of each merged intruder u_j to the inputs, max_l |cos(u_j, u_l^(t))| over input t's top-k
  left singular vectors (a heatmap), and similarity maps of the merge and of each input against the base.
- Records of a merge study (``unit.merge``, experiments/kinds/merge.py): one row per merge method (and λ,
  each input's intruders scaled by λ before the merge), seeds averaged: mean task score, forgetting,
  intruders; task score against forgetting, one point per method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from lorascope.report.figures import Plot, _figure, _short, similarity_maps
from lorascope.report.labels import merge_name, unit_name, varying_keys
from lorascope.report.loader import Merge, Record, ReportData
from lorascope.report.tables import Table, forgetting_axis, number

MAX_ATTRIBUTION_ROWS = 48  # heatmap rows; the table below it lists every merged intruder
FORGETTING_COLUMNS = (("forgetting", "forgetting"), ("sts_change_pct", "STS-B change %"), ("drift", "drift"))


# ------------------------------------------------------------------------------ one merge (--scan)


def merges_table(merges: list[Merge]) -> Table:
    """One row per merge.json: method, settings, ranks, exactness, storage and, with --scan, intruders."""
    rows = []
    for g in merges:
        s, st, a = g.result.settings, g.result.output.get("storage", {}), g.analysis
        summary = g.result.summary()
        counts = a.get("intruders", {})
        rows.append([g.name, g.label, merge_name(g.method), ", ".join(g.input_labels), s.get("weights"),
                     s.get("density"), s.get("seed"), s.get("format"), summary["n_matrices"],
                     summary["mean_rank_after"], summary["max_rel_error"], st.get("inputs_bytes"),
                     st.get("written_bytes"), st.get("emr_compact_bytes"),
                     sum(counts["outputs"].values()) if a else None, sum(counts["inputs"].values()) if a else None,
                     a.get("new_directions")])
    columns = ["merge", "folder", "method", "inputs", "weights", "density", "seed", "format", "matrices",
               "mean rank", "max rel. error of written W", "inputs bytes", "written bytes", "EMR compact bytes",
               "intruders (merge)", "intruders (inputs, sum)", "new directions"]
    keep = [i for i, _ in enumerate(columns) if any(r[i] is not None for r in rows)]
    return Table("merges", "Merges", [columns[i] for i in keep], [[r[i] for i in keep] for r in rows],
                 "From each merge.json. Intruders with --scan: left singular vectors, at the scan's ε and k.")


def _at(g: Merge) -> str:
    return f"{g.analysis.get('side', 'left')} singular vectors, ε = {g.analysis['epsilon']}, k = {g.analysis['k']}"


def intruder_bars(g: Merge, n: int) -> Plot | None:
    """Left: intruders of each input and of the merge (each EMR output). Right: the merge's intruders by
    the input whose top-k holds the closest vector (max |cos| ≥ ε), and those close to none (new)."""
    a = g.analysis
    if not a:
        return None
    inputs, outputs = a["intruders"]["inputs"], a["intruders"]["outputs"]
    merged = [f"merge for {o}" if len(outputs) > 1 else "merge" for o in outputs]
    fig = _figure(9.6, 3.8)
    left, right = fig.subplots(1, 2, width_ratios=[len(inputs) + len(outputs), len(inputs) + 1])
    names = [*inputs, *merged]
    values = [*inputs.values(), *outputs.values()]
    colors = ["C0"] * len(inputs) + ["C3"] * len(outputs)
    bars = left.bar(range(len(names)), values, color=colors)
    left.bar_label(bars, fontsize="small")
    left.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4
                    else "center", fontsize="small")
    left.set_ylabel("intruder dimensions (all matrices)")
    left.set_title("inputs (blue) and the merge (red)", fontsize="small")
    origin = [*g.input_labels, "new"]
    values = [a["attributed_to"].get(t, 0) for t in g.input_labels] + [a["new_directions"]]
    bars = right.bar(range(len(origin)), values, color=["C0"] * len(g.input_labels) + ["0.55"])
    right.bar_label(bars, fontsize="small")
    right.set_xticks(range(len(origin)), origin, fontsize="small")
    right.set_ylabel("merged intruders")
    right.set_title("closest input (max |cos| ≥ ε), or new", fontsize="small")
    caption = (f"{g.name}: intruder dimensions of each input and of the merge against the base ({_at(g)}), as "
               "merge --scan counted them; right: each merged intruder u_j goes to the input t with the largest "
               "max_l |cos(u_j, u_l^(t))| over t's top-k, or to 'new' when that is below ε for every input.")
    return Plot(f"merge_intruders_{n}", f"Intruders before and after: {g.name}", caption, fig)


def _intruders(g: Merge) -> list[tuple[str, str, Any]]:
    """(output label, matrix name, MergedIntruder) for every merged intruder, in base order."""
    outputs = list(g.analysis.get("intruders", {}).get("outputs", {}))
    return [(outputs[x.output] if len(outputs) > 1 else "merge", m.name, x)
            for m in g.result.matrices for x in m.intruders]


def _closest(g: Merge, x: Any) -> str:
    """The input an intruder is attributed to (merge --scan's rule), or 'new'."""
    t = int(np.argmax(x.input_max_cos))
    return g.input_labels[t] if x.input_max_cos[t] >= g.analysis["epsilon"] else "new"


def attribution_map(g: Merge, n: int) -> Plot | None:
    """Heatmap: one row per merged intruder, one column per input, max_l |cos(u_j, u_l^(t))|."""
    rows = _intruders(g)
    if not g.analysis or not rows:
        return None
    eps = float(g.analysis["epsilon"])
    shown = rows[:MAX_ATTRIBUTION_ROWS]
    sim = np.array([x.input_max_cos for _, _, x in shown], dtype=float)
    fig = _figure(2.6 + 0.9 * sim.shape[1], 0.2 * len(shown) + 1.6)
    ax = fig.subplots()
    im = ax.imshow(sim, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest")
    for i, (_, _, x) in enumerate(shown):  # the input each intruder is attributed to, when close enough
        if (t := _closest(g, x)) != "new":
            ax.plot(g.input_labels.index(t), i, marker="o", ms=4, color="#00e5ff", ls="")
    ax.set_xticks(range(sim.shape[1]), g.input_labels, fontsize="small")
    # j from 1, as the similarity maps beside it count the tuned singular vectors
    labels = [("" if o == "merge" else f"{o} · ") + f"{_short(name)} j={x.index + 1}" for o, name, x in shown]
    ax.set_yticks(range(len(shown)), labels, fontsize="x-small")
    ax.set_xlabel("input t")
    fig.colorbar(im, ax=ax, shrink=0.9, label="max_l |cos(u_j, u_l^(t))|")
    more = (f" The first {len(shown)} of {len(rows)} in base order; the table lists all."
            if len(rows) > len(shown) else "")
    caption = (f"{g.name}: each merged intruder u_j (matrix, j = its rank among the merge's top-k, from 1) against "
               f"each input's top-{g.analysis['k']} left singular vectors; a dot marks the closest input when its "
               f"|cos| ≥ ε = {eps} (the intruder is that input's), rows without one are new directions.{more}")
    return Plot(f"merge_attribution_{n}", f"Where the merged intruders come from: {g.name}", caption, fig)


def attribution_table(g: Merge, n: int) -> Table:
    """Per input: its own intruders and the merged intruders attributed to it; then the new ones."""
    a = g.analysis
    if not a:
        return Table(f"merge-attribution-{n}", "", [], [])
    rows = [[t, a["intruders"]["inputs"].get(t), a["attributed_to"].get(t)] for t in g.input_labels]
    rows.append(["new (close to no input)", None, a["new_directions"]])
    rows += [[f"merge for {o}" if len(a["intruders"]["outputs"]) > 1 else "merge", c, None]
             for o, c in a["intruders"]["outputs"].items()]
    return Table(f"merge-attribution-{n}", f"Intruders per input and for the merge: {g.name}",
                 ["input / output", "intruders", "merged intruders attributed"], rows, f"From merge.json ({_at(g)}).")


def intruder_table(g: Merge, n: int) -> Table:
    rows = [[o, name, x.index, x.max_cos, *x.input_max_cos, _closest(g, x)] for o, name, x in _intruders(g)]
    return Table(f"merge-intruders-{n}", f"Merged intruders: {g.name}",
                 ["output", "matrix", "index (0-based)", "max|cos| with base"]
                 + [f"max|cos| with {t}" for t in g.input_labels] + ["attributed to"], rows,
                 "index: the intruder's rank among the merged matrix's top-k, from 0 as in merge.json (the figures "
                 "count from 1).")


def merge_maps(g: Merge, matrices: str | None, n_maps: int, n: int) -> list[Plot]:
    """Similarity maps of the merge and of each input against the base, on the same matrices: the
    ``n_maps`` with the most merged intruders (or those matching ``matrices``)."""
    runs = [*g.outputs.values(), *(g.inputs[t] for t in g.input_labels if t in g.inputs)]
    if not runs:
        return []
    ranked = sorted(g.result.matrices, key=lambda m: -len(m.intruders))  # stable: base order breaks ties
    names = None if matrices else [m.name for m in ranked]
    return similarity_maps(runs, matrices, n_maps, names=names, prefix=f"merge_similarity_{n}")


def merge_line(g: Merge) -> str:
    """The headline sentence of one merge with --scan."""
    a = g.analysis
    outs = a["intruders"]["outputs"]
    merged = (f"{sum(outs.values())} intruder dimensions" if len(outs) == 1 else
              "intruder dimensions " + ", ".join(f"{v} (for {o})" for o, v in outs.items()))
    inputs = ", ".join(f"{t} {c}" for t, c in a["intruders"]["inputs"].items())
    attributed = sum(a["attributed_to"].values())
    total = attributed + a["new_directions"]
    closest = ", ".join(f"{t} {c}" for t, c in a["attributed_to"].items())
    return (f"{g.name}: {merged} in the merge against {inputs} in the inputs ({_at(g)}); of its {total} "
            f"merged intruders {attributed} are closest to an input's top-k ({closest}), {a['new_directions']} "
            "are new directions.")


# ------------------------------------------------------------------------------------- merge study


@dataclass
class StudyRow:
    """One merge method (and λ) of a merge study store, its values averaged over seeds."""

    label: str
    store: str
    lam: float | None
    records: list[Record] = field(default_factory=list)

    def mean(self, key: str) -> float | None:
        values = [number(r.metrics.get(key)) for r in self.records]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None


def study_rows(records: list[Record]) -> list[StudyRow]:
    """The merge records (``unit.merge``) grouped over seeds: one row per store, method and λ (and any
    other unit setting that differs between them), plain merges first."""
    recs = [r for r in records if r.unit.get("merge")]
    rests = {id(r): {k: v for k, v in r.unit.items() if k != "seed"} for r in recs}
    other = [k for k in varying_keys(list(rests.values())) if k not in ("merge", "lam")]
    stores = {r.store for r in recs}
    rows: dict[str, StudyRow] = {}
    for r in recs:
        key = json.dumps([r.store, rests[id(r)]], sort_keys=True, default=str)
        if key not in rows:
            label = merge_name(r.unit["merge"], number(r.unit.get("lam")))
            extra = unit_name({k: r.unit[k] for k in other if k in r.unit}, other) if other else ""
            label = ", ".join(x for x in (label, extra) if x)
            rows[key] = StudyRow(f"{r.store}: {label}" if len(stores) > 1 else label, r.store,
                                 number(r.unit.get("lam")))
        rows[key].records.append(r)
    return sorted(rows.values(), key=lambda row: (row.store, row.lam is not None, row.lam or 0.0, row.label))


def _task_keys(rows: list[StudyRow]) -> list[str]:
    """'accuracy/sst2', …: each task's score with the merged encoder (not 'scaled_directions/…')."""
    keys = dict.fromkeys(k for row in rows for r in row.records for k in r.metrics
                         if "/" in k and not k.startswith("scaled_directions/"))
    return list(keys)


def study_table(rows: list[StudyRow]) -> Table:
    tasks = _task_keys(rows)
    columns = (["merge", "λ (inputs' intruders)", "seeds", "mean task score"] + tasks
               + [title for _, title in FORGETTING_COLUMNS]
               + ["intruders (merge)", "intruders (inputs, sum)", "written bytes", "EMR compact bytes"])
    table = [[row.label, row.lam, len(row.records), row.mean("mean_task_score"), *(row.mean(t) for t in tasks),
              *(row.mean(k) for k, _ in FORGETTING_COLUMNS), row.mean("n_intruders"), row.mean("n_intruders_inputs"),
              row.mean("written_bytes"), row.mean("emr_compact_bytes")] for row in rows]
    keep = [i for i, _ in enumerate(columns) if i < 3 or any(r[i] is not None for r in table)]
    return Table("merge-study", "Merge study: one row per method", [columns[i] for i in keep],
                 [[r[i] for i in keep] for r in table],
                 "Each task scored with the merged encoder and that task's own head; forgetting of the merged "
                 "encoder (EMR: the mean over its per-task models); intruders of the merge against the base and "
                 "the inputs' sum. λ: each input's intruders scaled by λ before the merge. Means over seeds.")


def study_scatter(rows: list[StudyRow]) -> Plot | None:
    """Mean task score against forgetting, one point per method (coloured by the merge's intruders),
    λ arms as triangles, each point labelled."""
    pts = [(row, row.mean("forgetting"), row.mean("mean_task_score"), row.mean("n_intruders")) for row in rows]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    fig = _figure(6.8, 4.6)
    ax = fig.subplots()
    intr = [p[3] for p in pts if p[3] is not None]
    lo, hi = (min(intr), max(intr)) if intr else (0.0, 1.0)
    sc = None
    for marker, plain in (("o", True), ("^", False)):
        mine = [p for p in pts if (p[0].lam is None) == plain]
        if mine:
            sc = ax.scatter([p[1] for p in mine], [p[2] for p in mine], marker=marker, s=46, zorder=3,
                            c=[p[3] if p[3] is not None else np.nan for p in mine], cmap="viridis", vmin=lo,
                            vmax=hi if hi > lo else lo + 1, edgecolors="k", linewidths=0.5)
    for row, x, y, _ in pts:
        ax.annotate(row.label, (x, y), fontsize="x-small", xytext=(4, 3), textcoords="offset points")
    if intr and sc is not None:
        fig.colorbar(sc, ax=ax, shrink=0.9, label="intruder dimensions of the merge")
    ax.set_xlabel(forgetting_axis([r for row, *_ in pts for r in row.records]))
    ax.set_ylabel("mean task score with the merged encoder")
    kinds = {p[0].lam is None for p in pts}
    if len(kinds) > 1:  # grey markers: the colour is the intruder count, not the kind
        handles = [Line2D([], [], marker=m, ls="", color="0.6", mec="k", label=text) for m, text in
                   (("o", "merge"), ("^", "inputs' intruders scaled by λ first"))]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
    caption = ("One point per merge method (means over seeds): the mean over tasks of each task's score with the "
               "merged encoder against forgetting; colour: the merge's intruder dimensions; triangles: each "
               "input's intruders scaled by λ before the merge (does it forget less at equal score?).")
    return Plot("merge_study", "Merge study: task score against forgetting", caption, fig)


def study_line(rows: list[StudyRow]) -> str | None:
    scored = [r for r in rows if r.mean("mean_task_score") is not None]
    forg = [r for r in rows if r.mean("forgetting") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: r.mean("mean_task_score"))
    text = f"Merge study ({len(rows)} merges): best mean task score {best.mean('mean_task_score'):.3g} ({best.label})"
    if forg:
        least = min(forg, key=lambda r: r.mean("forgetting"))
        text += f"; least forgetting {least.mean('forgetting'):.3g} ({least.label})"
    return text + "."


def headline(data: ReportData) -> list[str]:
    """One sentence per merge with --scan, and one per merge study."""
    lines = [merge_line(g) for g in data.merges if g.analysis]
    study = study_line(study_rows(data.records))
    return lines + ([study] if study else [])
