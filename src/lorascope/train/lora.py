"""LoRA on a model: where the adapters go, wrapping with peft, and base-mutating inits (PiSSA...).

An adapter trained from a base-mutating init is saved as a plain LoRA on the *unchanged* base
(:func:`unmutate_lora`), so it is scanned and loaded like any other.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, LoraConfig, TaskType, VeraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_json
from lorascope.train.config import CALIBRATED_INITS, MILORA, TrainConfig

BLOCK_LINEAR = re.compile(r".*\.\d+\.")  # inside a numbered transformer block: layer.3., layers.3., h.3.


def default_target_modules(model: torch.nn.Module) -> str:
    """A peft regex for every linear layer inside the numbered transformer blocks (attention and MLP),
    leaving out embeddings, pooler and heads. Conv1D (GPT-2) counts as linear."""
    leaves = set()
    for name, module in model.named_modules():
        if BLOCK_LINEAR.match(name) and type(module).__name__ in ("Linear", "Conv1D"):
            leaves.add(name.rsplit(".", 1)[-1])
    if not leaves:
        raise InputError("found no linear layers inside transformer blocks; pass target_modules")
    return r".*\.\d+\.(?:.*\.)?(?:" + "|".join(sorted(leaves)) + r")$"


def apply_lora(model: torch.nn.Module, cfg: TrainConfig, objective: str, total_steps: int | None = None,
               calibration: Iterable[dict[str, torch.Tensor]] | None = None) -> torch.nn.Module:
    """Wrap with the run's peft tuner (``cfg.tuner``). For classification the head is trained and saved
    (``modules_to_save``), and so is any other module the checkpoint lacked (e.g. BERT's pooler when
    starting from an MLM).

    - lora: W + s B A with s = α/r (rsLoRA: α/√r);
    - adalora: W + (α/r) P diag(E) Q, rank budget cut from init_r = ⌈1.5 r⌉ per matrix to r on average
      over ``total_steps`` (peft's cubic schedule; :func:`~lorascope.train.recipes.fit` calls
      ``update_and_allocate`` every step);
    - vera: W + diag(b) B diag(d) A with A, B frozen random projections shared by all layers; no α.

    CorDA and LoRA-GA first run the model on ``calibration`` (training batches on the model's device):
    CorDA (IPM, PEFT's default) on each layer's input covariance C (per sequence, scaled by |max x|,
    averaged, damped by 1 % of its mean diagonal), adapter = the top r of the SVD of W C, times C⁻¹;
    LoRA-GA on the full fine-tune's gradient G of W (train mode), A from G's top r right singular
    vectors, B from its left ones r..2r. Both leave W − s·B₀A₀ as the base.
    """
    target = cfg.target_modules if cfg.target_modules is not None else default_target_modules(model)
    new_modules = sorted({key.rsplit(".", 1)[0] for key in getattr(model, "lorascope_new_weights", [])})
    options = dict(cfg.lora_options)
    minor = options.get("init_lora_weights") == MILORA
    if minor:  # not a peft init: peft builds a default LoRA, then milora_init replaces it
        options["init_lora_weights"] = True
    common = dict(task_type=TaskType.CAUSAL_LM if objective == "lm" else TaskType.SEQ_CLS, target_modules=target,
                  modules_to_save=new_modules or None, bias="none", **options)
    if cfg.tuner == "vera":
        lora = VeraConfig(r=cfg.rank, vera_dropout=cfg.lora_dropout, **common)
    elif cfg.tuner == "adalora":
        if not total_steps:
            raise InputError("AdaLoRA needs the number of training steps for its rank schedule")
        lora = AdaLoraConfig(target_r=cfg.rank, init_r=math.ceil(1.5 * cfg.rank), lora_alpha=cfg.alpha,
                             lora_dropout=cfg.lora_dropout, total_step=total_steps, **common)
    else:
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.rslora,
                          **common)
    if options.get("init_lora_weights") in CALIBRATED_INITS:
        _calibrate(model, lora, calibration)
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise InputError(f"cannot apply LoRA with target modules {target!r}: {e}") from e
    if minor:
        milora_init(model)
        model.peft_config["default"].init_lora_weights = MILORA  # marks the base as mutated (tracker, save)
    if cfg.freeze_lora_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def _calibrate(model: torch.nn.Module, lora: LoraConfig, calibration: Iterable[dict[str, torch.Tensor]] | None
               ) -> None:
    """PEFT's preprocessing for the inits that read data (``preprocess_corda``, ``preprocess_loraga``)."""
    init = lora.init_lora_weights
    batches = list(calibration or [])
    if not batches:
        raise InputError(f"init_lora_weights={init!r} needs calibration batches (the training set's first few)")
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        lora.corda_config = lora.corda_config or CordaConfig()

        @torch.no_grad()
        def run_model() -> None:  # peft's hook takes one unpadded sequence per call
            for batch in batches:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    model(input_ids=ids[mask.bool()][None])

        preprocess_corda(model, lora, run_model=run_model)
    else:
        try:
            from peft.tuners.lora.config import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga
        except ImportError as e:
            raise InputError(f"init_lora_weights='lora_ga' needs a peft with LoRA-GA (0.18 or later): {e}") from e
        lora.lora_ga_config = lora.lora_ga_config or LoraGAConfig()

        def train_step() -> None:  # gradients summed over the batches; peft averages them by backward count
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, lora, train_step=train_step)


@torch.no_grad()
def milora_init(model: torch.nn.Module, adapter: str = "default") -> None:
    """MiLoRA (Wang et al. 2024, arXiv 2406.09044): PiSSA's init on the *minor* singular components.

    With W = U S Vᵀ (float64) and the r smallest singular triplets (U_r, S_r, V_r), scaling s:
    A = diag(√(S_r / s)) V_rᵀ, B = U_r diag(√(S_r / s)) and the base becomes W_res = W − s B A, so the
    model is unchanged at init. PEFT's ``pissa_init`` with the last r triplets instead of the first.
    """
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and adapter in m.lora_A]
    if not layers or any(m.fan_in_fan_out for m in layers):
        raise InputError("milora: needs LoRA on Linear layers (not Conv1D / embeddings)")
    for layer in layers:
        weight = layer.get_base_layer().weight
        r, s = layer.r[adapter], layer.scaling[adapter]
        U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
        root = (S[-r:] / s).sqrt()
        A, B = root[:, None] * Vh[-r:], U[:, -r:] * root
        layer.lora_A[adapter].weight.copy_(A)
        layer.lora_B[adapter].weight.copy_(B)
        weight.copy_(weight.double() - s * B @ A)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The module names peft actually wrapped with its tuner (short leaf names)."""
    return sorted({name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names})


def lora_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA A and B tensors of a peft model, keyed as in its saved adapter."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def unmutate_lora(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter trained from a PiSSA-style init, as a plain LoRA on the *unchanged* base.

    The init set the base weight to W_res = W - s B0 A0, so the trained model is
    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]: rank 2r, same scaling s (alpha doubled,
    or times sqrt 2 with rsLoRA). PEFT's ``subtract_mutated_init``, keeping ``modules_to_save`` tensors.
    """
    state = dict(state)
    for key, init in initial.items():
        trained = state[key].to(init.device)
        state[key] = torch.cat([trained, init], 0) if ".lora_A." in key else torch.cat([trained, -init], 1)
    config = dict(config)
    factor = math.sqrt(2) if config.get("use_rslora") else 2.0
    config.update(r=2 * config["r"], lora_alpha=factor * config["lora_alpha"], init_lora_weights=True)
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}
    return state, config


def save_adapter(model: torch.nn.Module, folder: Path, initial: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained``; an adapter from a base-mutating init is rewritten by :func:`unmutate_lora`."""
    model.save_pretrained(folder)
    if initial is None:
        return
    weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    state, config = unmutate_lora(load_file(str(weights)), initial, json.loads(config_file.read_text()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    atomic_write_json(config_file, config)
