"""Results in Python and Jupyter: pandas frames, Parquet with native lists, HTML reprs, TensorBoard."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest
import torch

from lorascope import mitigate, scan
from lorascope.schema import MatrixRecord, ScanResult

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def scanned(llama_lora):
    base, adapter, _ = llama_lora()
    return base, adapter, scan(str(base), str(adapter), side="both", k=4, epsilon=0.9, device="cpu")


def test_scan_to_pandas_one_row_per_matrix_and_side(scanned):
    _, _, result = scanned
    df = result.to_pandas()
    assert len(df) == len(result.matrices) == 2 * 6  # q, v, down of 2 layers, left and right
    assert sorted(set(df["side"])) == ["left", "right"]
    assert list(df.columns) == [f.name for f in fields(MatrixRecord)] + ["min_max_cos"]
    for row, record in zip(df.to_dict("records"), result.matrices, strict=True):
        expected = asdict(record)
        for key, value in expected.items():
            assert row[key] == value, key  # lists stay lists: similarity a list of lists
        assert row["min_max_cos"] == min(record.max_cos)
    assert isinstance(df["similarity"][0], list) and isinstance(df["similarity"][0][0], list)


def test_parquet_has_native_list_columns_and_similarity(scanned, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, _, result = scanned
    result.save(tmp_path, ("json", "parquet"))
    table = pq.read_table(tmp_path / "scan.parquet")
    types = {f.name: f.type for f in table.schema}
    for name in ("shape", "singular_values", "max_cos", "best_match", "base_singular_values",
                 "delta_singular_values"):
        assert pa.types.is_list(types[name]), (name, types[name])
    assert pa.types.is_list(types["similarity"]) and pa.types.is_list(types["similarity"].value_type)
    assert pa.types.is_floating(types["max_cos"].value_type) and pa.types.is_integer(types["best_match"].value_type)
    rows = table.to_pylist()
    assert [r["similarity"] for r in rows] == [m.similarity for m in result.matrices]
    assert [r["max_cos"] for r in rows] == [m.max_cos for m in result.matrices]
    assert ScanResult.load(tmp_path).to_pandas().equals(result.to_pandas())  # scan.json still the source


def test_scan_repr_html(scanned):
    _, _, result = scanned
    html = result._repr_html_()
    summary = result.summary()
    for side, s in summary["sides"].items():
        assert f"{side} singular vectors: <b>{s['n_intruders']} intruder dimensions</b>" in html
        assert f"in {s['matrices_with_intruders']} of {s['n_matrices']} matrices" in html
        for w in s["worst"]:
            assert f"<td>{w['name']}</td>" in html
    assert "ε=0.9, k=4" in html and html.count("<table>") == len(summary["sides"])


def test_mitigation_repr_html_and_pandas(scanned, tmp_path):
    base, adapter, _ = scanned
    result = mitigate(str(base), str(adapter), tmp_path / "m", lam=0.5, which="all", epsilon=0.9, k=4,
                      device="cpu")
    s = result.summary()
    assert s["n_directions"] > 0
    html = result._repr_html_()
    assert f"<b>{s['n_directions']} direction(s) scaled</b> in {s['n_changed']} of {s['n_matrices']}" in html
    assert "λ=0.5" in html and "which=all" in html
    changed = [m for m in result.matrices if m.directions]
    assert all(f"<td>{m.name}</td>" in html for m in changed[:10])
    df = result.to_pandas()
    assert len(df) == s["n_directions"]
    assert df["sigma_after"].tolist() == pytest.approx((0.5 * df["sigma_before"]).tolist())
    assert set(df["name"]) == {m.name for m in changed}


def test_store_to_pandas(tmp_path):
    from lorascope.experiments import Store

    records = [
        {"key": "a", "unit": {"method": "lora", "rank": 4}, "metrics": {"accuracy": 0.5, "n_intruders": 3}},
        {"key": "b", "unit": {"method": "full"}, "metrics": {"accuracy": 0.7, "n_intruders": 0}},
        {"key": "a", "unit": {"method": "lora", "rank": 4}, "metrics": {"accuracy": 0.6, "n_intruders": 2}},
    ]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    df = Store(tmp_path).to_pandas()
    assert list(df["key"]) == ["a", "b"]  # the last record of a key wins
    assert df.loc[df["key"] == "a", "metrics.accuracy"].item() == 0.6
    assert df.loc[df["key"] == "a", "unit.rank"].item() == 4 and df["unit.method"].tolist() == ["lora", "full"]


# ------------------------------------------------------------------------------------------ TensorBoard


def _tracked(llama_lora, tmp_path, tensorboard):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lorascope.experiments import IntruderTracker

    base, adapter, _ = llama_lora()
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    tracker = IntruderTracker(str(base), every=1, k=4, epsilon=0.9, device="cpu", tensorboard=tensorboard)
    for step in range(3):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.5 * torch.randn_like(p))
        tracker.on_step(model, step)
    tracker.on_fit_end(model, 2)
    return tracker


def test_tracker_writes_tensorboard_scalars(llama_lora, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = _tracked(llama_lora, tmp_path, tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    total = [(e.step, e.value) for e in events.Scalars("intruders/total")]
    assert total == [(step, s["sides"]["left"]["n_intruders"]) for step, s in tracker.history]
    assert len(total) == 3 and "delta/mean_effective_rank" in events.Tags()["scalars"]


def test_tracker_says_when_tensorboard_is_missing(llama_lora, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    tracker = _tracked(llama_lora, tmp_path, tmp_path / "tb")
    err = capsys.readouterr().err
    assert "TensorBoard is not installed" in err and str(tmp_path / "tb") in err
    assert len(tracker.history) == 3 and not (tmp_path / "tb").exists()
