"""diffusers / PEFT single-file LoRAs: the format of most hub LoRAs for Stable Diffusion, SDXL, SD3 and Flux.

One ``.safetensors`` file (or a folder holding ``pytorch_lora_weights.safetensors``, as diffusers'
``save_lora_weights`` writes it) whose keys are module paths behind a component prefix (``unet.``,
``transformer.``, ``text_encoder.``, ``text_encoder_2.``, … or none, from a model's own
``save_lora_adapter``) and one of the factor suffixes diffusers loads:

- PEFT: ``{module}.lora_A.weight`` (r × in[, kh, kw]) / ``{module}.lora_B.weight`` (out × r[, 1, 1]),
  also with the adapter's name as a raw state dict has it (``lora_A.default.weight``);
- old diffusers: ``{module}.lora.down.weight`` / ``.lora.up.weight``, ``{module}.lora_linear_layer.down/up``,
  and attention processors ``{attn}.processor.to_q_lora.down.weight`` (→ ``{attn}.to_q``, or
  ``{attn}.q_proj`` in a text encoder; ``to_out_lora`` → ``to_out.0`` / ``out_proj``), as
  ``diffusers.utils.state_dict_utils`` (``UNET_TO_DIFFUSERS``, ``DIFFUSERS_OLD_TO_PEFT``) maps them;
- an optional scalar ``{module}.alpha``.

ΔW = s · B @ A, returned as factors. The scale s, as diffusers loads the file:
- with diffusers' ``lora_adapter_metadata`` (the component's ``LoraConfig``, written by
  ``save_lora_weights(…, unet_lora_adapter_metadata=…)`` / ``save_lora_adapter``): PEFT's rule,
  s = lora_alpha / r (alpha_pattern first; lora_alpha / √r with use_rslora);
- else with a ``{module}.alpha`` tensor: s = alpha / r (diffusers' Flux loader and the other DiT
  loaders use these alphas; note that ``StableDiffusionLoraLoaderMixin.lora_state_dict`` (SD 1.x /
  SDXL) drops ``.alpha`` tensors of PEFT-keyed files, so diffusers would load such a file with s = 1);
- else s = 1 (``diffusers.utils.peft_utils.get_peft_kwargs``: no alphas means lora_alpha = r).

Modules of components that the base does not have (text encoder keys against a UNet) are unpaired,
reported by the scan. DoRA (``lora_magnitude_vector``), LoRA biases (``lora_B.bias``) and PEFT
LoHa/LoKr keys in such files are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import InputError, MismatchError
from lorascope.io.checkpoint import Checkpoint, TensorSource
from lorascope.io.tuned.base import Probe, lowrank_delta, scalar
from lorascope.io.tuned.components import DIFFUSERS_COMPONENTS, pair_modules
from lorascope.spectral.operators import Delta

_ROLES = (
    (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"),
    (".alpha", "alpha"),
)
_PROC = re.compile(r"^(.*)\.(to_q|to_k|to_v|to_out)_lora\.(down\.weight|up\.weight|alpha)$")
_NAMED = re.compile(r"^(.*)\.lora_([AB])\.(?!weight$)\w+\.weight$")  # a raw state dict: lora_A.default.weight
_PROC_TARGETS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
                 "to_out": ("to_out.0", "out_proj")}
_REFUSED = (
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    ("lora_B.bias", "LoRA biases (lora_B.bias)"),
    ("lora_A.bias", "LoRA biases (lora_A.bias)"),
    (".lokr_", "PEFT LoKr"),
    (".hada_", "PEFT LoHa"),
)
_SNIFF = tuple(s for s, role in _ROLES if role == "A") + ("_lora.down.weight", "lora_magnitude_vector")


def _split(key: str) -> tuple[str, list[str], str] | None:
    """'unet.a.attn1.processor.to_q_lora.down.weight' -> ('unet.a.attn1.to_q', [candidates], 'A')."""
    k = key.replace(".processor.", ".")
    m = _PROC.match(k)
    if m:
        parent, proj, end = m.groups()
        cands = [f"{parent}.{t}" for t in _PROC_TARGETS[proj]]
        return cands[0], cands, {"down.weight": "A", "up.weight": "B", "alpha": "alpha"}[end]
    for suffix, role in _ROLES:
        if k.endswith(suffix):
            module = k[: -len(suffix)]
            return module, [module], role
    m = _NAMED.match(k)
    if m:
        return m.group(1), [m.group(1)], m.group(2)
    return None


class DiffusersLora:
    """A diffusers / PEFT single-file LoRA as a TunedSource (see the module docstring)."""

    format = "diffusers LoRA"
    kind = "lora"

    def __init__(self, path: Path, weights: Checkpoint):
        self.root = path
        self.weights = weights
        self.description = str(path)
        keys = weights.keys()
        if any(k.startswith("base_model.model.") for k in keys):
            raise InputError(
                f"{path}: PEFT adapter weights ('{next(k for k in keys if k.startswith('base_model.model.'))}') "
                "without their adapter_config.json, so their scale is unknown: pass the adapter folder"
            )
        for k in keys:
            for part, what in _REFUSED:
                if part in k:
                    raise InputError(f"{path}: {what} in a diffusers LoRA file ('{k}') is not supported")
        self.modules: dict[str, dict[str, str]] = {}  # module path -> {role: key}
        self.candidates: dict[str, list[str]] = {}
        self.unpaired: list[str] = []
        self._extra: list[str] = []  # tensors that are no LoRA factor: reported as unpaired
        for k in keys:
            split = _split(k)
            if split is None:
                self._extra.append(k)
                continue
            module, cands, role = split
            roles = self.modules.setdefault(module, {})
            if role in roles:
                raise InputError(f"{path}: tensors '{roles[role]}' and '{k}' are both the {role} of '{module}'")
            roles[role] = k
            self.candidates[module] = cands
        for module, roles in self.modules.items():
            for role, name in (("A", "down / lora_A"), ("B", "up / lora_B")):
                if role not in roles:
                    raise InputError(f"{path}: module '{module}' has no {name} factor")
        self._check_mixed(keys)
        self.configs = self._adapter_configs()
        if self.configs and any("alpha" in r for r in self.modules.values()):
            raise InputError(
                f"{path}: has both '.alpha' tensors and diffusers' lora_adapter_metadata; diffusers refuses "
                "such files (network_alphas and metadata cannot both be given)"
            )
        for comp, cfg in self.configs.items():
            if cfg.get("use_dora"):
                raise InputError(f"{path}: DoRA (use_dora in the {comp or 'adapter'} metadata) is not supported")

    def _check_mixed(self, keys: list[str]) -> None:
        """diffusers' model loader (``PeftAdapterMixin.load_lora_adapter``) converts old keys only when
        a component's first key is not a PEFT one; otherwise it drops them with a warning. Such a file
        means two different things, so it is refused rather than read either way."""
        first: dict[str, str] = {}
        old: dict[str, str] = {}
        for k in keys:
            comp = k.split(".", 1)[0] if k.split(".", 1)[0] in DIFFUSERS_COMPONENTS else ""
            if comp.startswith("text_encoder") or _split(k) is None:
                continue  # text encoders: diffusers converts every key
            first.setdefault(comp, k)
            if not re.search(r"\.lora_[AB]\.", k) and not k.endswith(".alpha"):
                old.setdefault(comp, k)
        for comp, k in old.items():
            if "lora_A" in first[comp]:
                raise InputError(
                    f"{self.root}: mixes PEFT keys ('{first[comp]}') and old diffusers keys ('{k}') in one "
                    "component; diffusers' loader would drop the old ones, so the file is ambiguous"
                )

    def _adapter_configs(self) -> dict[str, dict[str, Any]]:
        """diffusers' lora_adapter_metadata, split by component: {'unet': {'r': …, 'lora_alpha': …}, …}
        ('' for the unprefixed keys of a model's own ``save_lora_adapter``)."""
        raw = self.weights.metadata().get("lora_adapter_metadata") if hasattr(self.weights, "metadata") else None
        if not raw:
            return {}
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise InputError(f"{self.root}: its lora_adapter_metadata is not JSON ({e})") from e
        comps = {m.split(".", 1)[0] for m in self.modules} & set(DIFFUSERS_COMPONENTS)
        out: dict[str, dict[str, Any]] = {}
        for key, value in meta.items():
            comp, _, field = key.partition(".")
            if comp in comps and field:
                out.setdefault(comp, {})[field] = value
            else:
                out.setdefault("", {})[key] = value
        return out

    @classmethod
    def sniff(cls, probe: Probe) -> bool:
        return any(k.endswith(_SNIFF) or ".lokr_" in k or ".hada_" in k or _NAMED.match(k) for k in probe.ckpt.keys())

    @classmethod
    def open(cls, probe: Probe) -> DiffusersLora:
        return cls(probe.path, probe.ckpt)

    def _component(self, module: str, known: set[str]) -> tuple[str, ...]:
        first = module.split(".", 1)[0]
        return (first,) if first in known and "." in module else ()

    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]:
        pipeline = set(getattr(base, "components", None) or {})
        known = set(DIFFUSERS_COMPONENTS) | pipeline
        if not pipeline:  # a one-model base: its own top-level modules (a VAE's decoder.…) are no prefix
            known -= {name.split(".", 1)[0] for name in base_kinds}
        modules = {}
        for module, cands in self.candidates.items():
            comps = self._component(module, known)
            cut = len(comps[0]) + 1 if comps else 0
            paths = [c[cut:] for c in cands]
            if comps and comps[0].startswith("text_encoder"):  # diffusers accepts CLIP keys without text_model.
                paths += ["text_model." + c for c in paths if not c.startswith("text_model.")]
            modules[module] = (comps, paths)
        out, unpaired = pair_modules(modules, base, base_kinds, source=self.description)
        self.unpaired = unpaired + self._extra
        if not out:
            raise MismatchError(
                f"{self.description}: none of its {len(self.modules)} LoRA modules (e.g. "
                f"'{next(iter(self.modules))}') is a weight of {base.root}: wrong base or component?"
            )
        return out

    def scale(self, module: str, r: int) -> float:
        roles = self.modules[module]
        if self.configs:
            comp = module.split(".", 1)[0]
            cfg = self.configs.get(comp)
            local = module[len(comp) + 1:] if cfg is not None else module
            cfg = cfg if cfg is not None else self.configs.get("", {})
            alpha = cfg.get("lora_alpha", 8)
            patterns = cfg.get("alpha_pattern") or {}
            if patterns:  # PEFT's own pattern match (peft.utils.other.get_pattern_key)
                from peft.utils.other import get_pattern_key

                alpha = patterns.get(get_pattern_key(list(patterns), local), alpha)
            return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if "alpha" in roles:
            return scalar(self.weights, roles["alpha"]) / r
        return 1.0

    def factor_keys(self, module: str) -> tuple[str, str]:
        """The tensor keys of a module's B (up) and A (down) factors."""
        return self.modules[module]["B"], self.modules[module]["A"]

    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta:
        B_key, A_key = self.factor_keys(ref)
        A, B = self.weights.get(A_key), self.weights.get(B_key)
        return lowrank_delta(B, A, self.scale(ref, A.shape[0]), W0, self.description, ref)
