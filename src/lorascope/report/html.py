"""Assemble figures and tables into one self-contained HTML page (images inlined, no network)."""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import os
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_bytes, atomic_write_text, guard_output
from lorascope.report import figures, merges, tables
from lorascope.report.loader import ReportData, load


@dataclass
class Section:
    id: str
    title: str
    plots: list[dict[str, Any]] = field(default_factory=list)  # title, caption, name, wide, data (base64 PNG)
    tables: list[tables.Table] = field(default_factory=list)
    text: str = ""


def build_report(
    path: str | os.PathLike,
    out: str | os.PathLike = "report.html",
    png_dir: str | os.PathLike | None = None,
    matrices: str | None = None,
    n_maps: int = 3,
) -> Path:
    """Write a self-contained HTML report of the results at ``path`` (scan.json, mitigation.json,
    records.jsonl or a folder of them) to ``out``; with ``png_dir`` also every figure as PNG and SVG.

    ``matrices`` is a regex choosing the similarity maps' matrices (default: the ``n_maps`` with the
    most intruders in each run). Returns the path of the HTML file.
    """
    out = Path(out)
    guard_output(out, {"results": path}, inside_ok=True)
    if png_dir is not None:
        guard_output(png_dir, {"results": path}, inside_ok=True)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give the path of the HTML file to write")
    if n_maps < 1:
        raise InputError(f"--n-maps must be at least 1, got {n_maps}")
    data = load(path)
    read = {Path(x.source.rsplit(":", 1)[0] if ":" in Path(x.source).name else x.source).resolve()
            for x in [*data.runs, *data.mitigations, *data.merges, *getattr(data, "records", [])] if x.source}
    if out.resolve() in read:  # a report over a folder may sit beside its results, never in place of one
        raise InputError(f"--out {out} is one of the result files the report reads; choose another path")
    sections, plots = _sections(data, matrices, n_maps)
    atomic_write_text(out, render(data, sections))
    if png_dir is not None:
        _save_figures(plots, Path(png_dir))
    return out


