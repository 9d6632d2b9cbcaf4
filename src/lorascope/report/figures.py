"""The paper's figures, drawn from stored results with matplotlib (object API, Agg canvas, no pyplot).

Each function returns ``Plot`` objects (or nothing when the input has no data for that figure):
- similarity maps, paper Figs. 1–3: |cos(y_j, x_i)| of the top-k tuned left singular vectors y_j
  against the top base vectors x_i, intruder rows (max_i |cos| < ε over *all* base vectors) marked;
- intruder count against ε (Fig. 4) and against k (Fig. 15), one line per run;
- intruders per layer and per module type;
- singular values of ΔW (log scale) and their effective rank (Roy & Vetterli 2007) per run;
- intruders against forgetting over a sweep with its Spearman ρ (Fig. 7);
- the λ trade-off (Table 3 as a plot), each adapter's mitigation against λ, continual learning, and
  training dynamics (intruders, training loss and task score against step).

Every scan's numbers hold at its own k and ε: captions name them once when all scans share them,
and legends name each scan's otherwise. Legends sit outside the axes, never over the data.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lorascope.errors import InputError
from lorascope.report.labels import sci, unit_name
from lorascope.report.loader import Record, ReportData, Run
from lorascope.report.tables import (
    SWEPT,
    MitigationGroup,
    arm_key,
    continual_groups,
    forgetting_axis,
    forgetting_metric,
    group_records,
    lam_groups,
    lam_rows,
    number,
    same,
    spearman_of,
    sweep_records,
    task_names,
    task_score,
    where,
)
from lorascope.schema import parse_name

DPI = 110
MAX_MAP_RUNS = 8  # similarity-map figures: one per run, for at most this many runs


@dataclass
class Plot:
    name: str  # file stem for --png-dir
    title: str
    caption: str
    figure: Figure

    @cached_property
    def png(self) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
        return buf.getvalue()

    @cached_property
    def svg(self) -> str:
        buf = io.StringIO()
        self.figure.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        return buf.getvalue()


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend(ax, n: int, fig: Figure | None = None, entries: dict[str, Any] | None = None) -> None:
    """A legend outside the axes, at the figure's right, the figure widened to hold it (the axes keep
    their size); ``fig``: one legend for every panel of the figure, from ``ax``'s lines, or from
    ``entries`` (label -> handle) when given."""
    if n <= 1:
        return
    handles, labels = ax.get_legend_handles_labels() if entries is None else (list(entries.values()), list(entries))
    fig = fig or ax.figure
    ncols = 1 if n <= 12 else 2
    size = "small" if n <= 8 else "x-small"
    width = 0.065 if size == "small" else 0.055  # inches per character, roughly
    longest = max((len(t) for t in labels), default=0)
    fig.set_figwidth(fig.get_figwidth() + min(7.0, ncols * (width * longest + 0.5)))
    fig.legend(handles, labels, loc="outside right upper", fontsize=size, ncols=ncols)


def _at(runs: list[Run]) -> tuple[str | None, list[str]]:
    """(the ε and k all ``runs`` share, or None; each run's legend label, with its ε and k if not shared)."""
    shared = same([where(r) for r in runs])
    return shared, [r.label if shared else f"{r.label} ({where(r)})" for r in runs]


def _short(name: str) -> str:
    """'encoder.layer.3.attention.self.query.weight' -> '3.attention.self.query'; 'pooler.dense' whole."""
    layer, module_type = parse_name(name)
    return name.removesuffix(".weight") if layer is None else f"{layer}.{module_type}"


# ------------------------------------------------------------------------------------ scan figures


def similarity_maps(runs: list[Run], matrices: str | None = None, n: int = 3, names: list[str] | None = None,
                    prefix: str = "similarity") -> list[Plot]:
    """Paper Figs. 1–3, one figure per run: the ``n`` matrices with the most intruders (or those
    whose name matches the regex ``matrices``; or ``names``, in that order, the same in every run),
    heatmaps of the stored k × n_map |cos| map. ``prefix``: the figures' file stem."""
    try:
        pattern = re.compile(matrices) if matrices else None
    except re.error as e:
        raise InputError(f"--matrices '{matrices}' is not a valid regex ({e})") from e
    plots = []
    for i, run in enumerate([r for r in runs if r.result is not None][:MAX_MAP_RUNS]):
        eps = run.result.epsilon
        recs = [m for m in run.result.matrices if m.side == run.side and m.similarity]
        if pattern is not None:
            recs = [m for m in recs if pattern.search(m.name)]
        if names is not None:
            by_name = {m.name: m for m in recs}
            recs = [by_name[x] for x in names if x in by_name]
        recs = recs[:n] if names is not None else sorted(recs, key=lambda m: (-m.n_intruders, min(m.max_cos)))[:n]
        if not recs:
            continue
        fig = _figure(3.6 * len(recs) + 0.8, 3.6)
        axes = fig.subplots(1, len(recs), squeeze=False)[0]
        for ax, m in zip(axes, recs, strict=True):
            sim = np.asarray(m.similarity, dtype=float)
            im = ax.imshow(sim, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest")
            for j, c in enumerate(m.max_cos[: sim.shape[0]]):
                if c < eps:  # Alg. 1: an intruder row; outline it and name it on the axis
                    row = Rectangle((-0.5, j - 0.5), sim.shape[1], 1.0, fill=False, ec="#00e5ff", lw=1.6)
                    ax.add_patch(row)
            ax.set_yticks(range(sim.shape[0]))
            ax.set_yticklabels([str(j + 1) for j in range(sim.shape[0])], fontsize="x-small")
            for j, label in enumerate(ax.get_yticklabels()):
                if j < len(m.max_cos) and m.max_cos[j] < eps:
                    label.set_color("#d62728")
                    label.set_fontweight("bold")
            ax.set_title(f"{_short(m.name)}\n{m.n_intruders} intruder(s)", fontsize="small")
            ax.set_xlabel("base singular vector i")
        axes[0].set_ylabel("tuned singular vector j")
        fig.colorbar(im, ax=list(axes), shrink=0.9, label="|cos(y_j, x_i)|")
        caption = (f"{run.label}: |cos| between the top-{run.result.k} tuned and the top base {run.side} "
                   f"singular vectors. Outlined rows (red index) are intruders: max |cos| < ε = {eps} over "
                   "all base vectors, not only the ones shown.")
        plots.append(Plot(f"{prefix}_{i}", f"Similarity map: {run.label}", caption, fig))
    return plots


def epsilon_curves(runs: list[Run]) -> Plot | None:
    """Fig. 4: intruder count against ε at the scan's k, one line per run."""
    runs = [r for r in runs if "epsilon_curve" in r.stats]
    if not runs:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    shared, labels = _at(runs)
    for r, label in zip(runs, labels, strict=True):
        c = r.stats["epsilon_curve"]
        ax.plot(c["epsilon"], c["n_intruders"], marker="o", ms=3, label=label)
    scanned = sorted({r.summary["epsilon"] for r in runs})
    for eps in scanned:
        ax.axvline(eps, color="grey", ls=":", lw=1)
    ax.set_xlabel("ε (threshold on max |cos|)")
    ax.set_ylabel("intruder dimensions (all matrices)")
    _legend(ax, len(runs))
    ks = sorted({r.summary.get("k") for r in runs}, key=str)
    at = f"k = {ks[0]}" if len(ks) == 1 else "each scan's own k (in the legend)"
    dotted = f"the scan's ε = {scanned[0]}" if len(scanned) == 1 else "the scans' ε = " + ", ".join(map(str, scanned))
    caption = f"Intruder dimensions against ε at {at} (paper Fig. 4); dotted: {dotted}."
    return Plot("intruders_vs_epsilon", "Intruders against ε", caption, fig)


def k_curves(runs: list[Run]) -> Plot | None:
    """Fig. 15: intruder count against k at the scan's ε, one line per run."""
    runs = [r for r in runs if r.stats.get("k_curve", {}).get("k")]
    if not runs:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    shared, labels = _at(runs)
    for r, label in zip(runs, labels, strict=True):
        c = r.stats["k_curve"]
        ax.plot(c["k"], c["n_intruders"], marker="o", ms=3, label=label)
    ax.set_xlabel("k (top singular vectors tested, up to the scan's k)")
    ax.set_ylabel("intruder dimensions (all matrices)")
    _legend(ax, len(runs))
    eps = sorted({r.summary.get("epsilon") for r in runs}, key=str)
    at = f"ε = {eps[0]}" if len(eps) == 1 else "each scan's own ε (in the legend)"
    caption = f"Intruder dimensions against k at {at} (paper Fig. 15)."
    return Plot("intruders_vs_k", "Intruders against k", caption, fig)


def _layer_key(layer: str) -> tuple[int, int | str]:
    return (0, int(layer)) if layer.isdigit() else (1, layer)


def _counts(runs: list[Run], key: str, order: list[str], horizontal: bool) -> Figure:
    """Counts per category: grouped bars for up to 3 runs (horizontal: categories on the y axis), else a
    runs × categories heatmap."""
    table = np.array([[r.stats[key].get(c, 0) for c in order] for r in runs], dtype=float)
    _, labels = _at(runs)
    if len(runs) > 3:
        fig = _figure(min(13.0, max(6.4, 0.35 * len(order) + 3.0)), 0.32 * len(runs) + 1.8)
        ax = fig.subplots()
        im = ax.imshow(table, cmap="Reds", aspect="auto", vmin=0)
        if table.size <= 400:
            for (i, j), v in np.ndenumerate(table):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize="x-small",
                        color="white" if v > 0.6 * table.max() else "black")
        ax.set_yticks(range(len(runs)), labels, fontsize="small")
        rotate = 40 if horizontal else 0  # long module names slant; layer numbers stay upright
        ax.set_xticks(range(len(order)), order, fontsize="small", rotation=rotate,
                      ha="right" if rotate else "center")
        fig.colorbar(im, ax=ax, label="intruder dimensions", shrink=0.9)
        return fig
    pos, width = np.arange(len(order)), 0.8 / len(runs)
    if horizontal:
        fig = _figure(6.8, max(2.6, 0.25 * len(order) * len(runs) + 1.2))
    else:
        fig = _figure(min(13.0, max(6.4, 0.22 * len(order) * len(runs) + 1.5)), 3.8)
    ax = fig.subplots()
    for i, label in enumerate(labels):
        (ax.barh if horizontal else ax.bar)(pos - 0.4 + width * (i + 0.5), table[i], width, label=label)
    if horizontal:
        ax.set_yticks(pos, order, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel("intruder dimensions")
    else:
        ax.set_xticks(pos, order, fontsize="small" if len(order) > 24 else "medium")
        ax.set_ylabel("intruder dimensions")
    _legend(ax, len(runs))
    return fig


def per_layer(runs: list[Run]) -> Plot | None:
    runs = [r for r in runs if r.stats.get("per_layer")]
    if not runs:
        return None
    layers = sorted({k for r in runs for k in r.stats["per_layer"]}, key=_layer_key)
    fig = _counts(runs, "per_layer", layers, horizontal=False)
    fig.axes[0].set_xlabel("layer (transformer block)")
    return Plot("intruders_per_layer", "Intruders per layer", "Intruder dimensions in each transformer block "
                f"('none': matrices outside the blocks), {_at_caption(runs)}.", fig)


def _at_caption(runs: list[Run]) -> str:
    shared = same([where(r) for r in runs])
    return f"at {shared}" if shared else "each scan at its own ε and k"


def per_module_type(runs: list[Run]) -> Plot | None:
    runs = [r for r in runs if r.stats.get("per_module_type")]
    if not runs:
        return None
    types = sorted({k for r in runs for k in r.stats["per_module_type"]})
    fig = _counts(runs, "per_module_type", types, horizontal=True)
    return Plot("intruders_per_module", "Intruders per module type",
                f"Intruder dimensions summed over layers for each module type, {_at_caption(runs)}.", fig)


def delta_spectra(runs: list[Run]) -> Plot | None:
    """Singular values of ΔW = W_t − W_0 (median and quartiles over matrices) and their effective rank."""
    runs = [r for r in runs if r.result is not None and r.result.matrices]
    if not runs:
        return None
    fig = _figure(11.0, 4.0)
    ax, box = fig.subplots(1, 2, width_ratios=[1.6, 1])
    ranks = []
    for r in runs:
        recs = [m for m in r.result.matrices if m.side == r.side]
        n = max(len(m.delta_singular_values) for m in recs)
        sv = np.full((len(recs), n), np.nan)
        for i, m in enumerate(recs):
            sv[i, : len(m.delta_singular_values)] = m.delta_singular_values
        sv[sv <= 0] = np.nan  # log scale: exact zeros of a low-rank ΔW are left out
        keep = np.sum(~np.isnan(sv), axis=0) >= max(1, len(recs) // 2)  # indices most matrices have
        idx = np.arange(1, n + 1)[keep]
        q1, med, q3 = np.nanpercentile(sv[:, keep], [25, 50, 75], axis=0)
        (line,) = ax.plot(idx, med, label=r.label)
        ax.fill_between(idx, q1, q3, color=line.get_color(), alpha=0.2, lw=0)
        ranks.append([m.delta_effective_rank for m in recs])
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i(ΔW)")
    _legend(ax, len(runs))
    for i, vals in enumerate(ranks):  # one point per matrix, spread vertically, and the median
        box.scatter(vals, i + np.linspace(-0.25, 0.25, len(vals)), s=14, alpha=0.7, color=f"C{i % 10}", lw=0)
        box.plot([np.median(vals)] * 2, [i - 0.4, i - 0.3], color="k", lw=2)  # median, above the points
    box.set_yticks(range(len(runs)), [r.label for r in runs], fontsize="small")
    box.invert_yaxis()
    box.set_xlabel("effective rank of ΔW")
    caption = ("Left: singular values of ΔW per index, median over matrices with the 25–75 % band (log–log). "
               "Right: effective rank of ΔW, exp of the entropy of the normalised singular values "
               "(Roy & Vetterli 2007), one point per matrix.")
    return Plot("delta_spectra", "ΔW spectra and effective rank", caption, fig)


# ------------------------------------------------------------------------------ experiment figures


CONTROL_STYLE = {"intruder": "-", "neighbour": "--"}


def lam_tradeoff(records: list[Record]) -> Plot | None:
    """Task accuracy against forgetting for each λ, intruders scaled (solid) and the neighbour control
    (dashed, its own colour); each point is labelled with its λ."""
    series = []
    for g in lam_groups(records):
        rows, _ = lam_rows(g)
        for control in CONTROL_STYLE:
            pts = [(r[f"{control}_forg"], r[f"{control}_acc"], r["lam"]) for r in rows
                   if r.get(f"{control}_forg") is not None and r.get(f"{control}_acc") is not None]
            if pts:
                name = "intruders scaled" if control == "intruder" else "neighbour control"
                series.append((name if g.label == "all" else f"{g.label}: {name}", control, pts))
    if not series:
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for i, (name, control, pts) in enumerate(series):  # one colour per line: the controls never share one
        x, y, _ = zip(*pts, strict=True)
        ax.plot(x, y, ls=CONTROL_STYLE[control], marker="o", ms=4, label=name, color=f"C{i % 10}")
        for xi, yi, li in pts:
            ax.annotate(f"λ={li:g}", (xi, yi), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(forgetting_axis(records))
    ax.set_ylabel("task score")
    _legend(ax, len(series))
    caption = ("Task accuracy against forgetting as the intruder dimensions are scaled by λ (solid) and, as "
               "the paper's control, their best-matching base vectors (dashed).")
    return Plot("lambda_tradeoff", "λ trade-off", caption, fig)


def sweep_scatter(data: ReportData) -> Plot | None:
    """Paper Fig. 7: intruder count against forgetting, one point per fine-tune of a sweep, one colour
    per arm, each point labelled with what the sweep varied; ρ as stored in summary.json."""
    records = sweep_records(data.records)
    if len(records) < 2:
        return None
    rho = spearman_of(data)
    arms: dict[str, list[Record]] = {}
    for r in records:
        arms.setdefault(arm_key(r.store, r.unit), []).append(r)
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for i, (key, recs) in enumerate(arms.items()):
        arm = {k: v for k, v in recs[0].unit.items() if k not in SWEPT}
        row = rho.get(key)
        value = number(row.get("spearman_intruders_forgetting")) if row else None
        label = unit_name(arm) or "all"
        label += f" (ρ = {value:.2f})" if value is not None else " (ρ undefined)" if row else ""
        x = [r.n_intruders for r in recs]
        y = [r.metrics["forgetting"] for r in recs]
        ax.scatter(x, y, s=28, color=f"C{i % 10}", label=label, zorder=3)
        varied = [k for k in SWEPT if len({str(r.unit.get(k)) for r in recs}) > 1]
        for r, xi, yi in zip(recs, x, y, strict=True):
            swept = [f"η={sci(r.unit['lr'])}" if k == "lr" else f"n={r.unit[k]}" if k == "n_examples"
                     else f"seed {r.unit[k]}" for k in varied if isinstance(r.unit.get(k), (int, float))]
            ax.annotate(", ".join(swept), (xi, yi), fontsize="x-small", xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("intruder dimensions (all matrices)")
    ax.set_ylabel(forgetting_axis(records))
    _legend(ax, len(arms) + (1 if len(arms) == 1 else 0))
    rows = [r for r in rho.values() if number(r.get("spearman_intruders_forgetting")) is not None]
    stated = ("; ".join(f"ρ = {r['spearman_intruders_forgetting']:.2f} over {r.get('n')} fine-tunes" for r in rows)
              if rows else "no Spearman ρ stored (summary.json of a sweeps store)")
    caption = (f"Intruder dimensions against forgetting, one point per fine-tune (paper Fig. 7); {stated}. "
               "Spearman ρ as stored in the store's summary.json; the paper reports ρ = 0.971.")
    return Plot("intruders_vs_forgetting", "Intruders against forgetting", caption, fig)

def continual(records: list[Record]) -> Plot | None:
    """Accuracy on every task after each stage, forgetting, and intruders accumulated."""
    groups = continual_groups(records)
    if not groups:
        return None
    panels = ["accuracy"]
    if any(number(r.metrics.get("forgetting")) is not None for g in groups for r in g.records):
        panels.append("forgetting")
    if any(r.n_intruders is not None for g in groups for r in g.records):
        panels.append("intruders")
    fig = _figure(4.4 * len(panels) + 0.6, 4.0)
    axes = dict(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0], strict=True))
    styles = ["-", "--", ":", "-."]
    tasks = task_names([r for g in groups for r in g.records])
    colors = {t: f"C{i % 10}" for i, t in enumerate(tasks)}
    for gi, g in enumerate(groups):
        ls = styles[gi % len(styles)]
        prefix = "" if g.label == "all" else f"{g.label}: "
        stages = [r.unit["stage"] for r in g.records]
        ax = axes["accuracy"]
        for t in tasks:
            pts = [(s, task_score(r.metrics, t)) for s, r in zip(stages, g.records, strict=True)
                   if task_score(r.metrics, t) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), ls=ls, marker="o", ms=4, color=colors[t], label=prefix + t)
        if not tasks:
            pts = [(s, r.metrics["accuracy"]) for s, r in zip(stages, g.records, strict=True)
                   if number(r.metrics.get("accuracy")) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), ls=ls, marker="o", ms=4, label=prefix + "task of the stage")
        for key, get in (("forgetting", lambda r: number(r.metrics.get("forgetting"))),
                         ("intruders", lambda r: r.n_intruders)):
            if key in axes:
                pts = [(s, get(r)) for s, r in zip(stages, g.records, strict=True) if get(r) is not None]
                if pts:
                    color = "k" if len(groups) == 1 else f"C{gi % 10}"
                    axes[key].plot(*zip(*pts, strict=True), ls=ls, marker="o", ms=4, color=color,
                                   label=g.label)
    metric = forgetting_metric([r for g in groups for r in g.records])
    first = groups[0].records
    ticks = [r.unit["stage"] for r in first]
    names = [f"{r.unit['stage']}\n{r.unit.get('task', '')}" for r in first]
    for key, ax in axes.items():
        ax.set_xticks(ticks, names, fontsize="small")
        ax.set_xlabel("stage (task trained)")
        ax.set_ylabel({"accuracy": "score on each task (accuracy / exact match)",
                       "forgetting": f"forgetting ({metric})" if metric else "forgetting",
                       "intruders": "intruder dimensions"}[key])
    # One legend for the figure: the score panel's (arm: task) lines, then each arm's line of the others.
    entries: dict[str, Any] = {}
    for ax in axes.values() if len(groups) > 1 else [axes["accuracy"]]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, h)
    _legend(axes["accuracy"], len(entries), fig, entries)
    caption = ("After each stage: the score on every task trained so far (accuracy, or exact match for a "
               "decoder's prompt/response task), forgetting, and the intruder dimensions accumulated so far.")
    return Plot("continual", "Continual learning", caption, fig)


