"""Read stored results (scan, mitigation, experiment) into one ``ReportData``. Nothing is recomputed.

Accepted inputs (the contract is written out in docs/report.md):

- a ``scan.json`` (``ScanResult``, result_kind "scan"),
- a ``mitigation.json`` (result_kind "mitigation": one record per changed direction),
- a ``merge.json`` (result_kind "merge", ``lorascope merge``), with the scans its ``--scan`` wrote,
- a ``records.jsonl`` experiment store (one JSON object per finished unit),
- a folder holding any of these: every ``scan.json``, ``mitigation.json`` and ``merge.json`` below it (hidden folders
  skipped; each labelled by its folder, relative to the given one), every ``records.jsonl`` below it
  (one per experiment store, with the store's ``summary.json`` beside it) and ``tracking.jsonl`` files
  (training-dynamics records) anywhere below it.

Runs made by experiment units are named as people say them (``labels.unit_name``): "LoRA r=1 (α=2,
η=1e-2)", plus the unit settings that differ between runs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.errors import InputError
from lorascope.report.labels import merge_name, unit_name, varying_keys
from lorascope.schema import MergeResult, ScanResult

RECORDS_FILE = "records.jsonl"
TRACKING_FILE = "tracking.jsonl"
SUMMARY_FILE = "summary.json"  # an experiment store's derived tables (sweeps: Spearman ρ)
MERGE_FILE = "merge.json"


@dataclass
class Run:
    """One scan shown in the report: a full ``ScanResult``, or only the summary a record kept."""

    label: str
    summary: dict[str, Any]  # the shape of ScanResult.summary(): {"epsilon", "k", "sides": {...}}
    result: ScanResult | None = None  # None when the record stored only a summary
    unit: dict[str, Any] | None = None  # the experiment unit that produced it, if any
    source: str = ""
    store: str = ""  # the experiment store of that unit, relative to the report root

    @property
    def side(self) -> str:
        """The side the figures use: left (the paper's), else the only one there is."""
        sides = self.summary.get("sides", {})
        return "left" if "left" in sides or not sides else sorted(sides)[0]

    @property
    def stats(self) -> dict[str, Any]:
        return self.summary.get("sides", {}).get(self.side, {})


@dataclass
class Mitigation:
    """A mitigation.json (``lorascope.schema.MitigationResult``): W_t' = W_t + (λ−1) Σ_{i∈I} σ_i u_i v_iᵀ,
    flattened to one row per rescaled direction."""

    label: str
    settings: dict[str, Any]
    summary: dict[str, Any]  # n_matrices, n_changed, n_directions, n_intruders, max_rel_error
    changes: list[dict[str, Any]]  # matrix, target, intruder_index, base_index, max_cos, sigma_before/after
    command: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    source: str = ""
    unit: dict[str, Any] | None = None  # the experiment unit that wrote it, if any
    record: Record | None = None  # that unit's record (accuracy, forgetting, intruders left)

    @property
    def lam(self) -> float | None:
        lam = self.settings.get("lam")
        return float(lam) if isinstance(lam, (int, float)) and not isinstance(lam, bool) else None

    @property
    def control(self) -> str:
        """'neighbour' for the paper's control (Eq. 2), else 'intruder' (Eq. 1)."""
        c = str(self.settings.get("control") or "").lower()
        return "neighbour" if c in ("neighbour", "neighbor") else "intruder"


@dataclass
class Record:
    """One line of records.jsonl (a finished unit) or of tracking.jsonl (a training step)."""

    unit: dict[str, Any]
    metrics: dict[str, Any]
    run: Run | None = None  # its scan, when it names one
    step: int | None = None  # set for training-dynamics records
    source: str = ""  # file:line
    study: str | None = None  # the experiment kind that wrote it (sweeps, intervention, ...), when stored
    store: str = ""  # the experiment store's folder, relative to the report root
    mitigation_file: Path | None = None  # the mitigation.json this unit wrote, if any
    merged_dir: Path | None = None  # the merge output folder this unit wrote (merge study), if any

    @property
    def n_intruders(self) -> float | None:
        """metrics["n_intruders"] when stored, else the total of its scan (left side)."""
        if isinstance(self.metrics.get("n_intruders"), (int, float)):
            return self.metrics["n_intruders"]
        if self.run is not None and "n_intruders" in self.run.stats:
            return self.run.stats["n_intruders"]
        return None


@dataclass
class Merge:
    """A merge.json (``lorascope.schema.MergeResult``) and, with ``--scan``, the scans it names: its
    outputs' and its inputs' (``analysis.scans``), by output and input label."""

    label: str  # its folder, relative to the report root
    result: MergeResult
    source: str
    name: str = ""  # 'TIES of a0, a1, a2', or its unit's name in a merge study
    outputs: dict[str, Run] = field(default_factory=dict)
    inputs: dict[str, Run] = field(default_factory=dict)
    unit: dict[str, Any] | None = None  # the experiment unit that wrote it, if any
    record: Record | None = None

    @property
    def method(self) -> str:
        return str(self.result.settings.get("method"))

    @property
    def input_labels(self) -> list[str]:
        return [str(x) for x in self.result.settings.get("labels", [])]

    @property
    def analysis(self) -> dict[str, Any]:
        """``--scan``'s counts (docs/merge.md), checked by the loader; {} without ``--scan``."""
        return self.result.analysis


@dataclass
class ReportData:
    root: Path
    runs: list[Run] = field(default_factory=list)
    mitigations: list[Mitigation] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)  # units (no step)
    tracking: list[Record] = field(default_factory=list)  # training-dynamics points (with step)
    spearman: list[dict[str, Any]] = field(default_factory=list)  # summary.json rows of sweep stores, + "store"

    def provenance(self) -> list[dict[str, Any]]:
        """Command, creation time and library versions of every stored result."""
        out = []
        for run in self.runs:
            if run.result is not None:
                r = run.result
                out.append({"source": run.source, "kind": "scan", "command": r.command, "created": r.created,
                            "versions": r.versions})
        for m in self.mitigations:
            out.append({"source": m.source, "kind": "mitigation", "command": m.command, "created": m.created,
                        "versions": m.versions})
        for g in self.merges:
            out.append({"source": g.source, "kind": "merge", "command": g.result.command,
                        "created": g.result.created, "versions": g.result.versions})
        return out


