"""`lorascope check`: pass, fail and bad input on a tiny LoRA; SARIF 2.1.0 checked against the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from lorascope.check import judge, parse_fail_on
from lorascope.errors import InputError
from lorascope.risk import matrix_scores
from lorascope.schema import ScanResult

SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorascope", "check", *args, "--device", "cpu"],
                          capture_output=True, text=True, env=ENV)


def test_fail_on_expressions():
    assert [str(c) for c in parse_fail_on("risk>0.6, intruders >= 20")] == ["risk>0.6", "intruders>=20"]
    for bad, says in [("risk>>0.6", "risk>>0.6"), ("danger>1", "unknown score 'danger'"), ("", "empty"),
                      ("risk>0.6,intruders", "'intruders' is not a condition")]:
        with pytest.raises(InputError, match=says):
            parse_fail_on(bad)


def test_check_passes_fails_and_writes_sarif_and_junit(llama_lora, tmp_path):
    base, adapter, _ = llama_lora()
    ok = _check(str(base), str(adapter), "--fail-on", "intruders>1000", "--out", str(tmp_path / "ok"),
                "--format", "json,sarif,junit")
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stderr and "worst matrices" in ok.stderr and "risk" in ok.stderr
    passed = json.loads((tmp_path / "ok" / "check.sarif").read_text())
    jsonschema.Draft4Validator(SCHEMA).validate(passed)
    assert passed["runs"][0]["results"] == []

    bad = _check(str(base), str(adapter), "--fail-on", "risk>0.001", "--out", str(tmp_path / "bad"),
                 "--format", "sarif,junit,json")
    assert bad.returncode == 1, bad.stderr
    assert "FAIL" in bad.stderr and "risk>0.001" in bad.stderr
    sarif = json.loads((tmp_path / "bad" / "check.sarif").read_text())
    jsonschema.Draft4Validator(SCHEMA).validate(sarif)
    with pytest.raises(jsonschema.ValidationError):  # the schema does bite
        jsonschema.Draft4Validator(SCHEMA).validate({**sarif, "version": "2.0"})
    scan = ScanResult.load(tmp_path / "bad")
    # one result per matrix whose own risk breaks the threshold (risk is the worst matrix's)
    want = sorted(m.name for m in scan.matrices if matrix_scores(m)["risk"] > 0.001)
    results = sarif["runs"][0]["results"]
    assert want and sorted(r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] for r in results) == want
    assert all(r["ruleId"] == "lorascope/risk" and r["level"] == "error" for r in results)
    assert results[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "adapter_model.safetensors")
    verdict = json.loads((tmp_path / "bad" / "check.json").read_text())
    assert verdict["verdict"] == "fail" and verdict["failed"] == ["risk>0.001"]
    suite = ET.parse(tmp_path / "bad" / "check.junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "1"
    assert judge(scan, parse_fail_on("intruders>1000")).passed  # the same verdict from the stored scan


def test_bad_input_is_exit_2_naming_it(llama_lora, tmp_path):
    base, adapter, _ = llama_lora()
    r = _check(str(base), str(adapter), "--fail-on", "risk>")
    assert r.returncode == 2 and "'risk>' is not a condition" in r.stderr and "Traceback" not in r.stderr
    r = _check(str(base), str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = _check(str(base), str(adapter), "--format", "pdf", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "'pdf'" in r.stderr
    r = _check(str(base), str(adapter), "--format", "sarif")
    assert r.returncode == 2 and "--out" in r.stderr


def test_nothing_scanned_is_an_error_not_a_pass():
    with pytest.raises(InputError, match="no matrix was scanned"):
        judge(ScanResult(settings={"k": 10, "epsilon": 0.5, "tuned": "empty"}, matrices=[]), parse_fail_on("risk>0.6"))
