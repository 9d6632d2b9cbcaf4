"""The versioned result schema that scan writes and mitigate, merge, report and experiments read.

One ``ScanResult`` holds one record per (weight matrix, side). Everything model-level (totals,
per-layer counts, ε- and k-curves) is *derived* from the records by ``summarize``, so any ε and any
k' ≤ k can be re-counted from a saved scan without recomputing a decomposition. See docs/schema.md.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_files, atomic_write_json
from lorascope.risk import model_scores

SCHEMA_VERSION = "1.1"  # 1.1: delta_kurtosis per record, the risk scores per side in summary
OUTPUT_FORMATS = ("json", "csv", "parquet")
# How pydantic reads records back (``validated``): exact types, no NaN or infinity.
_STRICT = {"strict": True, "allow_inf_nan": False, "extra": "ignore"}  # ignore: a newer minor version reads
EPSILON_GRID = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 … 0.95


@dataclass
class MatrixRecord:
    """Alg. 1 for one matrix W (out × in) and one side (left: output space, right: input space)."""

    __pydantic_config__ = _STRICT

    name: str  # base checkpoint tensor name
    kind: str  # linear | conv1d | embedding
    side: str  # left | right
    shape: list[int]  # [out, in]
    layer: int | None  # first integer in the name (transformer block), if any
    module_type: str  # the name after the block index, e.g. "self_attn.q_proj"
    singular_values: list[float]  # σ_1..σ_k of W_t
    max_cos: list[float]  # max_i |cos(y_j, x_i)| over all base singular vectors, j = 1..k
    best_match: list[int]  # argmax i (0-based rank of the base vector)
    n_intruders: int  # at the scan's ε and k
    similarity: list[list[float]]  # |cos(y_j, x_i)|, j < k tuned, i < n_map base (for similarity maps)
    base_singular_values: list[float]  # σ_1..σ_{n_map} of W_0
    delta_singular_values: list[float]  # top singular values of ΔW (at most 256)
    delta_effective_rank: float  # Roy & Vetterli 2007
    delta_stable_rank: float  # ‖ΔW‖_F² / ‖ΔW‖_2²
    delta_rel_norm: float  # ‖ΔW‖_F / ‖W_0‖_F
    null_max_cos: float  # mean max |cos| of a random unit vector against the base basis
    null_max_cos_q99: float
    exact: bool  # top-k from an exact decomposition (True) or converged subspace iteration
    delta_kurtosis: float | None = None  # excess kurtosis of ΔW's entries (None: ΔW constant, or a 1.0 file)


@dataclass
class Result:
    """The envelope every result file shares: what was compared, with what, when and how fast."""

    settings: dict[str, Any]
    matrices: list[Any]
    versions: dict[str, str] = field(default_factory=dict)
    unpaired: dict[str, list[str]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    command: str | None = None
    created: str | None = None
    schema_version: str = SCHEMA_VERSION
    result_kind: str = ""
    FILE: ClassVar[str] = ""  # the file in an output folder (mitigation.json, merge.json)
    RECORD: ClassVar[type] = object  # one matrix's record
    EXTRA: ClassVar[tuple[str, ...]] = ()  # dict fields written after settings (output, analysis)

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return self._to_dict(**{key: getattr(self, key) for key in self.EXTRA})

    def save(self, out_dir: str | os.PathLike) -> Path:
        path = Path(out_dir) / self.FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        """Read the result file, or the one inside an output folder; every record is validated."""
        p = Path(path)
        p = p / cls.FILE if p.is_dir() else p
        try:
            d = json.loads(p.read_text())

            def records(ms: list[dict[str, Any]]) -> list[Any]:
                return [validated(cls.RECORD, m, i) for i, m in enumerate(ms)]

            return cls(**cls._envelope(d, records), **{key: d.get(key, {}) for key in cls.EXTRA})
        except (OSError, ValueError, KeyError, TypeError, InputError) as e:
            raise InputError(f"{p}: not a lorascope {cls.result_kind} result ({e})") from e

    def _to_dict(self, **extra: Any) -> dict[str, Any]:
        """The envelope in its fixed key order, with ``extra`` (e.g. a mitigation's output) after settings."""
        return {
            "schema_version": self.schema_version, "result_kind": self.result_kind, "created": self.created,
            "command": self.command, "settings": self.settings, **extra, "versions": self.versions,
            "timing": self.timing, "summary": self.summary(), "unpaired": self.unpaired,
            "matrices": [asdict(m) for m in self.matrices],
        }

    @classmethod
    def _envelope(cls, d: dict[str, Any], matrices: Callable[[list[Any]], list[Any]]) -> dict[str, Any]:
        """The constructor arguments shared by every kind, after checking the kind and major version;
        ``matrices`` builds the records from their dicts."""
        version = str(d.get("schema_version", ""))
        if d.get("result_kind", cls.result_kind) != cls.result_kind:
            raise InputError(f"result_kind is '{d.get('result_kind')}', expected '{cls.result_kind}'")
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise InputError(f"{cls.result_kind} result has schema version '{version}', this lorascope reads "
                             f"{SCHEMA_VERSION}")
        return dict(settings=d["settings"], matrices=matrices(d["matrices"]), versions=d.get("versions", {}),
                    unpaired=d.get("unpaired", {}), timing=d.get("timing", {}), command=d.get("command"),
                    created=d.get("created"), schema_version=version)


@dataclass
class ScanResult(Result):
    matrices: list[MatrixRecord] = field(default_factory=list)
    result_kind: str = "scan"

    # -- derived views ---------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        return float(self.settings["epsilon"])

    @property
    def k(self) -> int:
        return int(self.settings["k"])

    def summary(self, epsilon: float | None = None, k: int | None = None) -> dict[str, Any]:
        """Counts at (ε, k'), any ε and any k' ≤ the scan's k (a larger k' would need vectors the scan
        never computed: an InputError, not a silent recount at the stored k)."""
        if k is not None:
            check_k(k, self.k)
        return summarize(self.matrices, self.epsilon if epsilon is None else epsilon, self.k if k is None else k)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per record (lists as JSON strings, no similarity map), for CSV."""
        rows = []
        for m in self.matrices:
            row = {key: v for key, v in asdict(m).items() if key not in ("similarity",)}
            for key in ("shape", "singular_values", "max_cos", "best_match", "base_singular_values",
                        "delta_singular_values"):
                row[key] = json.dumps(row[key])
            row["min_max_cos"] = min(m.max_cos) if m.max_cos else math.nan
            rows.append(row)
        return rows

    def to_pandas(self):  # -> pandas.DataFrame
        """One row per matrix and side, every field a column, lists as native lists (``similarity`` a
        list of lists), plus ``min_max_cos``; the table Parquet stores."""
        import pandas as pd

        rows = [{**asdict(m), "min_max_cos": min(m.max_cos) if m.max_cos else math.nan} for m in self.matrices]
        columns = [f.name for f in fields(MatrixRecord)] + ["min_max_cos"]
        return pd.DataFrame(rows, columns=columns)

    to_frame = to_pandas  # the older name

    def _repr_html_(self) -> str:
        """Jupyter: the headline of each side and its worst matrices."""
        summary = self.summary()
        parts = [f"<p><b>lorascope scan</b> of {_h(self.settings.get('tuned'))} against "
                 f"{_h(self.settings.get('base'))} (ε={summary['epsilon']}, k={summary['k']})</p>"]
        for side, s in summary["sides"].items():
            parts.append(f"<p>{side} singular vectors: <b>{s['n_intruders']} intruder dimensions</b> in "
                         f"{s['matrices_with_intruders']} of {s['n_matrices']} matrices; mean effective rank of "
                         f"ΔW {s['mean_delta_effective_rank']:.2f}</p>")
            by_name = {m.name: m for m in self.matrices if m.side == side}
            rows = [(w["n_intruders"], f"{min(by_name[w['name']].max_cos):.3f}",
                     f"{by_name[w['name']].null_max_cos:.3f}", w["name"]) for w in s["worst"]]
            parts.append(_html_table(("intruders", "min max|cos|", "chance max|cos|", "matrix"), rows))
        return "\n".join(parts)

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self._to_dict()

    def save(self, out_dir: str | os.PathLike, formats: tuple[str, ...] = ("json",)) -> list[Path]:
        """Write ``scan.json`` (always) and ``scan.csv`` / ``scan.parquet`` on request, atomically."""
        formats = check_formats(formats)
        files = {"scan.json": (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8")}
        if "csv" in formats:
            import csv

            buf = io.StringIO()
            rows = self.rows()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
            writer.writeheader()
            writer.writerows(rows)
            files["scan.csv"] = buf.getvalue().encode("utf-8")
        if "parquet" in formats:
            pq = io.BytesIO()
            self.to_pandas().to_parquet(pq, index=False)  # native list columns, similarity maps included
            files["scan.parquet"] = pq.getvalue()
        return atomic_write_files(out_dir, files)  # all or none: a full disk leaves the old files

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanResult:
        return cls(**cls._envelope(d, lambda ms: [validated(MatrixRecord, m, i) for i, m in enumerate(ms)]))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanResult:
        """Read a scan.json, or the scan.json inside a folder."""
        p = Path(path)
        if p.is_dir():
            p = p / "scan.json"
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, InputError) as e:
            raise InputError(f"{p}: not a lorascope scan result ({e})") from e


# -- mitigation (paper §5) -----------------------------------------------------------------------
@dataclass
class ScaledDirection:
    """One rank-1 direction whose singular value was multiplied by λ."""

    __pydantic_config__ = _STRICT

    target: str  # "intruder": (σ_j, u_j, v_j) of W_t, Eq. (1); "neighbour": (σ⁰_i, x_i, y_i) of W_0, Eq. (2)
    intruder_index: int  # j: rank of the intruder among the top-k of W_t (0-based)
    intruder_max_cos: float  # max_i |cos(u_j, x_i)|
    base_index: int  # i* = argmax_i |cos(u_j, x_i)|: the best-matching pre-trained vector (0-based)
    sigma_before: float
    sigma_after: float  # λ · sigma_before


@dataclass
class MatrixMitigation:
    """Alg. 1 and the change made for one matrix (listed whether or not it changed)."""

    __pydantic_config__ = _STRICT

    name: str  # base tensor name
    kind: str  # linear | conv1d | embedding
    shape: list[int]  # [out, in]
    source: str  # adapter module path, "saved:<name>" (modules_to_save) or the tuned tensor name
    singular_values: list[float]  # σ_1..σ_k of W_t
    max_cos: list[float]  # max_i |cos(u_j, x_i)|, j = 1..k
    best_match: list[int]
    n_intruders: int  # at (ε, k)
    directions: list[ScaledDirection]  # empty: the matrix was left as it was
    rank_before: int | None = None  # LoRA rank in the input adapter
    rank_after: int | None = None  # LoRA rank in the output adapter
    rel_error: float | None = None  # ‖W_written − W_t'‖_F / ‖W_t'‖_F, W_t' exact in float64
    compress_rel_error: float | None = None  # ‖ΔW'_R − ΔW'‖_F / ‖ΔW'‖_F of the rank-R refactorisation


@dataclass
class MitigationResult(Result):
    matrices: list[MatrixMitigation] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)  # path, format, files
    result_kind: str = "mitigation"
    FILE = "mitigation.json"
    RECORD = MatrixMitigation
    EXTRA = ("output",)

    def summary(self) -> dict[str, Any]:
        errors = [m.rel_error for m in self.matrices if m.rel_error is not None]
        return {
            "n_matrices": len(self.matrices),
            "n_changed": sum(1 for m in self.matrices if m.directions),
            "n_directions": sum(len(m.directions) for m in self.matrices),
            "n_intruders": sum(m.n_intruders for m in self.matrices),
            "max_rel_error": max(errors, default=0.0),
        }


    def to_pandas(self):  # -> pandas.DataFrame
        """One row per scaled direction (matrices left as they were have none)."""
        import pandas as pd

        rows = [{"name": m.name, "kind": m.kind, "shape": m.shape, "n_intruders": m.n_intruders,
                 "rel_error": m.rel_error, **asdict(d)} for m in self.matrices for d in m.directions]
        return pd.DataFrame(rows, columns=["name", "kind", "shape", "n_intruders", "rel_error",
                                           *(f.name for f in fields(ScaledDirection))])

    def _repr_html_(self) -> str:
        """Jupyter: what was scaled, and the matrices with the most scaled directions."""
        s, st = self.summary(), self.settings
        parts = [f"<p><b>lorascope mitigation</b> of {_h(st.get('tuned'))} (λ={st.get('lam')}, "
                 f"which={st.get('which')}, control={st.get('control') or 'none'}, ε={st.get('epsilon')}, "
                 f"k={st.get('k')}): <b>{s['n_directions']} direction(s) scaled</b> in {s['n_changed']} of "
                 f"{s['n_matrices']} matrices; largest relative error {s['max_rel_error']:.2e}; written as "
                 f"{_h(self.output.get('format'))} to {_h(self.output.get('path'))}</p>"]
        worst = sorted((m for m in self.matrices if m.directions), key=lambda m: -len(m.directions))[:10]
        rows = [(len(m.directions), ", ".join(f"{d.sigma_before:.4g}→{d.sigma_after:.4g}" for d in m.directions),
                 f"{min(d.intruder_max_cos for d in m.directions):.3f}", m.name) for m in worst]
        parts.append(_html_table(("directions", "σ before→after", "min max|cos|", "matrix"), rows))
        return "\n".join(parts)


def _h(value: Any) -> str:
    import html

    return html.escape(str(value))


def _html_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"



# -- merge (lorascope merge) -----------------------------------------------------------------------
@dataclass
class MergedIntruder:
    """One intruder of a merged matrix and where it comes from (``--scan``)."""

    __pydantic_config__ = _STRICT

    output: int  # which output (0; EMR: the input whose adapter it is)
    index: int  # j: rank among the merged matrix's top-k (0-based)
    max_cos: float  # max_i |cos(u_j, x_i)| over the base's left singular vectors (< ε)
    input_max_cos: list[float]  # per input: max_l |cos(u_j, u_l^(input))| over that input's top-k left vectors


@dataclass
class MatrixMerge:
    """One merged matrix: its outputs' ranks and how exactly the written weights hold the merge."""

    __pydantic_config__ = _STRICT

    name: str  # base tensor name
    kind: str  # linear | conv1d | embedding | conv2d
    shape: list[int]  # [out, in]
    sources: list[str]  # each input's reference for it
    input_ranks: list[int | None]  # LoRA rank of each input (None: dense ΔW)
    delta_rel_norm: list[float]  # ‖ΔW_out‖_F / ‖W_0‖_F per output
    rank_after: list[int]  # numerical rank of each output's ΔW (the LoRA rank written)
    rel_error: list[float]  # ‖W_written − (W_0 + ΔW)‖_F / ‖W_0 + ΔW‖_F per output, ΔW exact in float64
    intruders: list[MergedIntruder] = field(default_factory=list)  # with --scan


@dataclass
class MergeResult(Result):
    matrices: list[MatrixMerge] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=dict)  # path, format, outputs (label, path, files, bytes), storage
    analysis: dict[str, Any] = field(default_factory=dict)  # with --scan: intruders per input and output
    result_kind: str = "merge"
    FILE = "merge.json"
    RECORD = MatrixMerge
    EXTRA = ("output", "analysis")

    def summary(self) -> dict[str, Any]:
        errors = [e for m in self.matrices for e in m.rel_error]
        ranks = [r for m in self.matrices for r in m.rank_after]
        return {
            "n_matrices": len(self.matrices),
            "max_rel_error": max(errors, default=0.0),
            "mean_rank_after": sum(ranks) / len(ranks) if ranks else 0.0,
            "n_merged_intruders": sum(len(m.intruders) for m in self.matrices),
        }

