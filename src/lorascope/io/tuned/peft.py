"""PEFT adapter folders: adapter_config.json plus adapter_model.safetensors (or .bin)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import InputError, MismatchError
from lorascope.io.checkpoint import Checkpoint, MemoryCheckpoint, TensorSource
from lorascope.io.layout import align_names, orient, unorient
from lorascope.io.tuned.base import Probe, replacement_delta
from lorascope.spectral.operators import Delta, LowRankDelta

_PEFT_PREFIX = "base_model.model."


class PeftAdapter:
    """A PEFT adapter folder: adapter_config.json plus adapter_model.safetensors (or .bin).

    LoRA (incl. rsLoRA, rank_pattern / alpha_pattern, fan_in_fan_out, embeddings) is read as factors:
    ΔW = s·B A with s = α/r, or α/√r with rsLoRA (PEFT ``LoraLayer.update_layer``). DoRA and the
    other PEFT tuners (LoHa, LoKr, AdaLoRA, OFT, …) go through PEFT's own layer: the one module is
    rebuilt with the base weight, the adapter loaded into it and merged, and ΔW read back.
    """

    format = "PEFT adapter"
    kind = "lora"

    def __init__(self, root: Path, config: dict[str, Any], weights: TensorSource):
        self.root = Path(root)
        self.description = str(self.root)
        self.config = config
        self.weights = weights
        self.unpaired: list[str] = []
        self._index()

    @classmethod
    def sniff(cls, probe: Probe) -> bool:
        return probe.path.is_dir() and (probe.path / "adapter_config.json").is_file()

    @classmethod
    def open(cls, probe: Probe) -> PeftAdapter:
        root = probe.path
        config = json.loads((root / "adapter_config.json").read_text())
        weights = [root / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
        weights = [w for w in weights if w.is_file()]
        if not weights:
            raise InputError(f"{root}: adapter_config.json but no adapter_model.safetensors or .bin")
        return cls(root, config, Checkpoint(weights[0]))

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> PeftAdapter:
        """An adapter held in memory: the config and state dict ``save_pretrained`` would write
        (the training tracker's live LoRA factors)."""
        root = "<in-memory adapter>"
        return cls(Path(root), config, MemoryCheckpoint(state, root))

    def _index(self) -> None:
        """Read the tuner type from ``self.config`` and group ``self.weights``' keys by module."""
        self.peft_type = self.config.get("peft_type", "LORA")
        if self.config.get("target_parameters"):
            raise InputError(f"{self.root}: adapters on target_parameters (MoE experts) are not supported")
        plain_lora = self.peft_type == "LORA" and not self.config.get("use_dora")
        self.kind = "lora" if plain_lora else "peft"
        self._modules: dict[str, dict[str, str]] = {}  # module path -> {role: tensor key}
        self._saved: dict[str, str] = {}  # full weights of modules_to_save: param name -> key
        for key in self.weights.keys():
            name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            path, role = _split_adapter_key(name)
            if role is None:
                self._saved[name] = key
            else:
                self._modules.setdefault(path, {})[role] = key

    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]:
        wanted = {f"{p}.weight": p for p in self._modules}
        mapping = align_names(base.keys(), list(wanted) + list(self._saved))
        missing = [w for w in wanted if w not in mapping]
        if missing:
            raise MismatchError(
                f"{self.weights.root}: the adapter targets '{wanted[missing[0]]}' "
                f"({len(missing)} module(s) in all) but the base {base.root} has no such weight: wrong base?"
            )
        out: dict[str, str] = {}
        for tuned_name, base_name in mapping.items():
            if tuned_name in self._saved and base_name not in base_kinds:
                continue  # a saved bias or norm weight: not a matrix, nothing to scan
            if base_name not in base_kinds:
                raise MismatchError(
                    f"{self.weights.root}: the adapter changes '{base_name}', which is not a Linear, Conv1D "
                    "or Embedding weight of the base"
                )
            out[base_name] = wanted.get(tuned_name, "saved:" + tuned_name)
        return out

    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta:
        if ref.startswith("saved:"):  # modules_to_save: a full replacement weight
            return replacement_delta(self.weights, self._saved[ref[len("saved:"):]], W0, kind)
        roles = self._modules[ref]
        if self.kind == "lora" and {"A", "B"} <= roles.keys():
            # Conv2d LoRA stores A as (r, in, kh, kw) and B as (out, r, 1, 1): flatten like W0
            A = self.weights.get(roles["A"]).to(W0.device, W0.dtype)
            A = A.reshape(A.shape[0], -1)
            B = self.weights.get(roles["B"]).to(W0.device, W0.dtype)
            B = B.reshape(B.shape[0], -1)
            d = LowRankDelta(B, A, self.scaling(ref, A.shape[0]))
            if d.shape != tuple(W0.shape):
                raise MismatchError(
                    f"{self.weights.root}: LoRA factors of '{ref}' give ΔW of shape {d.shape} but the "
                    f"base matrix is {tuple(W0.shape)} (layout {kind}): wrong base?"
                )
            return d
        return self._peft_delta(ref, W0, kind)

    def factor_keys(self, module: str) -> tuple[str, str]:
        """The tensor keys of a LoRA module's B and A factors."""
        roles = self._modules[module]
        return roles["B"], roles["A"]

    def scaling(self, module: str, r: int) -> float:
        """PEFT's scaling for ``module``: α/r, or α/√r with use_rslora; α from alpha_pattern if a
        pattern matches (``peft.utils.other.get_pattern_key``)."""
        alpha = self.config.get("lora_alpha", 8)
        patterns = self.config.get("alpha_pattern") or {}
        if patterns:  # importing peft takes seconds: only when there is a pattern to match
            from peft.utils.other import get_pattern_key

            alpha = patterns.get(get_pattern_key(list(patterns), module), alpha)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def _peft_delta(self, module: str, W0: torch.Tensor, kind: str) -> torch.Tensor:
        """ΔW through PEFT itself: rebuild the module alone, inject the adapter, load, merge, diff."""
        import peft
        from transformers.pytorch_utils import Conv1D

        if kind == "conv2d":
            raise InputError(f"{self.root}: {self.peft_type} adapters on Conv2d ('{module}') are not supported")
        stored = unorient(W0, kind).detach().clone()
        if kind == "linear":
            layer: torch.nn.Module = torch.nn.Linear(stored.shape[1], stored.shape[0], bias=False)
        elif kind == "conv1d":
            layer = Conv1D(stored.shape[1], stored.shape[0])
        else:
            layer = torch.nn.Embedding(*stored.shape)
        layer = layer.to(stored.device, stored.dtype)
        layer.weight.data.copy_(stored)
        root = torch.nn.Module()
        parent = root
        *parents, leaf = module.split(".")
        for p in parents:
            child = torch.nn.Module()
            parent.add_module(p, child)
            parent = child
        parent.add_module(leaf, layer)

        cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]
        cfg_dict = {k: v for k, v in self.config.items() if k in cls.__dataclass_fields__}
        config = cls(**cfg_dict)
        config.modules_to_save = None
        config.inference_mode = False
        try:
            peft.inject_adapter_in_model(config, root, adapter_name="default")
            root.peft_config = {"default": config}  # what set_peft_model_state_dict looks up
            keys = self._modules[module].values()
            state = {k[len(_PEFT_PREFIX):]: self.weights.get(k) for k in keys}
            result = peft.set_peft_model_state_dict(root, state, adapter_name="default")
            if result.unexpected_keys:
                raise InputError(f"PEFT did not take tensors {result.unexpected_keys}")
            target = root.get_submodule(module)
            target.merge(adapter_names=["default"])
            merged = target.get_base_layer().weight.detach()
        except InputError:
            raise
        except Exception as e:
            raise InputError(
                f"{self.root}: cannot compute the update of '{module}' for PEFT type {self.peft_type} "
                f"through PEFT ({type(e).__name__}: {e}); this adapter type is not supported"
            ) from e
        return orient(merged, kind).to(W0.dtype) - W0


_ROLES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
_TUNER_PREFIXES = (
    "lora_", "hada_", "lokr_", "oft_", "boft_", "vera_", "ia3_", "ranknum", "fourierft_", "ln_tuning_",
)


def _split_adapter_key(name: str) -> tuple[str, str | None]:
    """'a.b.lora_A.weight' -> ('a.b', 'A'); 'a.b.hada_w1_a' -> ('a.b', 'hada_w1_a'); a full weight
    (modules_to_save) -> (name, None)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(_TUNER_PREFIXES):
            role = _ROLES.get(p, ".".join(parts[i:]))
            return ".".join(parts[:i]), role
    return name, None
