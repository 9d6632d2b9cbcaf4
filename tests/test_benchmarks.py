"""The speed benchmark (benchmarks/scan_bench.py) and its spectrum families, at tiny shapes on the CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_spectra  # noqa: E402
import scan_bench  # noqa: E402


def test_top_k_records_its_krylov_steps():
    from lorascope.spectral import LowRankDelta, Tuned, left_basis, top_k

    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 200, generator=g) * torch.logspace(0, -2, 200)
    d = LowRankDelta(torch.randn(300, 4, generator=g), torch.randn(4, 200, generator=g) * 0.1, 2.0)
    r = top_k(Tuned(W, d), 5, init=left_basis(W).U)
    assert not r.exact and r.steps >= 1
    small = LowRankDelta(d.B[:40], d.A[:, :40], 2.0)  # 2 (k + oversample) ≥ 40: the exact route at once
    assert top_k(Tuned(W[:40, :40], small), 5).steps == 0


@pytest.mark.parametrize("family", bench_spectra.FAMILIES)
@pytest.mark.parametrize("shape", [(344, 128), (128, 344), (256, 256)])
def test_family_spectra_are_descending_with_entries_of_rms_002(family, shape):
    m, n = shape
    s = bench_spectra.family_spectrum(family, "gate_proj" if m != n else "q_proj", m, n)
    assert s.shape == (min(m, n),) and s.dtype == torch.float64
    assert bool((s[:-1] >= s[1:]).all()) and float(s[-1]) > 0
    assert math.isclose(float(s.norm()) / math.sqrt(m * n), 0.02, rel_tol=1e-9)


def test_smooth_family_is_the_original_spectrum():
    s = bench_spectra.family_spectrum("smooth", "v_proj", 344, 128)
    assert torch.equal(s, bench_spectra.spectrum(128, 100.0, 344, 128))
    assert math.isclose(float(s[0] / s[-1]), 100.0, rel_tol=1e-9)


def test_powerlaw_family_has_a_heavy_tail_with_alpha_between_2_and_4():
    for mtype, (m, n) in {"q_proj": (1024, 1024), "gate_proj": (2752, 1024)}.items():
        ev = bench_spectra.family_spectrum("powerlaw", mtype, m, n).square().numpy()
        fit = bench_spectra.fit_powerlaw(ev)
        assert 2 <= fit["alpha"] <= 4, (mtype, fit)
        assert fit["n_tail"] >= 0.05 * len(ev)


def test_fit_powerlaw_recovers_a_pareto_exponent():
    u = (np.arange(2000) + 0.5) / 2000
    fit = bench_spectra.fit_powerlaw(3.0 * u ** (-1 / (3.0 - 1)))
    assert abs(fit["alpha"] - 3.0) < 0.05


def test_marchenko_pastur_quantiles_have_unit_mean_and_variance_q():
    for q in (1.0, 0.37, 0.1):
        x = bench_spectra.mp_quantiles(q, 5000)
        assert abs(x.mean() - 1) < 1e-3 and abs(x.var() - q) < 1e-2 * max(q, 0.1)


def test_real_profiles_cover_every_llama_module_and_interpolate_from_one():
    doc = bench_spectra.load_profiles()
    for source in bench_spectra.ALIASES["real"]:
        assert set(doc["llama_map"][source]) == set(scan_bench.SPANS)
        for mtype in scan_bench.SPANS:
            r = bench_spectra.real_profile(source, mtype, 4096)
            assert r.shape == (4096,) and r[0] == pytest.approx(1.0) and (np.diff(r) <= 1e-12).all()


def test_expand_families():
    assert bench_spectra.expand("smooth,real,smooth") == ["smooth", "smollm2", "minilm"]
    with pytest.raises(SystemExit):
        bench_spectra.expand("bogus")


def test_project_counts_each_matrix_at_the_mean_of_its_shape():
    cfg = scan_bench.SHAPES["tiny"]
    per = {"model.layers.0.self_attn.q_proj.weight": 1.0, "model.layers.0.mlp.gate_proj.weight": 3.0,
           "model.layers.0.mlp.down_proj.weight": 5.0}  # gate and down: one shape, transposed
    names = scan_bench.matrix_names(cfg, 2)
    out = scan_bench.project(cfg, per, names)
    assert out["seconds"] == pytest.approx(2 * (4 * 1.0 + 3 * 4.0))
    with pytest.raises(SystemExit):
        scan_bench.project(cfg, {"model.layers.0.self_attn.q_proj.weight": 1.0}, names)


def test_in_process_smoke_run_writes_every_row_and_the_target_table(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    report = scan_bench.main(["--device", "cpu", "--shape", "tiny", "--in-process", "--rows",
                              "lora,fill,cached,full,many,families", "--adapters", "2", "--families", "powerlaw",
                              "--layers", "3", "--workdir", str(tmp_path / "w"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["rows"]) == {"lora", "fill", "cached", "full", "many"}
    assert saved["rows"]["many"]["first_adapter_max_cos_diff_vs_lora_row"] == 0
    fam = saved["families"]["powerlaw"]
    assert set(fam["ratios"]) == {"lora", "cached", "full", "fill"}
    assert sum(fam["krylov_steps"]["lora"]["histogram"].values()) == 2 * 7
    assert max(fam["max_err_vs_fp64"].values()) < 1e-3
    whats = [t["what"] for t in saved["table"]]
    assert any(w.startswith("lora vs two-SVD baseline") for w in whats)
    # a rate exists only when the batch took longer than the first scan: on a tiny model a loaded machine
    # can invert the two, and the benchmark then says "n/a" rather than print a negative rate
    rate = saved["rows"]["many"]["adapters_per_minute"]
    assert any("adapters per minute" in w for w in whats) == (rate is not None)
    assert rate is None or rate > 0
    assert report["table"] == saved["table"]


@pytest.mark.slow
def test_cli_smoke_run_every_row(tmp_path):
    out = tmp_path / "bench.json"
    scan_bench.main(["--device", "cpu", "--shape", "tiny", "--adapters", "2", "--families", "smooth,powerlaw",
                     "--workdir", str(tmp_path / "w"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["rows"]) == {"lora", "fill", "cached", "full", "many", "mitigate"}
    assert all(r["command"].startswith("lorascope ") for r in saved["rows"].values())
    assert saved["rows"]["mitigate"]["peft"]["n_matrices"] == 14
    assert set(saved["families"]) == {"smooth", "powerlaw"}
