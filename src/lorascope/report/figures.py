"""The paper's figures, drawn from stored results with matplotlib (object API, Agg canvas, no pyplot).

Each function returns ``Plot`` objects (or nothing when the input has no data for that figure):
- similarity maps, paper Figs. 1–3: |cos(y_j, x_i)| of the top-k tuned left singular vectors y_j
  against the top base vectors x_i, intruder rows (max_i |cos| < ε over *all* base vectors) marked;
- intruder count against ε (Fig. 4) and against k (Fig. 15), one line per run;
- intruders per layer and per module type;
- singular values of ΔW (log scale) and their effective rank (Roy & Vetterli 2007) per run;
- the λ trade-off (Table 3 as a plot), continual learning, training dynamics, mitigation changes.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lorascope.errors import InputError
from lorascope.report.loader import Mitigation, Record, Run
from lorascope.report.tables import (
    continual_groups,
    group_records,
    lam_groups,
    lam_rows,
    number,
    task_names,
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


def _legend(ax, n: int) -> None:
    if n > 1:
        ax.legend(fontsize="small" if n <= 8 else "x-small", ncols=1 if n <= 8 else 2)


def _short(name: str) -> str:
    """'encoder.layer.3.attention.self.query.weight' -> '3.attention.self.query'; 'pooler.dense' whole."""
    layer, module_type = parse_name(name)
    return name.removesuffix(".weight") if layer is None else f"{layer}.{module_type}"


# ------------------------------------------------------------------------------------ scan figures


def similarity_maps(runs: list[Run], matrices: str | None = None, n: int = 3) -> list[Plot]:
    """Paper Figs. 1–3, one figure per run: the ``n`` matrices with the most intruders (or those
    whose name matches the regex ``matrices``), heatmaps of the stored k × n_map |cos| map."""
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
        recs = sorted(recs, key=lambda m: (-m.n_intruders, min(m.max_cos)))[:n]
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
        plots.append(Plot(f"similarity_{i}", f"Similarity map: {run.label}", caption, fig))
    return plots


def epsilon_curves(runs: list[Run]) -> Plot | None:
    """Fig. 4: intruder count against ε at the scan's k, one line per run."""
    runs = [r for r in runs if "epsilon_curve" in r.stats]
    if not runs:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for r in runs:
        c = r.stats["epsilon_curve"]
        ax.plot(c["epsilon"], c["n_intruders"], marker="o", ms=3, label=r.label)
    ax.axvline(runs[0].summary["epsilon"], color="grey", ls=":", lw=1)
    ax.set_xlabel("ε (threshold on max |cos|)")
    ax.set_ylabel("intruder dimensions (all matrices)")
    _legend(ax, len(runs))
    caption = (f"Intruder dimensions against ε at k = {runs[0].summary.get('k')} (paper Fig. 4); "
               "dotted: the scan's ε.")
    return Plot("intruders_vs_epsilon", "Intruders against ε", caption, fig)


def k_curves(runs: list[Run]) -> Plot | None:
    """Fig. 15: intruder count against k at the scan's ε, one line per run."""
    runs = [r for r in runs if r.stats.get("k_curve", {}).get("k")]
    if not runs:
        return None
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for r in runs:
        c = r.stats["k_curve"]
        ax.plot(c["k"], c["n_intruders"], marker="o", ms=3, label=r.label)
    ax.set_xlabel("k (top singular vectors tested)")
    ax.set_ylabel("intruder dimensions (all matrices)")
    _legend(ax, len(runs))
    caption = f"Intruder dimensions against k at ε = {runs[0].summary.get('epsilon')} (paper Fig. 15)."
    return Plot("intruders_vs_k", "Intruders against k", caption, fig)


def _layer_key(layer: str) -> tuple[int, int | str]:
    return (0, int(layer)) if layer.isdigit() else (1, layer)


def _counts(runs: list[Run], key: str, order: list[str], horizontal: bool) -> Figure:
    """Counts per category: grouped bars for up to 3 runs (horizontal: categories on the y axis), else a
    runs × categories heatmap."""
    table = np.array([[r.stats[key].get(c, 0) for c in order] for r in runs], dtype=float)
    if len(runs) > 3:
        fig = _figure(min(13.0, max(6.4, 0.35 * len(order) + 3.0)), 0.32 * len(runs) + 1.8)
        ax = fig.subplots()
        im = ax.imshow(table, cmap="Reds", aspect="auto", vmin=0)
        if table.size <= 400:
            for (i, j), v in np.ndenumerate(table):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize="x-small",
                        color="white" if v > 0.6 * table.max() else "black")
        ax.set_yticks(range(len(runs)), [r.label for r in runs], fontsize="small")
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
    for i, r in enumerate(runs):
        (ax.barh if horizontal else ax.bar)(pos - 0.4 + width * (i + 0.5), table[i], width, label=r.label)
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
                "('none': matrices outside the blocks).", fig)


def per_module_type(runs: list[Run]) -> Plot | None:
    runs = [r for r in runs if r.stats.get("per_module_type")]
    if not runs:
        return None
    types = sorted({k for r in runs for k in r.stats["per_module_type"]})
    fig = _counts(runs, "per_module_type", types, horizontal=True)
    return Plot("intruders_per_module", "Intruders per module type",
                "Intruder dimensions summed over layers for each module type.", fig)


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