def validated(cls: type, record: Any, index: int) -> Any:
    """A record read back from a file, with every field of the type the dataclass declares (a string
    is not a number, a missing field is an error) and every number finite: a NaN max-cos would count
    as a non-intruder (NaN < ε is false), so a file that holds one is refused, not read."""
    from pydantic import TypeAdapter, ValidationError

    try:
        adapter = _ADAPTERS.get(cls) or _ADAPTERS.setdefault(cls, TypeAdapter(cls))
        # JSON mode: strict types yet an object may stand for the dataclass, as it does in the file
        return adapter.validate_json(json.dumps(record), strict=True)
    except ValidationError as e:
        where = record.get("name", "?") if isinstance(record, dict) else "?"
        first = e.errors()[0]
        field_ = ".".join(str(x) for x in first["loc"])
        raise InputError(f"matrix {index} ('{where}'): field '{field_}': {first['msg']}") from None


_ADAPTERS: dict[type, Any] = {}


def check_formats(formats: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Output formats of a scan ('json,csv' or a sequence), each one known, else an InputError."""
    items = formats.split(",") if isinstance(formats, str) else formats
    out = tuple(f.strip().lower() for f in items if f.strip())
    for f in out:
        if f not in OUTPUT_FORMATS:
            raise InputError(f"--format: unknown output format '{f}' (choose from {', '.join(OUTPUT_FORMATS)})")
    if "parquet" in out:
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise InputError("--format parquet needs pyarrow: pip install 'lorascope[parquet]'") from e
    return out or ("json",)


# -- derived views -------------------------------------------------------------------------------
def check_k(k: Any, stored: int) -> None:
    """A k to recount at: a whole number from 1 to the k the records were computed with."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a whole number of at least 1, got {k!r}")
    if k > stored:
        raise InputError(f"k={k} exceeds the scan's k={stored}: only the top {stored} singular vectors of each "
                         f"matrix were tested; scan again with k={k}")


