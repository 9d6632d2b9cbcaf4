"""ΔW of one module through PEFT's own code: rebuild, inject, load, merge, diff.

For a tuner whose update is not a plain B A (DoRA, LoHa, LoKr, OFT, VeRA, HRA, …) lorascope does not
re-implement the maths: it builds a skeleton of the adapted model holding the one module with its
real base weight, lets PEFT inject the adapter into it (``PeftModel``, so tuner-level shared state
such as VeRA's projections, VBLoRA's vector bank or RandLoRA's bases is created as on the real model),
loads the saved tensors of that module and the shared ones (``set_peft_model_state_dict``, PEFT's
own key mapping), merges the module (PEFT's ``merge``, or ``unload_and_optionally_merge_module``
where a layer has one) and reads the merged weight back.

Shared state is sized from *all* adapted modules (VeRA's A is r × the widest input), so when the
tuner keeps state outside its layers the skeleton also holds every other adapted module, on the
zero-stride placeholder weights: their shapes count, their weights take no memory.

The module is built and the adapter injected and loaded in float32 (PEFT's inits refuse float64), then
the module is cast to float64 and merged, on the CPU, whatever the scan's dtype.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch

from lorascope.errors import InputError, MismatchError

PREFIX = "base_model.model."
_LOCK = threading.Lock()  # PEFT mutates module-level state (warnings filters, registries) while injecting


def make_layer(kind: str, stored_shape: tuple[int, ...], device: str | torch.device,
               dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A bare module of the base's layer kind with an uninitialised weight of ``stored_shape``."""
    from transformers.pytorch_utils import Conv1D

    with torch.device(device):
        if kind == "linear":
            layer: torch.nn.Module = torch.nn.Linear(stored_shape[1], stored_shape[0], bias=False, dtype=dtype)
        elif kind == "conv1d":
            layer = Conv1D(stored_shape[1], stored_shape[0])  # weight (in, out) = (nx, nf)
            layer.bias = None
        elif kind == "embedding":
            layer = torch.nn.Embedding(*stored_shape, dtype=dtype)
        elif kind == "conv2d":
            out_c, in_c, kh, kw = stored_shape
            layer = torch.nn.Conv2d(in_c, out_c, (kh, kw), bias=False, dtype=dtype)
        else:
            raise AssertionError(kind)
    return layer.to(dtype)


def _tree(layers: dict[str, torch.nn.Module]) -> torch.nn.Module:
    root = torch.nn.Module()
    for path, layer in layers.items():
        parent = root
        *parents, leaf = path.split(".")
        for p in parents:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(leaf, layer)
    return root


