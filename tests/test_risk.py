"""The data-free risk scores (lorascope.risk) and ΔW's kurtosis, against hand computations and scipy."""

from __future__ import annotations

import json
import math
import re
from html import escape as html_escape

import pytest
import torch
from scipy import stats

from lorascope.risk import BASELINES, CANDIDATES, matrix_scores, model_scores
from lorascope.scanning.analyze import analyze_matrix
from lorascope.schema import MatrixRecord, ScanResult
from lorascope.spectral import LowRankDelta, delta_kurtosis


def test_kurtosis_of_lora_and_dense_equals_scipy():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(70, 3, generator=g), torch.randn(3, 50, generator=g)
    low = LowRankDelta(B, A, 0.5)
    want = stats.kurtosis((0.5 * B.double() @ A.double()).flatten().numpy(), fisher=True, bias=True)  # float64
    assert delta_kurtosis(low, block=16) == pytest.approx(want, rel=1e-10)  # blocks of rows, not the whole
    dense = torch.randn(40, 30, generator=g) ** 3  # heavy tails
    assert delta_kurtosis(dense, block=7) == pytest.approx(stats.kurtosis(dense.double().flatten().numpy()),
                                                           rel=1e-10)
    assert delta_kurtosis(torch.zeros(5, 4)) is None  # undefined, not 0 or NaN


def _record(**changes) -> MatrixRecord:
    fields = dict(
        name="l.0.q.weight", kind="linear", side="left", shape=[8, 8], layer=0, module_type="q",
        singular_values=[4.0, 2.0, 1.0], max_cos=[0.2, 0.9, 1.0], best_match=[5, 1, 2], n_intruders=1,
        similarity=[], base_singular_values=[3.0, 2.0, 0.5], delta_singular_values=[1.5, 0.5],
        delta_effective_rank=1.7, delta_stable_rank=1.25, delta_rel_norm=0.1, null_max_cos=0.2,
        null_max_cos_q99=0.3, exact=True, delta_kurtosis=2.5,
    )
    return MatrixRecord(**{**fields, **changes})


def test_matrix_scores_by_hand():
    s = matrix_scores(_record())
    assert s["intruders"] == 1
    assert s["strength"] == pytest.approx(1 * 0.8 + 0.5 * 0.1 + 0.25 * 0.0)
    # ν = clip((1 − c) / (1 − 0.2), 0, 1) = 1, 0.125, 0; weights σ = 4, 2, 1
    assert s["risk"] == pytest.approx((4 * 1 + 2 * 0.125) / 7)
    assert s["sigma_ratio"] == pytest.approx(1.5 / 0.5)  # σ_1(ΔW) / σ_3(W_0), k' = 3
    assert s["energy"] == pytest.approx(1 / 1.25)
    assert (s["rel_norm"], s["effective_rank"], s["kurtosis"]) == (0.1, 1.7, 2.5)
    assert matrix_scores(_record(), k=2)["sigma_ratio"] == pytest.approx(1.5 / 2.0)


def test_scores_that_cannot_be_computed_are_none_not_guesses():
    s = matrix_scores(_record(delta_kurtosis=None, delta_stable_rank=0.0, delta_singular_values=[],
                              base_singular_values=[3.0, 2.0, 0.0], delta_rel_norm=math.inf))
    assert s["kurtosis"] is s["energy"] is s["sigma_ratio"] is s["rel_norm"] is None
    m = model_scores([_record(delta_kurtosis=None)])
    assert m["scores"]["kurtosis"] is None and m["scores"]["risk"] is not None


def test_model_aggregates():
    a, b = _record(), _record(name="l.1.q.weight", max_cos=[0.95, 0.9, 1.0], delta_kurtosis=0.5)
    m = model_scores([a, b])["scores"]
    ra, rb = matrix_scores(a)["risk"], matrix_scores(b)["risk"]
    assert m["risk"] == pytest.approx(max(ra, rb)) and m["risk_mean"] == pytest.approx((ra + rb) / 2)
    assert m["intruders"] == 1 and m["kurtosis"] == pytest.approx(1.5)
    assert m["strength"] == pytest.approx(matrix_scores(a)["strength"] + matrix_scores(b)["strength"])
    assert set(m) == set(CANDIDATES + BASELINES)
    assert [w["name"] for w in model_scores([a, b])["worst"]] == ["l.0.q.weight", "l.1.q.weight"]


def test_intruding_update_scores_high_and_aligned_update_low(one_thread):
    """A strong rank-1 ΔW outside W_0's column space makes an intruder that carries the top of the
    spectrum; the same energy along W_0's own top direction keeps the base's directions (scores ~ 0)."""
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(64, 48, generator=g, dtype=torch.float64) / 8
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    u = torch.randn(64, 1, generator=g, dtype=torch.float64)
    u -= U @ (U.T @ u)  # in the orthogonal complement of W_0's column space
    intruding = LowRankDelta(u / u.norm() * 3 * S[0], Vh[:1] * 1.0, 1.0)
    aligned = LowRankDelta(U[:, :1] * 3 * S[0], Vh[:1] * 1.0, 1.0)
    rec = analyze_matrix("b.0.q.weight", "linear", W0, intruding, 10, 0.5)[0]
    bad, good = matrix_scores(rec), matrix_scores(analyze_matrix("b.0.q.weight", "linear", W0, aligned, 10, 0.5)[0])
    assert bad["intruders"] == 1 and good["intruders"] == 0
    # the top direction is new (ν = 1), the other nine are W_0's own (ν ≈ 0): risk = σ_1 / Σσ
    assert bad["risk"] == pytest.approx(rec.singular_values[0] / sum(rec.singular_values), abs=0.01)
    assert good["risk"] < 0.01
    assert bad["strength"] == pytest.approx(1 - rec.max_cos[0], abs=0.02) and good["strength"] < 0.01


def test_scan_json_carries_the_scores_and_old_files_still_read(tmp_path):
    res = ScanResult(settings={"k": 3, "epsilon": 0.5}, matrices=[_record()])
    res.save(tmp_path)
    d = json.loads((tmp_path / "scan.json").read_text())
    assert d["schema_version"] == "1.1"
    risk = d["summary"]["sides"]["left"]["risk"]
    assert risk["k"] == 3 and risk["scores"]["risk"] == pytest.approx(matrix_scores(_record())["risk"])
    d["schema_version"] = "1.0"  # a file written before the kurtosis field existed
    for m in d["matrices"]:
        del m["delta_kurtosis"]
    old = ScanResult.from_dict(d)
    assert old.matrices[0].delta_kurtosis is None
    assert old.summary()["sides"]["left"]["risk"]["scores"]["kurtosis"] is None


def test_scan_summary_and_report_headline_show_the_risk(tmp_path, capsys):
    from lorascope.cli import print_scan_summary
    from lorascope.report import build_report

    res = ScanResult(settings={"k": 3, "epsilon": 0.5}, matrices=[_record()], timing={"n_matrices": 1})
    res.save(tmp_path / "scan")
    want = matrix_scores(_record())["risk"]
    print_scan_summary(ScanResult.load(tmp_path / "scan"))
    assert f"data-free risk {want:.3f}" in " ".join(capsys.readouterr().err.split())
    html = build_report(tmp_path / "scan", tmp_path / "r.html").read_text()
    head = re.search(r'<section class="headline".*?</section>', html, re.S).group(0)
    from lorascope.risk import VALIDATION

    assert f"Data-free risk {want:.2f}" in head and html_escape(VALIDATION, quote=False) in head
