"""Diffusion-model inputs against a float64 oracle: a diffusers UNet full fine-tune, a PEFT adapter folder on
the UNet, diffusers single-file LoRAs (PEFT keys, old lora.down/up keys, Flux with .alpha), kohya and
LyCORIS files (LoHa, LoKr, Tucker LoCon, full diff), a pipeline folder as base, and what is refused.

Each oracle builds W_t = W_0 + ΔW without lorascope: diffusers' own loader + fuse_lora, PEFT's
merge_and_unload, or lycoris' own module weights; then torch.linalg.svd in float64 and Alg. 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorascope import scan
from lorascope.errors import InputError, MismatchError

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
    print(f"[{prefix or 'base'}] {len(records)} matrices, max |Δ max-cos| = {worst:.1e}")  # shown with pytest -s
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


# -- diffusers single-file LoRAs --------------------------------------------------------------------
def _lora_layers(model, seed, alpha=4, targets=TARGETS):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules=targets)
    inject_adapter_in_model(cfg, model)
    return get_peft_model_state_dict(model), cfg.to_dict()


def _diffusers_merge(file, W0_unet, W0_te=None):
    """W_t as diffusers' own SD loader reads the file: lora_state_dict + load_lora_into_unet/_text_encoder,
    then fuse_lora (UNet) and PEFT's merge (text encoder)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD
    from peft.tuners.tuners_utils import BaseTunerLayer

    sd, alphas, meta = SD.lora_state_dict(str(file), return_lora_metadata=True)
    unet = tiny_unet()
    unet.load_state_dict(W0_unet)
    SD.load_lora_into_unet(sd, alphas, unet, metadata=meta)
    unet.fuse_lora()
    unet.unload_lora()
    if W0_te is None:
        return state(unet), None
    te = tiny_text_encoder()
    te.load_state_dict(W0_te)
    SD.load_lora_into_text_encoder(sd, alphas, te, prefix="text_encoder", metadata=meta)
    for m in te.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    te_state = {k.replace(".base_layer", ""): v for k, v in state(te).items() if "lora_" not in k}
    return state(unet), te_state


@pytest.mark.parametrize("metadata", [False, True], ids=["no-metadata", "lora_adapter_metadata"])
def test_diffusers_lora_file_on_unet_and_pipeline(unet_base, pipeline, tmp_path, metadata):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD

    path, W0 = unet_base
    unet_layers, unet_cfg = _lora_layers(tiny_unet(), seed=4, alpha=6)
    te_layers, te_cfg = _lora_layers(tiny_text_encoder(), seed=5, alpha=2, targets=["q_proj", "v_proj", "fc1"])
    extra = dict(unet_lora_adapter_metadata=unet_cfg, text_encoder_lora_adapter_metadata=te_cfg) if metadata else {}
    SD.save_lora_weights(tmp_path / "lora", unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers, **extra)
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    pipe, W0_unet, W0_te = pipeline
    Wt_unet, Wt_te = _diffusers_merge(file, W0_unet, W0_te)

    res = scan(str(path), str(file), k=K, dtype="float64")  # bare UNet base: text encoder modules unpaired
    assert res.settings["tuned_kind"] == "lora"
    te_modules = {k.rsplit(".lora_", 1)[0] for k in load_file(file) if k.startswith("text_encoder.")}
    assert sorted(res.unpaired["not_in_base"]) == sorted(te_modules) and len(te_modules) == 3
    check(res, W0, Wt_unet)
    both = scan(str(pipe), str(tmp_path / "lora"), k=K, dtype="float64")  # the folder, and a pipeline base
    assert not both.unpaired
    assert len(both.matrices) == len(res.matrices) + 3
    check(both, W0_unet, Wt_unet, prefix="unet.")
    check(both, W0_te, Wt_te, prefix="text_encoder.")


