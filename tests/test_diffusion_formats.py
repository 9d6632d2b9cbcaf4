"""Diffusion-model inputs against a float64 oracle: a diffusers UNet full fine-tune and a PEFT adapter folder
on the UNet, against the bare UNet and a pipeline folder as base.

Each oracle builds W_t = W_0 + ΔW without lorascope (the fine-tuned weights, PEFT's merge), then
torch.linalg.svd in float64 and Alg. 1."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lorascope import scan

pytestmark = pytest.mark.usefixtures("one_thread")

K, EPS = 4, 0.5
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut", "time_emb_proj"]


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET)


def tiny_text_encoder(seed=1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16, projection_dim=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def oracle(W0: torch.Tensor, Wt: torch.Tensor, k=K, eps=EPS):
    """Alg. 1 in float64 from full SVDs: max |cos| of W_t's top-k left singular vectors with all of W_0's."""
    W0, Wt = (w.detach().double().reshape(w.shape[0], -1) for w in (W0, Wt))
    U0 = torch.linalg.svd(W0, full_matrices=False).U
    Ut = torch.linalg.svd(Wt, full_matrices=False).U[:, :k]
    cos = (U0.T @ Ut).abs().max(0).values
    return cos, int((cos < eps).sum())


def check(result, W0: dict, Wt: dict, prefix: str = "") -> float:
    """Every record (of the matrices named ``prefix…``) equals the oracle, and every changed matrix is
    scanned. Returns max |Δ max-cos|."""
    records = [r for r in result.matrices if r.name.startswith(prefix)]
    changed = {n for n, w in Wt.items() if w.dim() in (2, 4) and n.endswith(".weight") and not torch.equal(w, W0[n])}
    scanned = {r.name[len(prefix):] for r in records}
    assert changed and changed <= scanned, sorted(changed - scanned)[:5]
    worst = 0.0
    for rec in records:
        name = rec.name[len(prefix):]
        cos, n = oracle(W0[name], Wt[name])
        worst = max(worst, float((torch.tensor(rec.max_cos, dtype=torch.float64) - cos).abs().max()))
        assert rec.n_intruders == n, name
    assert worst < 1e-4
    return worst


@pytest.fixture(scope="module")
def unet_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    unet = tiny_unet()
    unet.save_pretrained(root / "unet")
    return root / "unet", state(unet)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers pipeline folder: unet/, text_encoder/, vae/, and a scheduler/ without weights."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("pipe") / "sd"
    unet, te = tiny_unet(), tiny_text_encoder()
    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    for name, m in (("unet", unet), ("text_encoder", te), ("vae", vae)):
        m.save_pretrained(root / name)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, state(unet), state(te)


# -- full fine-tunes and PEFT folders --------------------------------------------------------------
def test_unet_full_finetune_scans_every_matrix(unet_base, tmp_path):
    path, W0 = unet_base
    unet = tiny_unet()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if p.dim() in (2, 4) and "up_blocks.0" not in n:  # up_blocks.0 stays as it was
                p.add_(0.05 * torch.randn(p.shape, generator=g) * p.std())
    unet.save_pretrained(tmp_path / "ft")
    res = scan(str(path), str(tmp_path / "ft"), k=K, dtype="float64")
    assert len(res.matrices) == 83 and not res.unpaired.get("base_only")
    kinds = {r.name: r.kind for r in res.matrices}
    assert kinds["time_embedding.linear_1.weight"] == "linear" and kinds["conv_in.weight"] == "conv2d"
    check(res, W0, state(unet))


@pytest.mark.parametrize("saved", ["save_pretrained", "state_dict"])
def test_peft_adapter_folder_on_unet(unet_base, pipeline, tmp_path, saved):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model

    path, W0 = unet_base
    unet = tiny_unet()
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=TARGETS)
    if saved == "save_pretrained":
        model = get_peft_model(unet, cfg)
        model.save_pretrained(tmp_path / "adapter")
        Wt = state(model.merge_and_unload())
    else:
        model = inject_adapter_in_model(cfg, unet)
        (tmp_path / "adapter").mkdir()
        save_file(get_peft_model_state_dict(model), tmp_path / "adapter" / "adapter_model.safetensors")
        cfg.save_pretrained(tmp_path / "adapter")
        for m in model.modules():
            if hasattr(m, "merge") and hasattr(m, "lora_A"):
                m.merge()
        Wt = {k.replace(".base_layer", ""): v for k, v in state(model).items() if "lora_" not in k}
    res = scan(str(path), str(tmp_path / "adapter"), k=K, dtype="float64")
    assert res.settings["tuned_kind"] == "lora" and not res.unpaired
    check(res, W0, Wt)
    if saved == "state_dict":  # the same adapter against a pipeline folder pairs with its unet/
        pipe = scan(str(pipeline[0]), str(tmp_path / "adapter"), k=K, dtype="float64")
        assert len(pipe.matrices) == len(res.matrices) and all(r.name.startswith("unet.") for r in pipe.matrices)
        check(pipe, W0, Wt, prefix="unet.")