def _sections(
    data: ReportData, matrices: str | None, n_maps: int
) -> tuple[list[Section], list[figures.Plot]]:
    """The page's sections in reading order; empty sections are left out."""
    all_plots: list[figures.Plot] = []

    def section(id_: str, title: str, plots: list[figures.Plot | None], tabs: list[tables.Table],
                text: str = "") -> Section | None:
        plots = [p for p in plots if p is not None]
        tabs = [t for t in tabs if t.rows]
        if not plots and not tabs:
            return None
        all_plots.extend(plots)
        embedded = [{"title": p.title, "caption": p.caption, "name": p.name,
                     "wide": p.figure.get_figwidth() > 7.5,  # narrow ones go two to a row
                     "data": base64.b64encode(p.png).decode("ascii")} for p in plots]
        return Section(id_, title, embedded, tabs, text)

    runs = data.runs
    scanned = [g for g in data.merges if g.analysis]  # their scans' maps are drawn in their own sections
    in_merge = {id(r) for g in scanned for r in [*g.outputs.values(), *g.inputs.values()]}
    sims = figures.similarity_maps([r for r in runs if id(r) not in in_merge], matrices, n_maps)
    n_full = sum(r.result is not None for r in runs)
    map_note = (f"Similarity maps are drawn for the first {figures.MAX_MAP_RUNS} of {n_full} scans."
                if n_full > figures.MAX_MAP_RUNS else "")
    out = [
        section("scans", "Intruder dimensions",
                [figures.epsilon_curves(runs), figures.k_curves(runs), figures.per_layer(runs),
                 figures.per_module_type(runs)], [tables.scan_summary_table(runs)] if runs else []),
        section("similarity", "Similarity maps (paper Figs. 1–3)", sims, [], map_note),
        section("spectra", "ΔW spectra and effective rank", [figures.delta_spectra(runs)], []),
    ]
    if data.merges:
        out.append(section("merges", "Merges", [], [merges.merges_table(data.merges)]))
    for i, g in enumerate(scanned):  # before / after: the inputs, the merge and where its intruders come from
        out.append(section(f"merge-{i}", f"Merge: {g.name}",
                           [merges.intruder_bars(g, i), merges.attribution_map(g, i),
                            *merges.merge_maps(g, matrices, n_maps, i)],
                           [merges.attribution_table(g, i), merges.intruder_table(g, i)]))
    study = merges.study_rows(data.records)
    if study:
        out.append(section("merge-study", "Merge study", [merges.study_scatter(study)], [merges.study_table(study)]))
    for i, g in enumerate(tables.mitigation_groups(data.mitigations)):  # one section per adapter, λ as an axis
        keys = [k for k in g.items[0].settings if k not in tables.LAM_AXIS]
        shared = {k: tables.same([m.settings.get(k) for m in g.items]) for k in keys}
        settings = ", ".join(f"{k} = {v}" for k, v in shared.items() if v is not None)
        out.append(section(f"mitigation-{i}", f"Mitigation: {g.label}",
                           [figures.mitigation_lambda(g, i), figures.mitigation_changes(g, i)],
                           [tables.mitigation_sweep_table(g, i), tables.mitigation_table(g, i)], settings))
    out.append(section("sweeps", "Intruders and forgetting (paper Fig. 7)", [figures.sweep_scatter(data)],
                       [tables.spearman_table(data)] if data.spearman else []))
    lam = tables.lam_groups(data.records)
    out.append(section("lambda", "λ trade-off (paper Table 3)", [figures.lam_tradeoff(data.records)],
                       [tables.lam_table(g, i) for i, g in enumerate(lam)]))
    cont = tables.continual_groups(data.records)
    out.append(section("continual", "Continual learning", [figures.continual(data.records)],
                       [tables.continual_table(g, i) for i, g in enumerate(cont)]))
    out.append(section("dynamics", "Training dynamics", [figures.dynamics(data.tracking)], []))
    if data.records:
        out.append(section("records", "Experiment records", [], [tables.records_table(data.records)]))
    if any(r.result is not None for r in runs):
        out.append(section("matrices", "All matrices", [], [tables.matrix_table(runs)]))
    return [s for s in out if s is not None], all_plots


def _cell(v: Any) -> tuple[str, str]:
    """(text shown, sort key) for one table cell."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–", ""
    if isinstance(v, bool):
        return str(v).lower(), str(int(v))
    if isinstance(v, int):
        return str(v), str(v)
    if isinstance(v, float):
        v += 0.0  # −0.0 shows as 0
        return (f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"), repr(v)
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text, text


def render(data: ReportData, sections: list[Section]) -> str:
    template = files("lorascope.report").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["cell"] = _cell
    title = f"lorascope report: {data.root.resolve().name}"
    return env.from_string(template).render(
        title=title,
        headline=tables.headline(data) + merges.headline(data),
        sections=sections,
        provenance=_provenance(data),
        report_command=" ".join(sys.argv) if sys.argv and "lorascope" in sys.argv[0] else None,
        report_versions=_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _provenance(data: ReportData) -> list[dict[str, Any]]:
    rows = []
    for p in data.provenance():
        src = Path(p["source"])
        try:
            src = src.resolve().relative_to(data.root.resolve())
        except ValueError:
            pass
        rows.append({**p, "source": src.as_posix(),
                     "versions": ", ".join(f"{k} {v}" for k, v in (p["versions"] or {}).items())})
    return rows


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {sys.version.split()[0]}"]
    for pkg in ("lorascope", "matplotlib", "jinja2"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def _save_figures(plots: list[figures.Plot], folder: Path) -> None:
    """NAME.png and NAME.svg for every figure, each written to a temporary file and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in plots:
        atomic_write_bytes(folder / f"{p.name}.png", p.png)
        atomic_write_bytes(folder / f"{p.name}.svg", p.svg.encode("utf-8"))
