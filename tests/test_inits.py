"""MiLoRA's init (minor singular components, residual base) and the ``mitigations`` study kind.

Oracles: a float64 SVD of the base weight (MiLoRA's factors are its r smallest triplets and the model is
unchanged at init); PEFT's ``reduce_intruder_dimension`` is our ``--which all --compress r`` (same
distance from the exact edit), and a rank-r truncation is as far from the exact edit as Eckart–Young says.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lorascope.errors import InputError
from lorascope.experiments import parse_config, plan, run_experiment
from lorascope.experiments.tiny import write_tiny_assets
from lorascope.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_milora_init_takes_minor_components_and_keeps_the_model():
    from peft.tuners.lora import Linear as LoraLinear

    from lorascope.train.lora import apply_lora

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=48)).eval()
    W0 = {f"base_model.model.{n}": m.weight.detach().double().clone() for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(0, 50, (2, 7))
    before = model(input_ids=ids).logits
    cfg = TrainConfig(model="m", task="t", rank=2, alpha=4.0, lora_options={"init_lora_weights": "milora"})
    peft_model = apply_lora(model, cfg, "classify")
    torch.testing.assert_close(peft_model(input_ids=ids).logits, before, atol=1e-5, rtol=0)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 12  # q, k, v, attention output, intermediate, output in 2 blocks
    for name, layer in layers.items():
        W = W0[name]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        B, A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        update = layer.scaling["default"] * B @ A
        torch.testing.assert_close(update, (U[:, -2:] * S[-2:]) @ Vh[-2:], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.get_base_layer().weight.double() + update, W, atol=1e-5, rtol=0)
    assert peft_model.peft_config["default"].init_lora_weights == "milora"


def test_milora_refuses_dora_like_the_other_residual_inits():
    from lorascope.errors import InputError

    with pytest.raises(InputError, match="cannot be combined with DoRA"):
        TrainConfig(model="m", task="t", lora_options={"init_lora_weights": "milora", "use_dora": True}).resolved()


@pytest.mark.slow
def test_mitigations_study_peft_is_compress_r(tmp_path):
    write_tiny_assets(tmp_path)
    raw = {"kind": "mitigations", "name": "t", "model": "tiny/bert", "tasks": ["tiny/sentiment"],
           "train": {"epochs": 2, "max_length": 16, "lr": 2e-2, "device": "cpu"}, "scan": {"k": 4},
           "forgetting": {"data": "tiny/corpus.txt", "max_examples": 6},
           "grid": {"methods": [{"method": "lora", "rank": 2}], "lams": [0.5]}}
    cfg = parse_config(raw, tmp_path)
    assert [u.labels.get("edit") for u in plan(cfg)] == [None, "exact", "compress", "peft"]
    run_experiment(cfg, tmp_path / "store", log=lambda line: None)
    records = [json.loads(x) for x in (tmp_path / "store" / "records.jsonl").read_text().splitlines()]
    tuned = next(r["metrics"] for r in records if r["action"] == "train")
    edit = {r["unit"]["edit"]: r["metrics"] for r in records if r["action"] == "edit"}
    assert tuned["n_intruders"] > 0 and edit["exact"]["n_intruders_before"] == tuned["n_intruders"]
    assert "rel_distance" not in edit["exact"]
    # PEFT's edit is ours re-truncated to rank r: the same distance from the exact edit, and > 0
    assert edit["peft"]["rel_distance"] == pytest.approx(edit["compress"]["rel_distance"], rel=1e-3)
    assert edit["compress"]["rel_distance"] > 1e-3
    # Eckart–Young per matrix: the distance of the compress edit is its discarded tail (mitigation.json)
    unit = next(r for r in records if r["unit"].get("edit") == "compress")
    mit = json.loads((tmp_path / "store" / unit["paths"]["run"] / "adapter" / "mitigation.json").read_text())
    tails = [m["compress_rel_error"] for m in mit["matrices"] if m.get("compress_rel_error") is not None]
    assert edit["compress"]["max_rel_distance"] == pytest.approx(max(tails), rel=1e-3)
    assert math.isfinite(edit["peft"]["task_score_peft_head"])


def _tiny_bert_and_batches():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(  # no dropout: LoRA-GA takes its gradient in train mode
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)).eval()
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0  # a padded row: CorDA must not see its padding
    batches = [{"input_ids": torch.randint(0, 50, (4, 9)), "attention_mask": mask, "labels": torch.randint(0, 2, (4,))}
               for _ in range(3)]
    return model, batches


def test_lora_ga_init_spans_the_full_fine_tune_gradient():
    """LoRA-GA (PEFT's ArB2r): A's rows span the top-r right singular vectors of the full fine-tune's
    gradient G of W (computed here by autograd, independently of PEFT) and B's columns the left ones r..2r;
    the base becomes W − s B₀A₀, so the model is unchanged at init."""
    from peft.tuners.lora import Linear as LoraLinear

    from lorascope.train.lora import apply_lora

    model, batches = _tiny_bert_and_batches()
    ref = BertForSequenceClassification(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ref.zero_grad()
    for b in batches:
        ref(**b).loss.backward()
    grads = {f"base_model.model.{n}": m.weight.grad.double().clone() for n, m in ref.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layer." in n}
    before = model(input_ids=batches[0]["input_ids"]).logits
    cfg = TrainConfig(model="m", task="t", rank=2, alpha=4.0, lora_options={"init_lora_weights": "lora_ga"})
    with pytest.raises(InputError, match="calibration"):
        apply_lora(BertForSequenceClassification(model.config), cfg, "classify")
    peft_model = apply_lora(model, cfg, "classify", calibration=batches)
    torch.testing.assert_close(peft_model(input_ids=batches[0]["input_ids"]).logits, before, atol=1e-5, rtol=0)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}
    assert set(layers) == set(grads)
    for name, layer in layers.items():
        U, _, Vh = torch.linalg.svd(grads[name], full_matrices=False)
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        rows = torch.linalg.qr(A.T).Q  # A's row space against V_r: all principal cosines 1
        cols = torch.linalg.qr(B).Q
        assert torch.linalg.svdvals(Vh[:2] @ rows).min() > 1 - 1e-4, name
        assert torch.linalg.svdvals(U[:, 2:4].T @ cols).min() > 1 - 1e-4, name


def test_corda_init_is_the_covariance_weighted_truncation():
    """CorDA (IPM, PEFT's default): with C a layer's input covariance over the calibration sequences
    (hooked here on the unpadded tokens; each sequence's X scaled by |max X|, XᵀX averaged, plus 1 % of
    its mean diagonal, as PEFT defines it), s B₀A₀ C is the best rank-r approximation of W C
    (Eckart–Young), and the base becomes W − s B₀A₀, so the model is unchanged at init."""
    from peft.tuners.lora import Linear as LoraLinear

    from lorascope.train.lora import apply_lora

    model, batches = _tiny_bert_and_batches()
    cov: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layer." in n:
            def hook(mod, inputs, _out, key=f"base_model.model.{n}"):
                x = inputs[0].detach().double()[0]
                x = x / x.max().abs()  # peft scales by the abs of the largest entry, not the largest abs
                cov[key] = cov.get(key, 0) + x.T @ x / 12  # 3 batches of 4 sequences
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            for ids, keep in zip(b["input_ids"], b["attention_mask"], strict=True):
                model(input_ids=ids[keep.bool()][None])
    for h in hooks:
        h.remove()
    cov = {k: c + 0.01 * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype) for k, c in cov.items()}
    W0 = {f"base_model.model.{n}": m.weight.detach().double().clone() for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear) and ".layer." in n}
    before = model(input_ids=batches[0]["input_ids"]).logits
    cfg = TrainConfig(model="m", task="t", rank=2, alpha=4.0, lora_options={"init_lora_weights": "corda"})
    peft_model = apply_lora(model, cfg, "classify", calibration=batches)
    torch.testing.assert_close(peft_model(input_ids=batches[0]["input_ids"]).logits, before, atol=1e-5, rtol=0)
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}
    assert set(layers) == set(W0)
    for name, layer in layers.items():
        update = layer.scaling["default"] * (layer.lora_B["default"].weight.double()
                                             @ layer.lora_A["default"].weight.double())
        U, S, Vh = torch.linalg.svd(W0[name] @ cov[name], full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        assert ((update @ cov[name] - best).norm() / best.norm()).item() < 1e-3, name
        torch.testing.assert_close(layer.get_base_layer().weight.double() + update, W0[name], atol=1e-5, rtol=0)