def summarize(records: list[MatrixRecord], epsilon: float, k: int) -> dict[str, Any]:
    """Model-level counts at (ε, k), plus the ε-curve at k, the k-curve at ε and the data-free risk
    scores (``lorascope.risk``), per side."""
    computed = [len(r.max_cos) for r in records if r.max_cos]
    if computed:
        check_k(k, min(computed))
    out: dict[str, Any] = {"epsilon": epsilon, "k": k, "sides": {}}
    for side in sorted({r.side for r in records}):
        recs = [r for r in records if r.side == side]
        counts = [sum(1 for c in r.max_cos[:k] if c < epsilon) for r in recs]
        per_layer: dict[str, int] = {}
        per_type: dict[str, int] = {}
        for r, c in zip(recs, counts, strict=True):
            layer = "none" if r.layer is None else str(r.layer)
            per_layer[layer] = per_layer.get(layer, 0) + c
            per_type[r.module_type] = per_type.get(r.module_type, 0) + c
        worst = sorted(zip(counts, (r.name for r in recs), strict=True), key=lambda t: -t[0])[:10]
        kmax = max((len(r.max_cos) for r in recs), default=0)
        out["sides"][side] = {
            "n_matrices": len(recs),
            "n_intruders": sum(counts),
            "matrices_with_intruders": sum(1 for c in counts if c > 0),
            "per_layer": per_layer,
            "per_module_type": per_type,
            "worst": [{"name": n, "n_intruders": c} for c, n in worst if c > 0],
            "epsilon_curve": {
                "epsilon": EPSILON_GRID,
                "n_intruders": [sum(1 for r in recs for c in r.max_cos[:k] if c < e) for e in EPSILON_GRID],
            },
            "k_curve": {
                "k": list(range(1, kmax + 1)),
                "n_intruders": [sum(1 for r in recs for c in r.max_cos[:kk] if c < epsilon)
                                for kk in range(1, kmax + 1)],
            },
            "mean_delta_effective_rank": (
                sum(r.delta_effective_rank for r in recs) / len(recs) if recs else 0.0
            ),
            "risk": model_scores(recs),  # at ε = 0.5, k = 10 whatever the scan's (lorascope.risk)
        }
    return out


_INT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def parse_name(name: str) -> tuple[int | None, str]:
    """'model.layers.3.self_attn.q_proj.weight' -> (3, 'self_attn.q_proj'); names without a block
    index keep their last module component ('lm_head')."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    m = _INT.search(stem)
    if m is None:
        return None, stem.split(".")[-1]
    return int(m.group(1)), stem[m.end():] or stem.split(".")[-1]
