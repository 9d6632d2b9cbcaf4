"""``lorascope check``: a pass/fail gate on a scan's data-free scores, with JSON, SARIF 2.1.0 and JUnit.

A condition is ``NAME OP NUMBER`` (``risk>0.3``, ``intruders>20``), NAME one of ``risk.SCORES``, OP
one of ``> >= < <=``; several, comma-separated, fail when any holds (default
``risk.DEFAULT_FAIL_ON``). A flagged matrix is one that makes a failing condition true: its own value
breaks the threshold (for ``risk``, the worst matrix's, and for the means), or it adds to a failing
sum (``intruders``, ``strength``: a value above 0).

Torch-free: it reads a ``ScanResult``'s records and summary only (docs/risk.md).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_json, atomic_write_text
from lorascope.risk import MEANING, SCORES, SUMMED, VALIDATED, VALIDATION, matrix_scores, model_scores
from lorascope.schema import ScanResult

CHECK_FORMATS = ("json", "sarif", "junit")
OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                  "<": operator.lt}
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclass(frozen=True)
class Condition:
    score: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.score}{self.op}{self.threshold:g}"

    def holds(self, value: float | None) -> bool:
        return value is not None and OPS[self.op](value, self.threshold)


@dataclass
class Verdict:
    passed: bool
    scores: dict[str, float | None]
    conditions: list[Condition]
    failed: list[Condition] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)  # name, condition, score, value, its scores
    side: str = "left"


def parse_fail_on(expr: str) -> list[Condition]:
    """``"risk>0.3, intruders>20"`` -> conditions; anything else is an InputError naming the part."""
    parts = [p for p in expr.split(",") if p.strip()]
    if not parts:
        raise InputError(f"--fail-on '{expr}' is empty: write e.g. \"risk>0.3\" or \"intruders>20\"")
    out = []
    for part in parts:
        m = _CONDITION.match(part)
        if m is None:
            raise InputError(f"--fail-on: '{part.strip()}' is not a condition NAME OP NUMBER (e.g. risk>0.3; "
                             f"OP one of > >= < <=)")
        if m.group(1) not in SCORES:
            raise InputError(f"--fail-on: unknown score '{m.group(1)}' in '{part.strip()}' (choose from "
                             f"{', '.join(SCORES)})")
        out.append(Condition(m.group(1), m.group(2), float(m.group(3))))
    return out


def check_formats(formats: str) -> tuple[str, ...]:
    out = tuple(f.strip().lower() for f in formats.split(",") if f.strip())
    for f in out:
        if f not in CHECK_FORMATS:
            raise InputError(f"--format: unknown output format '{f}' (choose from {', '.join(CHECK_FORMATS)})")
    return out or ("json",)


def judge(result: ScanResult, conditions: list[Condition]) -> Verdict:
    """The verdict on one scan: its model scores (left side, else the first) against the conditions."""
    sides = sorted({m.side for m in result.matrices}) or ["left"]
    side = "left" if "left" in sides else sides[0]
    records = [m for m in result.matrices if m.side == side]
    if not records:  # a gate that passes on nothing would be a guess
        raise InputError(f"{result.settings.get('tuned', 'the input')}: no matrix was scanned, nothing to check "
                         f"(see the scan's unpaired list)")
    scores = model_scores(records)["scores"]
    failed = [c for c in conditions if c.holds(scores[c.score])]
    flagged = []
    for c in failed:
        source = "risk" if c.score == "risk_mean" else c.score
        for r in records:
            s = matrix_scores(r)
            value = s[source]
            if value is not None and (value > 0 if c.score in SUMMED else c.holds(value)):
                flagged.append({"name": r.name, "condition": str(c), "score": c.score, "value": value, "scores": s})
    flagged.sort(key=lambda f: -(f["scores"]["risk"] or 0.0))
    return Verdict(not failed, scores, conditions, failed, flagged, side)


def verdict_dict(v: Verdict, base: str, adapter: str) -> dict[str, Any]:
    return {"verdict": "pass" if v.passed else "fail", "base": base, "adapter": adapter, "side": v.side,
            "fail_on": [str(c) for c in v.conditions], "failed": [str(c) for c in v.failed],
            "scores": v.scores, "meaning": {k: MEANING[k] for k in v.scores}, "validated": VALIDATED,
            "flagged": v.flagged}


def _sarif_json(obj: Any) -> Any:
    """A sarif_om object as SARIF JSON: each attrs field under its schema name, defaults left out."""
    import attr

    if attr.has(type(obj)):
        out = {}
        for f in attr.fields(type(obj)):
            value = getattr(obj, f.name)
            default = f.default.factory() if isinstance(f.default, attr.Factory) else f.default
            if value is None or (f.default is not attr.NOTHING and value == default):
                continue
            out[f.metadata["schema_property_name"]] = _sarif_json(value)
        return out
    if isinstance(obj, list):
        return [_sarif_json(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _sarif_json(x) for k, x in obj.items()}
    return obj


def _artifact_uri(adapter: str) -> str:
    """The adapter's weight file (what code scanning annotates), relative to the working folder."""
    p = Path(adapter)
    if p.is_dir():
        p = next((p / n for n in ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin")
                  if (p / n).is_file()), p)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.resolve().as_uri()