def lam_tradeoff(records: list[Record]) -> Plot | None:
    """Task accuracy against forgetting for each λ, intruders scaled (solid) and the neighbour control
    (dashed); each point is labelled with its λ."""
    groups = lam_groups(records)
    series = []
    for g in groups:
        rows, _ = lam_rows(g)
        for control, ls in (("intruder", "-"), ("neighbour", "--")):
            pts = [(r[f"{control}_forg"], r[f"{control}_acc"], r["lam"]) for r in rows
                   if r.get(f"{control}_forg") is not None and r.get(f"{control}_acc") is not None]
            if pts:
                series.append((g.label, control, ls, pts))
    if not series:
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    colors: dict[str, str] = {}
    for label, control, ls, pts in series:
        x, y, _ = zip(*pts, strict=True)
        name = control if label == "all" else f"{label}, {control}"
        (line,) = ax.plot(x, y, ls=ls, marker="o", ms=4, label=name, color=colors.get(label))
        colors[label] = line.get_color()
        for xi, yi, li in pts:
            ax.annotate(f"λ={li:g}", (xi, yi), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("forgetting (metrics.forgetting)")
    ax.set_ylabel("task accuracy")
    _legend(ax, len(series))
    caption = ("Task accuracy against forgetting as the intruder dimensions are scaled by λ (solid) and, as "
               "the paper's control, their best-matching base vectors (dashed).")
    return Plot("lambda_tradeoff", "λ trade-off", caption, fig)


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
            pts = [(s, r.metrics[f"accuracy/{t}"]) for s, r in zip(stages, g.records, strict=True)
                   if number(r.metrics.get(f"accuracy/{t}")) is not None]
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
    first = groups[0].records
    ticks = [r.unit["stage"] for r in first]
    names = [f"{r.unit['stage']}\n{r.unit.get('task', '')}" for r in first]
    for key, ax in axes.items():
        ax.set_xticks(ticks, names, fontsize="small")
        ax.set_xlabel("stage (task trained)")
        ax.set_ylabel({"accuracy": "accuracy on task", "forgetting": "forgetting",
                       "intruders": "intruder dimensions"}[key])
        if key == "accuracy" or len(groups) > 1:
            _legend(ax, len(ax.get_legend_handles_labels()[0]))
    caption = ("After each stage: accuracy on every task, forgetting, and the intruder dimensions "
               "accumulated so far.")
    return Plot("continual", "Continual learning", caption, fig)


def dynamics(tracking: list[Record]) -> Plot | None:
    """Training dynamics from the tracking callback: intruders (and other tracked numbers) against step."""
    if not tracking:
        return None
    groups = group_records(tracking, ())
    keys = ["intruders"] + sorted({k for r in tracking for k, v in r.metrics.items()
                                   if k != "n_intruders" and number(v) is not None})[:3]
    fig = _figure(4.4 * len(keys) + 0.6, 3.8)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for g in groups:
        recs = sorted(g.records, key=lambda r: r.step)
        for ax, key in zip(axes, keys, strict=True):
            if key == "intruders":
                get = lambda r: r.n_intruders  # noqa: E731
            else:
                get = lambda r, k=key: number(r.metrics.get(k))  # noqa: E731
            pts = [(r.step, get(r)) for r in recs if get(r) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=g.label)
    for ax, key in zip(axes, keys, strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel("intruder dimensions" if key == "intruders" else key)
        _legend(ax, len(groups))
    return Plot("dynamics", "Training dynamics", "Values the tracking callback recorded during training, "
                "against the optimiser step.", fig)


def mitigation_changes(m: Mitigation, n: int, limit: int = 40) -> Plot | None:
    """σ of every rescaled direction before and after (the largest ``limit``)."""
    changes = sorted(m.changes, key=lambda c: -float(c["sigma_before"]))[:limit]
    if not changes:
        return None
    fig = _figure(7.0, 0.22 * len(changes) + 1.4)
    ax = fig.subplots()
    pos = np.arange(len(changes))
    ax.barh(pos - 0.2, [c["sigma_before"] for c in changes], 0.4, color="0.6", label="σ before")
    ax.barh(pos + 0.2, [c["sigma_after"] for c in changes], 0.4, color="C3", label="σ after")
    index = {"intruder": "intruder_index", "neighbour": "base_index"}
    ax.set_yticks(pos, [f"{_short(c['matrix'])} {c['target'][0]}{c[index.get(c['target'], 'intruder_index')]}"
                        for c in changes], fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlabel("singular value")
    ax.legend(fontsize="small")
    caption = (f"{m.label}: singular value of each rescaled direction before and after "
               f"(W_t' = W_t + (λ−1) σ_i u_i v_iᵀ), largest {len(changes)} of {len(m.changes)}; "
               "label: matrix, i(ntruder) j or n(eighbour) i*, 0-based.")
    return Plot(f"mitigation_{n}", f"Mitigation: {m.label}", caption, fig)