class PeftMerge:
    """Merges single modules of one saved adapter through PEFT.

    ``config``: the adapter_config.json dict (already checked); ``state``: key -> tensor getter
    (the saved keys as written); ``targets``: module path -> (kind, stored shape) of every adapted
    module; ``module_keys``: module path -> its saved keys; ``shared_keys``: saved keys outside
    every module (tuner-level state); ``where``: the adapter file, for messages.
    """

    def __init__(self, config: dict[str, Any], get, targets: dict[str, tuple[str, tuple[int, ...]]],
                 module_keys: dict[str, list[str]], shared_keys: list[str], where: str,
                 overrides: dict[str, Any] | None = None, bias_of=None):
        self.raw = config
        self.get = get
        self.targets = targets
        self.module_keys = module_keys
        self.shared_keys = shared_keys
        self.where = where
        self.overrides = overrides or {}
        self.bias_of = bias_of or (lambda module: None)  # the base's bias of a module, or None
        self._whole: bool | None = None  # does the skeleton need every adapted module?
        self.bias_changed: set[str] = set()  # modules whose bias the merge changed (IA3, GLoRA, …)

    # -- the PEFT config ---------------------------------------------------------------------
    def peft_config(self, layers: dict[str, Any] | None = None):
        import peft

        cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[self.raw["peft_type"]]
        fields = cls.__dataclass_fields__
        kwargs = {k: v for k, v in self.raw.items() if k in fields}
        kwargs.update(self.overrides)
        if self.raw["peft_type"] == "ADALORA" and kwargs.get("rank_pattern") and layers is not None:
            # AdaLoRA's rank masks ("<module>.lora_E": [bool]) resize every module they name on load:
            # keep those of the modules the skeleton holds
            kwargs["rank_pattern"] = {k: v for k, v in kwargs["rank_pattern"].items()
                                      if k.rsplit(".", 1)[0] in layers}
        for key, value in (("modules_to_save", None), ("task_type", None), ("inference_mode", False),
                           ("trainable_token_indices", None)):
            if key in fields:
                kwargs[key] = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)

    # -- one module ----------------------------------------------------------------------------
    def merged(self, module: str, W_stored: torch.Tensor) -> torch.Tensor:
        """The merged weight of ``module`` (stored layout, float64, CPU) on base weight ``W_stored``."""
        with _LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                return self._merged(module, W_stored.detach().to("cpu", torch.float64))
            except (InputError, MismatchError):
                raise
            except Exception as e:
                raise InputError(
                    f"{self.where}: PEFT could not merge the {self.raw['peft_type']} update of '{module}' "
                    f"({type(e).__name__}: {e}); lorascope reads this adapter only through PEFT's merge"
                ) from e

    def _merged(self, module: str, W: torch.Tensor) -> torch.Tensor:
        import peft

        pm = None
        if self._whole is None:
            tuner = peft.PEFT_TYPE_TO_TUNER_MAPPING[self.raw["peft_type"]]
            self._whole = bool(self.shared_keys) or bool(getattr(tuner, "uses_shared_state", False))
            if not self._whole:  # state outside the layers that the class does not declare (RandLoRA)
                pm = self._build(module, W, whole=False)
                self._whole = any(not n.startswith("model.") for n, _ in pm.base_model.state_dict().items())
        if pm is None or self._whole:
            pm = self._build(module, W, whole=self._whole)
        expected = set(peft.get_peft_model_state_dict(pm).keys())
        mine = PREFIX + module + "."
        keys = set(self.module_keys[module]) | set(self.shared_keys)
        missing = sorted(k for k in expected if (k.startswith(mine) or not k.startswith(PREFIX)) and k not in keys)
        if missing:
            raise InputError(
                f"{self.where}: module '{module}' lacks tensor '{missing[0]}' that a "
                f"{self.raw['peft_type']} adapter of it must hold ({len(missing)} missing); PEFT would fill it "
                "with a fresh random initialisation: is the file truncated or edited?"
            )
        state = {k: self.get(k) for k in sorted(keys)}
        result = peft.set_peft_model_state_dict(pm, state, adapter_name="default")
        wrong = [k for k in result.unexpected_keys]
        if wrong:
            raise InputError(f"{self.where}: PEFT did not take tensors {wrong[:3]} of module '{module}'")
        target = pm.base_model.model.get_submodule(module)
        target.to(torch.float64)  # base and adapter tensors: merge in float64
        pm.base_model._check_merge_allowed()
        if hasattr(target, "unload_and_optionally_merge_module"):
            merged = target.unload_and_optionally_merge_module(merge=True, safe_merge=False,
                                                               adapter_names=["default"])
            weight, bias = merged.weight, getattr(merged, "bias", None)
        else:
            if not hasattr(target, "merge"):
                raise InputError(f"{self.where}: PEFT did not adapt '{module}' from this config")
            target.merge(adapter_names=["default"])
            if "default" not in getattr(target, "merged_adapters", ["default"]):
                raise InputError(f"{self.where}: PEFT did not merge the adapter into '{module}'")
            weight, bias = target.get_base_layer().weight, getattr(target.get_base_layer(), "bias", None)
        original = self._original_bias
        if bias is not None and original is not None and not torch.equal(bias.detach().to(original), original):
            self.bias_changed.add(module)
        weight = weight.detach().to(torch.float64)
        if tuple(weight.shape) != tuple(W.shape):
            raise MismatchError(
                f"{self.where}: merging '{module}' gave a weight of shape {tuple(weight.shape)}, the base has "
                f"{tuple(W.shape)}"
            )
        return weight

    def _build(self, module: str, W: torch.Tensor, whole: bool):
        import peft

        layers: dict[str, torch.nn.Module] = {}
        self._original_bias: torch.Tensor | None = None
        for path, (kind, shape) in self.targets.items():
            if path == module:  # float32: PEFT's inits refuse float64 (they run in float32 on real models too)
                layer = make_layer(kind, tuple(W.shape), "cpu", torch.float32)
                layer.weight.data.copy_(W)
                bias = self.bias_of(module)
                if bias is not None:  # the base's own bias: some tuners use it, and some change it
                    layer.bias = torch.nn.Parameter(bias.detach().to("cpu", torch.float32).clone())
                    self._original_bias = layer.bias.detach().to(torch.float64).clone()
                layers[path] = layer
            elif whole:  # shapes only: a zero-stride weight, no memory (not the meta device: PEFT moves
                # shared state to the device of every layer it adapts, and meta tensors hold no data)
                layer = make_layer(kind, shape, "meta")
                layer.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float32).expand(shape),
                                                  requires_grad=False)
                layers[path] = layer
        return peft.PeftModel(_tree(layers), self.peft_config(layers), adapter_name="default")