def test_old_diffusers_lora_format(unet_base, tmp_path):
    """attn processors (…attn1.processor.to_q_lora.down.weight) and …conv1.lora.down.weight, as diffusers'
    convert_unet_state_dict_to_peft reads them; and lora_A.default.weight keys."""
    path, W0 = unet_base
    layers, _ = _lora_layers(tiny_unet(), seed=6)
    old = {}
    for k, v in layers.items():
        module, role = k.rsplit(".lora_", 1)
        direction = "down" if role.startswith("A") else "up"
        if module.endswith(".to_out.0"):
            old[f"unet.{module[: -len('.to_out.0')]}.processor.to_out_lora.{direction}.weight"] = v
        elif module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            attn, proj = module.rsplit(".", 1)
            old[f"unet.{attn}.processor.{proj}_lora.{direction}.weight"] = v
        else:
            old[f"unet.{module}.lora.{direction}.weight"] = v
    save_file(old, tmp_path / "old.safetensors")
    Wt, _ = _diffusers_merge(tmp_path / "old.safetensors", W0)
    res = scan(str(path), str(tmp_path / "old.safetensors"), k=K, dtype="float64")
    assert len(res.matrices) == len({k.rsplit(".lora_", 1)[0] for k in layers}) and not res.unpaired
    check(res, W0, Wt)
    # the keys of a raw state dict, with the adapter's name: …to_q.lora_A.default.weight
    save_file({f"unet.{k.replace('.weight', '.default.weight')}": v for k, v in layers.items()},
              tmp_path / "named.safetensors")
    check(scan(str(path), str(tmp_path / "named.safetensors"), k=K, dtype="float64"), W0, Wt)


def test_training_script_lora_files(pipeline, tmp_path):
    """What diffusers' train_*_lora.py scripts save: convert_state_dict_to_diffusers(get_peft_model_state_dict(…))
    (UNet attention keys as …to_q.lora.down.weight, CLIP keys as …q_proj.lora_linear_layer.down.weight without
    text_model.); a UNet file that mixes such keys with PEFT ones is refused (diffusers would drop the old ones)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe, W0_unet, W0_te = pipeline
    unet_layers, _ = _lora_layers(tiny_unet(), seed=13, targets=["to_q", "to_k", "to_v", "to_out.0"])
    te_layers, _ = _lora_layers(tiny_text_encoder(), seed=14, targets=["q_proj", "out_proj"])
    ul, tl = convert_state_dict_to_diffusers(unet_layers), convert_state_dict_to_diffusers(te_layers)
    assert all(".lora.down." in k or ".lora.up." in k for k in ul) and all("lora_linear_layer" in k for k in tl)
    SD.save_lora_weights(tmp_path / "script", unet_lora_layers=ul, text_encoder_lora_layers=tl)
    file = tmp_path / "script" / "pytorch_lora_weights.safetensors"
    Wt_unet, Wt_te = _diffusers_merge(file, W0_unet, W0_te)
    res = scan(str(pipe), str(file), k=K, dtype="float64")
    assert len(res.matrices) == len(ul) // 2 + len(tl) // 2 and not res.unpaired
    check(res, W0_unet, Wt_unet, prefix="unet.")
    check(res, W0_te, Wt_te, prefix="text_encoder.")
    mixed, _ = _lora_layers(tiny_unet(), seed=15)  # proj_in, conv1, … keep their PEFT keys
    mixed = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(mixed).items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(InputError, match="mixes PEFT keys .* and old diffusers keys"):
        scan(str(pipe), str(tmp_path / "mixed.safetensors"))


def test_flux_diffusers_lora_with_alpha(tmp_path):
    """transformer.… keys with .alpha tensors: diffusers' Flux loader scales by alpha / r."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin as Flux

    def flux():
        torch.manual_seed(7)
        return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    base = flux()
    base.save_pretrained(tmp_path / "transformer")
    W0 = state(base)
    layers, _ = _lora_layers(flux(), seed=8, targets=["to_q", "to_k", "add_q_proj", "proj_mlp", "ff.net.2"])
    lora = {f"transformer.{k}": v for k, v in layers.items()}
    for i, k in enumerate(sorted(k for k in layers if k.endswith("lora_A.weight"))):
        lora[f"transformer.{k[: -len('.lora_A.weight')]}.alpha"] = torch.tensor(float(1 + i % 3))
    save_file(lora, tmp_path / "flux_lora.safetensors")
    sd, alphas = Flux.lora_state_dict(str(tmp_path / "flux_lora.safetensors"), return_alphas=True)
    model = flux()
    Flux.load_lora_into_transformer(sd, alphas, model)
    model.fuse_lora()
    model.unload_lora()
    res = scan(str(tmp_path / "transformer"), str(tmp_path / "flux_lora.safetensors"), k=K, dtype="float64")
    assert len(res.matrices) == len(alphas)
    check(res, W0, state(model))