# ------------------------------------------------------------------------------------------ loading


def load(path: str | os.PathLike) -> ReportData:
    """Read a result file or an experiment folder; raise InputError naming the file that is wrong."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file():
        data = ReportData(root=p.parent)
        _load_file(data, p, label=_label(p.parent, p.parent))
    else:
        data = ReportData(root=p)
        for f in _find(p, "scan.json") + _find(p, "mitigation.json") + _find(p, MERGE_FILE):
            _load_file(data, f, label=_label(f.parent, p))
        for f in _find(p, RECORDS_FILE):
            store = _label(f.parent, p) if f.parent.resolve() != p.resolve() else ""
            _load_records(data, f, store=store)
            _load_summary(data, f.parent / SUMMARY_FILE, store)
        for f in _find(p, TRACKING_FILE):
            _load_records(data, f, tracking_label=_label(f.parent, p))
    if not (data.runs or data.mitigations or data.merges or data.records or data.tracking):
        if p.is_dir() and (p / RECORDS_FILE).is_file():
            raise InputError(f"{p / RECORDS_FILE}: holds no finished units yet (and the folder has no scan.json "
                             "or mitigation.json); run or resume the experiment first")
        raise InputError(f"{p}: found no scan.json, mitigation.json, {MERGE_FILE}, {RECORDS_FILE} or "
                         f"{TRACKING_FILE}")
    _link_mitigations(data)
    _link_merges(data)
    _label_runs(data.runs)
    return data


def _find(root: Path, name: str) -> list[Path]:
    """Files called ``name`` below ``root``, sorted, skipping hidden folders (atomic-write temporaries)."""
    hits = [f for f in root.rglob(name) if not any(p.startswith(".") for p in f.relative_to(root).parts)]
    return sorted(hits)


def _label(folder: Path, root: Path) -> str:
    """The folder relative to the report root ('lora/r8'), or its own name when it is the root."""
    folder, root = folder.resolve(), root.resolve()
    if folder != root and folder.is_relative_to(root):
        return folder.relative_to(root).as_posix()
    return folder.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object")
    return d


def _load_file(data: ReportData, path: Path, label: str) -> None:
    if path.suffix == ".jsonl":
        _load_records(data, path, tracking_label=label if path.name == TRACKING_FILE else None)
        return
    d = _read_json(path)
    kind = d.get("result_kind", "scan" if "matrices" in d else None)
    if kind == "scan":
        data.runs.append(_scan_run(path, d, label))
    elif kind == "mitigation":
        data.mitigations.append(_mitigation(path, label))
    elif kind == "merge":
        data.merges.append(_merge(path, label))
    else:
        raise InputError(f"{path}: result_kind '{kind}' is not one report reads (scan, mitigation, merge)")


def _scan_run(path: Path, d: dict[str, Any], label: str) -> Run:
    try:
        result = ScanResult.from_dict(d)
    except (KeyError, TypeError, AttributeError, ValueError, InputError) as e:
        raise InputError(f"{path}: not a lorascope scan result ({e})") from e
    # The summary is re-counted from the stored max-cos values (schema.summarize), not read back.
    return Run(label=label, summary=result.summary(), result=result, source=str(path))


def _mitigation(path: Path, label: str) -> Mitigation:
    from lorascope.schema import MitigationResult

    res = MitigationResult.load(path)
    changes = [
        {"matrix": m.name, "target": d.target, "intruder_index": d.intruder_index, "base_index": d.base_index,
         "max_cos": d.intruder_max_cos, "sigma_before": d.sigma_before, "sigma_after": d.sigma_after,
         "rel_error": m.rel_error}
        for m in res.matrices for d in m.directions
    ]
    return Mitigation(label=label, settings=res.settings, summary=res.summary(), changes=changes,
                      command=res.command, versions=res.versions, created=res.created, source=str(path))


def _load_records(data: ReportData, path: Path, tracking_label: str | None = None, store: str = "") -> None:
    """Records of an experiment store; lines of a tracking.jsonl may leave out 'unit' (named by folder)."""
    scans: dict[Path, Run] = {Path(r.source).resolve(): r for r in data.runs if r.result is not None}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e})") from e
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a JSON object")
        unit = d.get("unit", {"run": tracking_label} if tracking_label is not None else None)
        metrics = d.get("metrics")
        if not isinstance(unit, dict) or not isinstance(metrics, dict):
            raise InputError(f"{where}: a record needs a 'unit' object and a 'metrics' object")
        step = d.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise InputError(f"{where}: 'step' must be an integer, got {step!r}")
        rec = Record(unit=unit, metrics=metrics, step=step, source=where, study=d.get("study"), store=store)
        mitigation = (d.get("paths") or {}).get("mitigation") if isinstance(d.get("paths"), dict) else None
        if isinstance(mitigation, str):
            rec.mitigation_file = (path.parent / mitigation).resolve()
        merged = (d.get("paths") or {}).get("merged") if isinstance(d.get("paths"), dict) else None
        if isinstance(merged, str):
            rec.merged_dir = (path.parent / merged).resolve()
        if "scan" in d and d["scan"] is not None:
            rec.run = _record_scan(d["scan"], path.parent, where, scans)
            if step is None:  # a unit's scan is one of the report's runs, named after the unit
                rec.run.unit, rec.run.store = unit, store
                if not any(rec.run is r for r in data.runs):
                    data.runs.append(rec.run)
        (data.records if step is None else data.tracking).append(rec)


def _load_summary(data: ReportData, path: Path, store: str) -> None:
    """The Spearman rows of a sweep store's summary.json (written by the experiment runner), if any."""
    if not path.is_file():
        return
    rows = _read_json(path).get("spearman", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: 'spearman' must be a list of objects")
    data.spearman.extend({**r, "store": store} for r in rows)


def _link_mitigations(data: ReportData) -> None:
    """Attach to each mitigation.json the record of the unit that wrote it (named in its 'paths')."""
    by_file = {r.mitigation_file: r for r in data.records if r.mitigation_file is not None}
    for m in data.mitigations:
        rec = by_file.get(Path(m.source).resolve())
        if rec is not None:
            m.record, m.unit = rec, rec.unit


def _merge(path: Path, label: str) -> Merge:
    """A merge.json; its ``analysis`` (free-form in the schema) is checked here, as the report reads it."""
    res = MergeResult.load(path)
    a = res.analysis
    if a:
        def counts(value: Any) -> bool:
            return isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                                   for v in value.values())

        checks = {"intruders.outputs": counts((a.get("intruders") or {}).get("outputs")),
                  "intruders.inputs": counts((a.get("intruders") or {}).get("inputs")),
                  "attributed_to": counts(a.get("attributed_to")),
                  "new_directions": isinstance(a.get("new_directions"), int),
                  "scans": isinstance(a.get("scans"), dict) and all(isinstance(v, str) for v in a["scans"].values()),
                  "epsilon": isinstance(a.get("epsilon"), (int, float)), "k": isinstance(a.get("k"), int)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"{path}: analysis.{bad[0]} is missing or not of the type docs/merge.md gives")
    return Merge(label=label, result=res, source=str(path))


