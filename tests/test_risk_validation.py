"""scripts/risk_validation.py on a small store trained on the CPU (tiny random BERT), and its pooling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("risk_validation", ROOT / "scripts" / "risk_validation.py")
rv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rv)


@pytest.fixture(scope="module")
def store(tmp_path_factory, one_thread):
    from lorascope.experiments import run_experiment
    from lorascope.experiments.config import parse_config
    from lorascope.experiments.tiny import write_tiny_assets

    root = tmp_path_factory.mktemp("riskstore")
    write_tiny_assets(root)
    raw = {"kind": "sweeps", "name": "tiny_lr", "model": "tiny/bert", "tasks": ["tiny/sentiment"], "seeds": [0, 1],
           "train": {"epochs": 1, "max_length": 12, "max_examples": 32, "device": "cpu"}, "scan": {"k": 4},
           "forgetting": {"data": "tiny/corpus.txt", "max_examples": 4},
           "grid": {"methods": [{"method": "lora", "rank": 4}], "lrs": [1e-3, 5e-3, 3e-2]}}
    run_experiment(parse_config(raw, root), root / "store", workers=1, threads=1)
    return root / "store"


def test_validation_of_a_store_matches_scipy_on_the_records(store, tmp_path):
    assert rv.main([str(store), "--out", str(tmp_path / "out"), "--seed", "3"]) == 0
    v = json.loads((tmp_path / "out" / "risk_validation.json").read_text())
    assert "| intruders |" in (tmp_path / "out" / "risk_validation.md").read_text()
    assert v["n_runs"] == 6 and v["n_held_out"] == 2 and v["paper_rho"] == 0.971
    res = v["measures"]["pseudo_loss_change"]
    # oracle: the store's own intruder counts (scan at ε = 0.5, k = 4) against its measured % change
    recs = [json.loads(line) for line in (store / "records.jsonl").read_text().splitlines()]
    x = [r["metrics"]["n_intruders"] for r in recs]
    y = [r["metrics"]["pseudo-loss_change_pct"] for r in recs]
    want = spearmanr(x, y).statistic if len(set(x)) > 1 else None
    assert res["within"]["tiny_lr"]["intruders"] == (pytest.approx(want) if want is not None else None)
    assert res["pooled"]["intruders"] == res["within"]["tiny_lr"]["intruders"]  # one model: ranks keep ρ
    assert res["chosen"] in rv.SCORES


def _row(model: str, score: float, forgetting: float) -> dict:
    return {"study": model, "model": model, "key": f"{model}{score}", "unit": {},
            "scores": {s: score for s in rv.SCORES}, "forgetting": {"drift": forgetting}}


def test_pooling_normalises_per_model_and_holds_out_a_seeded_third():
    # two models: within each, forgetting rises with the score; model b's scores are 100× larger while
    # its forgetting is lower, so raw pooling mixes them up and per-model ranks do not
    rows = [_row("a", s, f) for s, f in [(1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8)]]
    rows += [_row("b", s, f) for s, f in [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)]]
    raw = rv.rho(*rv.pairs(rows, "risk", "drift"))
    v = rv.validate(rows, seed=0)
    assert raw < 0.6 and v["measures"]["drift"]["pooled"]["risk"] == pytest.approx(1.0)
    assert v["measures"]["drift"]["within"]["b"]["risk"] == pytest.approx(1.0)
    assert v["n_held_out"] == 2 and v["measures"]["drift"]["held_out_rho"] is None  # 2 points: undefined
    assert rv.validate(rows, seed=0) == v and rv.rho([1, 1, 1], [1, 2, 3]) is None


def test_weightwatcher_alpha_of_a_lora_run(store):
    """ww_alpha: WeightWatcher's own α over the block matrices of PEFT's merge of the run's adapter."""
    ww = pytest.importorskip("weightwatcher")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = sorted((store / "units").glob("*/run"))[0]
    got = rv.ww_alphas(run, min_evals=2)
    record = json.loads((run / "run.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(record["model"], num_labels=2)
    tuned = PeftModel.from_pretrained(base, run / "adapter").merge_and_unload()
    d = ww.WeightWatcher(model=tuned).analyze(min_evals=2)
    want = d[d["longname"].str.contains(r"\.\d+\.")]["alpha"].mean()
    assert got["ww_alpha"] == pytest.approx(want, rel=1e-6)
    # α of ΔW: WeightWatcher's power-law fit may fail on a tiny random ΔW; then it is None, never a guess
    assert got["ww_alpha_delta"] is None or got["ww_alpha_delta"] > 0