def test_unprefixed_lora_of_a_vae(tmp_path):
    """A model's own LoRA (no component prefix) on an AutoencoderKL, whose top-level encoder. / decoder. modules
    are no component names; diffusers' load_lora_adapter(prefix=None) + fuse_lora is the oracle."""
    from diffusers import AutoencoderKL

    def vae():
        torch.manual_seed(2)
        return AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    base = vae()
    base.save_pretrained(tmp_path / "vae")
    layers, _ = _lora_layers(vae(), seed=17, targets=["conv1", "to_q"])
    save_file(layers, tmp_path / "vae_lora.safetensors")
    model = vae()
    model.load_lora_adapter(str(tmp_path / "vae_lora.safetensors"), prefix=None)
    model.fuse_lora()
    model.unload_lora()
    res = scan(str(tmp_path / "vae"), str(tmp_path / "vae_lora.safetensors"), k=K, dtype="float64")
    assert {r.name.split(".")[0] for r in res.matrices} == {"encoder", "decoder"} and not res.unpaired
    check(res, state(base), state(model))


# -- kohya and LyCORIS ------------------------------------------------------------------------------
LYCO_NAMES = ["conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1",
              "down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "up_blocks.1.resnets.0.conv_shortcut", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]


def lycoris_network(algo, dim=4, alpha=2.0, conv_dim=4, conv_alpha=1.0, **kwargs):
    """A LyCORIS kohya network (lycoris.kohya.create_network) on a few UNet modules and the text encoder's
    attention and MLP, with every factor random (LyCORIS starts one factor at zero)."""
    import lycoris.kohya as lk

    lk.PRESET["lorascope-test"] = {
        "enable_conv": True, "unet_target_module": [], "unet_target_name": LYCO_NAMES,
        "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"], "text_encoder_target_name": [],
        "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}
    unet, te = tiny_unet(), tiny_text_encoder()
    net = lk.create_network(1.0, dim, alpha, None, te, unet, algo=algo, preset="lorascope-test", conv_dim=conv_dim,
                            conv_alpha=conv_alpha, **kwargs)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for lora in net.unet_loras + net.text_encoder_loras:
            for n, p in lora.named_parameters():
                if not n.startswith("org_"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net, unet, te


def lycoris_merged(file, W0: dict, component: str = "unet") -> dict:
    """W_t as LyCORIS itself reads the file (lycoris.kohya.create_network_from_weights on a fresh UNet and
    text encoder): W_0 + the update each module's forward pass adds, get_weight · scalar for LoHa / LoKr,
    get_diff_weight for LoCon and full (these scale once)."""
    import lycoris.kohya as lk
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    net, _ = lk.create_network_from_weights(1.0, str(file), None, tiny_text_encoder(), tiny_unet())
    Wt = dict(W0)
    for lora in net.unet_loras if component == "unet" else net.text_encoder_loras:
        name = lora.lora_name.split("_", 2)[2]
        key = next(k for k in W0 if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == name)
        with torch.no_grad():
            if isinstance(lora, (LohaModule, LokrModule)):
                d = lora.get_weight(lora.shape) * lora.scalar
            else:
                d = lora.get_diff_weight(1.0, shape=lora.shape)[0]
        Wt[key] = W0[key] + d.reshape(W0[key].shape)
    return Wt


@pytest.mark.parametrize("algo,kwargs", [
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 4, "dim": 2, "conv_dim": 2}),
    ("lokr", {"factor": 4, "dim": 1, "conv_dim": 1, "decompose_both": True, "use_tucker": True}),
    ("locon", {"use_tucker": True}),
    ("full", {}),
], ids=["loha", "loha-tucker", "lokr", "lokr-both-tucker", "locon-tucker", "full-diff"])
def test_lycoris_file_matches_lycoris_weights(unet_base, pipeline, tmp_path, algo, kwargs):
    path, W0 = unet_base
    net, unet, te = lycoris_network(algo, **kwargs)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, None)
    res = scan(str(path), str(tmp_path / "lyco.safetensors"), k=K, dtype="float64")
    assert res.settings["tuned_kind"] == "lycoris" and len(res.matrices) == len(LYCO_NAMES)
    assert sorted(res.unpaired["not_in_base"]) == sorted(m.lora_name for m in net.text_encoder_loras)
    check(res, W0, lycoris_merged(tmp_path / "lyco.safetensors", W0))
    if algo in ("loha", "lokr"):  # pipeline base: the text encoder's modules pair with text_encoder/
        pipe, W0_unet, W0_te = pipeline
        both = scan(str(pipe), str(tmp_path / "lyco.safetensors"), k=K, dtype="float64")
        assert len(both.matrices) == len(LYCO_NAMES) + len(net.text_encoder_loras) and not both.unpaired
        check(both, W0_te, lycoris_merged(tmp_path / "lyco.safetensors", W0_te, "te"), prefix="text_encoder.")