def _link_merges(data: ReportData) -> None:
    """Attach each merge.json to the unit that wrote it (``paths.merged``) and to the scans its ``--scan``
    wrote (read here when the report was given the merge.json alone); those scans are named after the
    merge: 'TIES merge', 'input a0' (with the merge's folder first when the report holds several)."""
    by_dir = {r.merged_dir: r for r in data.records if r.merged_dir is not None}
    units = [r.unit for r in by_dir.values()]
    varying = varying_keys(units)
    scans: dict[Path, Run] = {Path(r.source).resolve(): r for r in data.runs if r.result is not None}
    scanned = [g for g in data.merges if g.analysis]
    for g in data.merges:
        rec = by_dir.get(Path(g.source).resolve().parent)
        if rec is not None:
            g.record, g.unit = rec, rec.unit
        method = merge_name(g.method)
        g.name = (unit_name(g.unit, varying) if g.unit else "") or f"{method} of {', '.join(g.input_labels)}"
        prefix = f"{g.label}: " if len(scanned) > 1 else ""
        outputs = set((g.analysis.get("intruders") or {}).get("outputs", {}))
        for key, rel in (g.analysis.get("scans") or {}).items():
            role, _, label = key.partition("-")
            p = (Path(g.source).parent / rel).resolve()
            if p not in scans:
                if not p.is_file():
                    raise InputError(f"{g.source}: analysis.scans names '{rel}', which is not there (looked for {p})")
                scans[p] = _scan_run(p, _read_json(p), label)
                data.runs.append(scans[p])
            run = scans[p]
            if role == "output" and label in outputs:
                run.label = prefix + (f"{method} merge" if len(outputs) == 1 else f"{method} merge for {label}")
                g.outputs[label] = run
            elif role == "input":
                run.label = f"{prefix}input {label}"
                g.inputs[label] = run