def sarif_log(v: Verdict, base: str, adapter: str, version: str) -> dict[str, Any]:
    """SARIF 2.1.0: one rule per failing condition, one result per flagged matrix."""
    import sarif_om as so

    rules = [so.ReportingDescriptor(
        id=f"lorascope/{c.score}", name=c.score,
        short_description=so.MultiformatMessageString(text=f"fail when {c}"),
        full_description=so.MultiformatMessageString(text=f"{MEANING[c.score]} (docs/risk.md; {VALIDATION})"),
        help_uri="https://arxiv.org/abs/2410.21228") for c in v.conditions]
    index = {c.score: i for i, c in enumerate(v.conditions)}
    uri = _artifact_uri(adapter)
    results = []
    for f in v.flagged:
        score = f["score"]
        results.append(so.Result(
            rule_id=f"lorascope/{score}", rule_index=index[score], level="error",
            message=so.Message(text=f"{f['name']}: {score} = {f['value']:.4g} ({f['condition']} fails the model); "
                                    f"risk {f['scores']['risk'] or 0:.3f}, {int(f['scores']['intruders'])} "
                                    f"intruder(s) against base {base}"),
            locations=[so.Location(
                physical_location=so.PhysicalLocation(artifact_location=so.ArtifactLocation(uri=uri),
                                                      region=so.Region(start_line=1)),
                logical_locations=[so.LogicalLocation(fully_qualified_name=f["name"], kind="member")])],
            partial_fingerprints={"matrix/v1": f"{f['name']}:{score}"},
            properties={"scores": f["scores"]}))
    run = so.Run(
        tool=so.Tool(driver=so.ToolComponent(name="lorascope", version=version, rules=rules,
                                             information_uri="https://arxiv.org/abs/2410.21228")),
        results=results,
        invocations=[so.Invocation(execution_successful=True, exit_code=0 if v.passed else 1)],
        properties={"verdict": "pass" if v.passed else "fail", "scores": v.scores})
    return _sarif_json(so.SarifLog(version="2.1.0", schema_uri=SARIF_SCHEMA, runs=[run]))


def junit_xml(v: Verdict, adapter: str) -> str:
    """One JUnit test case per condition, failed with the flagged matrices listed."""
    from junit_xml import TestCase, TestSuite, to_xml_report_string

    cases = []
    for c in v.conditions:
        case = TestCase(f"{c}", classname="lorascope.check", stdout=f"{c.score} = {v.scores[c.score]}")
        if c in v.failed:
            names = [f["name"] for f in v.flagged if f["condition"] == str(c)]
            case.add_failure_info(message=f"{c.score} = {v.scores[c.score]:.4g} ({c})",
                                  output="flagged matrices:\n" + "\n".join(names), failure_type="risk")
        cases.append(case)
    return to_xml_report_string([TestSuite(f"lorascope check {adapter}", cases)])


def write_outputs(v: Verdict, result: ScanResult, out: Path, formats: tuple[str, ...], base: str,
                  adapter: str) -> list[Path]:
    """OUT/check.json (+ scan.json), OUT/check.sarif, OUT/check.junit.xml, atomically."""
    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    if "json" in formats:
        written += result.save(out)
        written.append(out / "check.json")
        atomic_write_json(written[-1], verdict_dict(v, base, adapter))
    if "sarif" in formats:
        written.append(out / "check.sarif")
        atomic_write_json(written[-1], sarif_log(v, base, adapter, result.versions.get("lorascope", "")))
    if "junit" in formats:
        written.append(out / "check.junit.xml")
        atomic_write_text(written[-1], junit_xml(v, adapter))
    return written