def test_lycoris_wrapper_file(unet_base, tmp_path):
    """A file of LyCORIS' own wrapper (lycoris.create_lycoris: names lycoris_…), LoKr on a UNet; the oracle is
    lycoris.create_lycoris_from_weights on the file."""
    from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights

    path, W0 = unet_base
    LycorisNetwork.apply_preset({"target_module": [], "target_name": LYCO_NAMES})
    net = create_lycoris(tiny_unet(), 1.0, linear_dim=2, linear_alpha=3.0, conv_dim=2, conv_alpha=1.0, algo="lokr",
                         factor=4)
    net.apply_to()
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for lora in net.loras:
            for p in lora.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    net.save_weights(str(tmp_path / "wrap.safetensors"), torch.float32, None)
    loaded, _ = create_lycoris_from_weights(1.0, str(tmp_path / "wrap.safetensors"), tiny_unet())
    Wt = dict(W0)
    for lora in loaded.loras:
        name = next(k for k in W0 if "lycoris_" + k[: -len(".weight")].replace(".", "_") == lora.lora_name)
        with torch.no_grad():
            Wt[name] = W0[name] + (lora.get_weight(lora.shape) * lora.scalar).reshape(W0[name].shape)
    res = scan(str(path), str(tmp_path / "wrap.safetensors"), k=K, dtype="float64")
    assert len(res.matrices) == len(LYCO_NAMES) and not res.unpaired
    check(res, W0, Wt)


def test_lycoris_forward_scales_once():
    """The oracle's premise: the update LoHa / LoKr modules add in their forward pass is get_weight
    (alpha / r once), not get_diff_weight (lycoris-lora 4.1 applies alpha / r twice there)."""
    for algo in ("loha", "lokr"):
        net, unet, _ = lycoris_network(algo, dim=2, alpha=1.0)
        lora = next(m for m in net.unet_loras if m.lora_name.endswith("time_embedding_linear_1"))
        lin = unet.time_embedding.linear_1
        x = torch.eye(lin.in_features)
        with torch.no_grad():
            added = (lin(x) - torch.nn.functional.linear(x, lora.org_weight, lin.bias)).T
            assert torch.allclose(added, lora.get_weight(lora.shape), atol=1e-5), algo
            assert lora.scale == 0.5 and not torch.allclose(added, lora.get_diff_weight(1.0, lora.shape)[0])