def _record_scan(scan: Any, root: Path, where: str, scans: dict[Path, Run]) -> Run:
    """A record's ``scan``: a path (relative to the experiment folder) or a summary dict."""
    if isinstance(scan, str):
        p = root / scan
        if p.is_dir():
            p = p / "scan.json"
        key = p.resolve()
        if key not in scans:
            if not p.is_file():
                raise InputError(f"{where}: scan '{scan}' not found (looked for {p})")
            scans[key] = _scan_run(p, _read_json(p), _label(p.parent, root))
        return scans[key]
    if isinstance(scan, dict) and isinstance(scan.get("sides"), dict):
        return Run(label="", summary=scan, source=where)
    raise InputError(f"{where}: 'scan' must be a path to a scan.json or a summary object with 'sides'")


def _label_runs(runs: list[Run]) -> None:
    """Runs made by experiment units are named by their method and the unit settings that differ
    between them (``labels.unit_name``); equal names get their store or folder added."""
    varying = varying_keys([r.unit for r in runs if r.unit])
    for r in runs:
        if r.unit:
            r.label = unit_name(r.unit, varying) or r.label or unit_label(r.unit)
    runs.sort(key=lambda r: natural_key(r.label))  # r=4 before r=16
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            folder = Path(r.source).parent.name if r.result else r.source.rsplit(":", 1)[-1]
            r.label = f"{r.label} ({r.store or folder})"


def natural_key(text: str) -> list[tuple[int, float | str]]:
    """Sort key reading numbers as numbers: 'r4' < 'r16', 'lam=0.25' < 'lam=0.5'."""
    return [(0, float(t)) if t[0].isdigit() else (1, t) for t in re.split(r"(\d+(?:\.\d+)?)", text) if t]


def unit_label(unit: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    return " ".join(f"{k}={v}" for k, v in unit.items() if k not in drop) or "all"