TRAIN_LOSS = ("train_loss", "loss")  # tracking.jsonl's training loss (older lines call it "loss")
TASK_SCORE = ("task_score", "accuracy")


def dynamics(tracking: list[Record]) -> Plot | None:
    """Training dynamics from the tracking callback: intruders, the training loss (mean over the steps
    since the previous point) and the task score on the test split, against the optimiser step."""
    if not tracking:
        return None
    groups = group_records(tracking, ())

    def getter(keys: tuple[str, ...]):
        return lambda r: next((number(r.metrics[k]) for k in keys if number(r.metrics.get(k)) is not None), None)

    panels = [("intruder dimensions", lambda r: r.n_intruders)]
    panels += [(name, getter(keys)) for name, keys in (("training loss", TRAIN_LOSS), ("task score", TASK_SCORE))
               if any(getter(keys)(r) is not None for r in tracking)]
    fig = _figure(4.4 * len(panels) + 0.6, 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, g in enumerate(groups):
        recs = sorted(g.records, key=lambda r: r.step)
        for ax, (_, get) in zip(axes, panels, strict=True):
            pts = [(r.step, get(r)) for r in recs if get(r) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{i % 10}", label=g.label)
    for ax, (name, _) in zip(axes, panels, strict=True):
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(name)
    _legend(axes[0], len(groups), fig)
    shown = ", ".join(name for name, _ in panels)
    caption = (f"During training, at every step the tracking callback scanned: {shown}. The training loss is "
               "the mean over the steps since the previous point; the task score is measured on the task's "
               "test split.")
    return Plot("dynamics", "Training dynamics", caption, fig)


def mitigation_lambda(g: MitigationGroup, n: int) -> Plot | None:
    """One adapter's mitigation sweep against λ: task accuracy, forgetting and the intruders left (as
    its units measured them), intruders scaled (solid) and the neighbour control (dashed)."""
    measured = [m for m in g.items if m.record is not None and m.lam is not None]
    panels = [(name, get) for name, get in (
        ("task accuracy", lambda m: number(m.record.metrics.get("accuracy"))),
        ("forgetting", lambda m: number(m.record.metrics.get("forgetting"))),
        ("intruders left", lambda m: m.record.n_intruders))
        if any(get(m) is not None for m in measured)]
    if not panels:
        return None
    fig = _figure(4.0 * len(panels) + 0.6, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, control in enumerate(CONTROL_STYLE):
        mine = sorted((m for m in measured if m.control == control), key=lambda m: m.lam)
        for ax, (_, get) in zip(axes, panels, strict=True):
            pts = [(m.lam, get(m)) for m in mine if get(m) is not None]
            if pts:
                label = "intruders scaled" if control == "intruder" else "neighbour control"
                ax.plot(*zip(*pts, strict=True), ls=CONTROL_STYLE[control], marker="o", ms=4, color=f"C{i}",
                        label=label)
    for ax, (name, _) in zip(axes, panels, strict=True):
        ax.set_xlabel("λ (1: the fine-tune as it was)")
        ax.set_ylabel(name)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
    _legend(axes[0], len(axes[0].get_lines()) - 1, fig)
    caption = (f"{g.label}: W_t' = W_t + (λ−1) Σ σ_i u_i v_iᵀ over the intruder directions (solid) or their "
               "best-matching base directions (dashed, the paper's control), against λ.")
    return Plot(f"mitigation_lambda_{n}", f"Mitigation against λ: {g.label}", caption, fig)


def mitigation_changes(g: MitigationGroup, n: int, limit: int = 15) -> Plot | None:
    """σ of each rescaled direction before, and after at every λ ≠ 1 (the ``limit`` largest per control)."""
    changed = g.changed
    controls = [c for c in CONTROL_STYLE if any(m.control == c for m in changed)]
    if not controls:
        return None
    index = {"intruder": "intruder_index", "neighbour": "base_index"}
    panels = []
    for control in controls:
        mine = sorted((m for m in changed if m.control == control), key=lambda m: m.lam)
        dirs: dict[tuple[str, int], dict[str, Any]] = {}
        for m in mine:
            for c in m.changes:
                d = dirs.setdefault((c["matrix"], c[index[c["target"]]]),
                                    {"label": f"{_short(c['matrix'])} {c['target'][0]}{c[index[c['target']]]}",
                                     "before": c["sigma_before"], "after": {}})
                d["after"][m.lam] = c["sigma_after"]
        top = sorted(dirs.values(), key=lambda d: -float(d["before"]))[:limit]
        panels.append((control, [m.lam for m in mine], top, len(dirs)))
    rows = max(len(top) for _, _, top, _ in panels)
    fig = _figure(5.6 * len(panels) + 0.6, 0.24 * rows * (1 + 0.25 * len(panels[0][1])) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (control, lams, top, total) in zip(axes, panels, strict=True):
        pos, width = np.arange(len(top)), 0.8 / (len(lams) + 1)
        ax.barh(pos - 0.4 + width / 2, [d["before"] for d in top], width, color="0.6", label="σ before")
        for i, lam in enumerate(lams):
            ax.barh(pos - 0.4 + width * (i + 1.5), [d["after"].get(lam, np.nan) for d in top], width,
                    color=f"C{(i + 3) % 10}", label=f"σ at λ = {lam:g}")
        ax.set_yticks(pos, [d["label"] for d in top], fontsize="x-small")
        ax.invert_yaxis()
        ax.set_xlabel("singular value")
        name = "intruders scaled" if control == "intruder" else "neighbour control"
        ax.set_title(f"{name}: largest {len(top)} of {total}", fontsize="small")
    _legend(axes[-1], len(axes[-1].get_legend_handles_labels()[0]), fig)
    caption = (f"{g.label}: singular value of each rescaled direction before and at each λ ≠ 1 "
               "(λ = 1 leaves them as they were); label: matrix, i(ntruder) j or n(eighbour) i*, 0-based.")
    return Plot(f"mitigation_{n}", f"Rescaled directions: {g.label}", caption, fig)