def kohya_merged(file, W0: dict, prefix: str) -> dict:
    """W_t = W_0 + (alpha / r) · up @ down for every plain kohya module of ``file`` named ``prefix…``."""
    sd, Wt = load_file(file), dict(W0)
    for key in (k for k in sd if k.startswith(prefix) and k.endswith(".lora_down.weight")):
        stem = key[: -len(".lora_down.weight")]
        down, up = sd[key].double(), sd[f"{stem}.lora_up.weight"].double()
        r = down.shape[0]
        name = next(k for k in W0 if k[: -len(".weight")].replace(".", "_") == stem[len(prefix):])
        d = float(sd[f"{stem}.alpha"]) / r * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
        Wt[name] = W0[name].double() + d.reshape(W0[name].shape)
    return Wt


def test_kohya_dylora_and_lora_pair_with_pipeline_components(pipeline, tmp_path):
    """Plain kohya keys (DyLoRA as kohya and LyCORIS write it: concatenated lora_down/lora_up + alpha, merged
    at full rank with alpha / r; lycoris' own loader cannot read back its 2-D conv lora_up, so the oracle is the
    formula) against a pipeline folder: lora_unet_ pairs with unet/, lora_te_ with text_encoder/."""
    pipe, W0_unet, W0_te = pipeline
    net, _, _ = lycoris_network("dylora")
    net.save_weights(str(tmp_path / "dylora.safetensors"), torch.float32, None)
    assert set(load_file(tmp_path / "dylora.safetensors")) == {
        f"{m.lora_name}.{s}" for m in net.unet_loras + net.text_encoder_loras
        for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    res = scan(str(pipe), str(tmp_path / "dylora.safetensors"), k=K, dtype="float64")
    assert res.settings["tuned_kind"] == "lora" and not res.unpaired
    assert len(res.matrices) == len(LYCO_NAMES) + 6
    check(res, W0_unet, kohya_merged(tmp_path / "dylora.safetensors", W0_unet, "lora_unet_"), prefix="unet.")
    check(res, W0_te, kohya_merged(tmp_path / "dylora.safetensors", W0_te, "lora_te_"), prefix="text_encoder.")


# -- refusals and bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("algo,kwargs,name", [
    ("glora", {}, "GLoRA"),
    ("boft", {"block_size": 8}, "BOFT"),
    ("diag-oft", {}, "Diag-OFT"),
    ("ia3", {}, "IA3"),
    ("loha", {"dora_wd": True}, "DoRA"),
])
def test_unsupported_lycoris_types_are_refused_by_name(unet_base, tmp_path, algo, kwargs, name):
    net, _, _ = lycoris_network(algo, **kwargs)
    net.save_weights(str(tmp_path / "x.safetensors"), torch.float32, None)
    with pytest.raises(InputError, match=rf"LyCORIS {name}.*\('lora_.*'\) is not supported because"):
        scan(str(unet_base[0]), str(tmp_path / "x.safetensors"))


def test_bad_lycoris_file_is_named_and_cli_exits_2(unet_base, tmp_path):
    path, _ = unet_base
    # a LoHa whose factors do not fit together: file and module named
    net, _, _ = lycoris_network("loha")
    sd = net.state_dict()
    key = next(k for k in sd if k.endswith("conv1.hada_w1_b"))
    sd[key] = torch.randn(4, 7)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(InputError, match=rf"broken\.safetensors.*'{key.split('.')[0]}'"):
        scan(str(path), str(tmp_path / "broken.safetensors"))
    # the CLI: exit code 2 and the message, never a traceback
    net, _, _ = lycoris_network("glora")
    net.save_weights(str(tmp_path / "glora.safetensors"), torch.float32, None)
    out = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(path), str(tmp_path / "glora.safetensors")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "LyCORIS GLoRA" in out.stderr and ".a1.weight" in out.stderr.replace("\n", ""), out.stderr


