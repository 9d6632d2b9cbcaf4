"""kohya-ss / sd-scripts LoRA files (the usual format of diffusion LoRAs on model hubs).

One ``.safetensors`` file with, per module, ``{name}.lora_down.weight`` (r × in[, kh, kw]),
``{name}.lora_up.weight`` (out × r[, 1, 1]) and an optional scalar ``{name}.alpha``. ``name`` is the
module path with dots replaced by underscores behind a component prefix: ``lora_unet_`` for the
UNet (or DiT), ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders (``io.tuned.components``
pairs them with a one-model base or with the components of a diffusers pipeline folder). The update
is ΔW = (alpha / r) · up @ down, with conv weights flattened to (out, in·kh·kw) (LoCon). DyLoRA as
kohya sd-scripts writes it is this format too (its rank blocks concatenated into lora_down/lora_up,
merged at full rank with alpha / r). Files with LyCORIS tensors (LoHa, LoKr, Tucker LoCon, …) are
read by ``io.tuned.lyco``, which comes first in the registry.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorascope.errors import InputError, MismatchError
from lorascope.io.checkpoint import Checkpoint, TensorSource
from lorascope.io.tuned.base import Probe, lowrank_delta, scalar
from lorascope.io.tuned.components import flat, kohya_split, pair_modules
from lorascope.spectral.operators import Delta


class KohyaLora:
    """A kohya LoRA file as a TunedSource. Modules of other components than the given base (e.g. the
    text encoder when the base is a UNet) are reported as unpaired, not scanned."""

    format = "kohya LoRA"
    kind = "lora"

    def __init__(self, path: Path, weights: Checkpoint):
        self.root = path
        self.weights = weights
        self.description = str(path)
        self.modules: dict[str, str] = {}  # kohya module name -> key stem
        other = [k for k in self.weights.keys() if not k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                   ".alpha"))]
        if other:
            raise InputError(
                f"{path}: tensor '{other[0]}' is not a kohya LoRA tensor (lora_down.weight, lora_up.weight, alpha)"
            )
        for k in self.weights.keys():
            if k.endswith(".lora_down.weight"):
                self.modules[k[: -len(".lora_down.weight")]] = k[: -len(".lora_down.weight")]
        self.unpaired: list[str] = []

    @classmethod
    def sniff(cls, probe: Probe) -> bool:
        return any(k.endswith(".lora_down.weight") for k in probe.ckpt.keys())

    @classmethod
    def open(cls, probe: Probe) -> KohyaLora:
        return cls(probe.path, probe.ckpt)

    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]:
        modules = {}
        for stem in self.modules:
            comps, module = kohya_split(stem)
            modules[stem] = (comps, [module])
        out, self.unpaired = pair_modules(modules, base, base_kinds, key=flat, source=self.description)
        if not out:
            raise MismatchError(
                f"{self.description}: none of its {len(self.modules)} LoRA modules (e.g. "
                f"'{next(iter(self.modules))}') is a weight of {base.root}: wrong base or component?"
            )
        return out

    def factor_keys(self, ref: str) -> tuple[str, str]:
        """The tensor keys of a module's up (B) and down (A) factors."""
        return f"{ref}.lora_up.weight", f"{ref}.lora_down.weight"

    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta:
        down = self.weights.get(f"{ref}.lora_down.weight")
        up = self.weights.get(f"{ref}.lora_up.weight")
        r = down.shape[0]
        alpha_key = f"{ref}.alpha"
        alpha = scalar(self.weights, alpha_key) if alpha_key in self.weights else float(r)
        return lowrank_delta(up, down, alpha / r, W0, self.description, ref)