def test_diffusers_file_refusals(unet_base, tmp_path):
    path, _ = unet_base
    layers, _ = _lora_layers(tiny_unet(), seed=10, targets=["to_q"])
    dora = {f"unet.{k}": v for k, v in layers.items()}
    first = next(iter(dora)).rsplit(".lora_", 1)[0]
    dora[f"{first}.lora_magnitude_vector"] = torch.ones(32)
    save_file(dora, tmp_path / "dora.safetensors")
    with pytest.raises(InputError, match="DoRA"):
        scan(str(path), str(tmp_path / "dora.safetensors"))
    peft_file = {f"base_model.model.{k}": v for k, v in layers.items()}
    save_file(peft_file, tmp_path / "adapter_model.safetensors")
    with pytest.raises(InputError, match="adapter_config.json"):
        scan(str(path), str(tmp_path / "adapter_model.safetensors"))
    te_only = {f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_{r}.weight": torch.ones(4, 4)
               for r in "AB"}
    save_file(te_only, tmp_path / "te.safetensors")
    with pytest.raises(MismatchError, match="wrong base or component"):
        scan(str(path), str(tmp_path / "te.safetensors"))


def test_synthetic_lycoris_refusals_and_unpaired_norms(unet_base, tmp_path):
    """T-LoRA and a Tucker LoKr w1 refused by name; norm modules (w_norm) listed unpaired; kohya SDXL names
    in SGM layout (input_blocks) pair with no diffusers weight."""
    path, _ = unet_base
    cases = {"T-LoRA": {"lora_unet_conv_in.lambda_layer": torch.ones(4),
                        "lora_unet_conv_in.q_layer.weight": torch.ones(4, 4)},
             "LoKr with a Tucker w1": {"lora_unet_conv_in.lokr_t1": torch.ones(2, 2, 3, 3),
                                       "lora_unet_conv_in.lokr_w1": torch.ones(2, 2),
                                       "lora_unet_conv_in.lokr_w2": torch.ones(16, 2)}}
    for what, sd in cases.items():
        save_file(sd, tmp_path / "x.safetensors")
        with pytest.raises(InputError, match=rf"x\.safetensors: LyCORIS {what}.*is not supported because"):
            scan(str(path), str(tmp_path / "x.safetensors"))
    g = torch.Generator().manual_seed(12)
    loha = {f"lora_unet_conv_in.hada_w{i}_{s}": torch.randn(*((32, 2) if s == "a" else (2, 36)), generator=g)
            for i in (1, 2) for s in "ab"}
    save_file({**loha, "lora_unet_conv_norm_out.w_norm": torch.ones(32)}, tmp_path / "norm.safetensors")
    res = scan(str(path), str(tmp_path / "norm.safetensors"), k=K)
    assert [r.name for r in res.matrices] == ["conv_in.weight"]
    assert res.unpaired["not_in_base"] == ["lora_unet_conv_norm_out"]
    sgm = {f"lora_unet_input_blocks_1_1_proj_in.lora_{d}.weight": torch.ones(2, 32) for d in ("down", "up")}
    save_file(sgm, tmp_path / "sgm.safetensors")
    with pytest.raises(MismatchError, match="input_blocks.*wrong base or component"):
        scan(str(path), str(tmp_path / "sgm.safetensors"))


def test_merged_mitigation_of_a_pipeline_is_refused(pipeline, tmp_path):
    from lorascope import mitigate

    layers, _ = _lora_layers(tiny_unet(), seed=11, targets=["to_q"])
    save_file({f"unet.{k}": v for k, v in layers.items()}, tmp_path / "l.safetensors")
    with pytest.raises(InputError, match="pipeline folder is not supported"):
        mitigate(str(pipeline[0]), str(tmp_path / "l.safetensors"), tmp_path / "out", format="merged")
