"""GGUF files read one tensor at a time: dequantised by the ``gguf`` package, named as transformers names them.

transformers' ``from_pretrained(gguf_file=…)`` dequantises every tensor of the file and builds the
model before a scan can read one matrix (SmolLM2-135M: most of a scan's time). Here the file is
memory-mapped by ``gguf.GGUFReader`` and nothing is dequantised until a tensor is asked for. The
names, and the per-architecture fixes of llama.cpp's conversion (e.g. LLaMA's permuted Q/K rows),
come from transformers' own GGUF loader (``transformers.modeling_gguf_pytorch_utils``): its name
map from a meta-device model of the file's architecture and its ``TENSOR_PROCESSORS``, applied to
the one tensor. ``tests/test_gguf.py`` checks every tensor against transformers' whole-file load.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorascope.errors import InputError


class GGUFFile:
    """The tensors of one GGUF file under their transformers names: ``names``, ``shape``, ``get``."""

    def __init__(self, path: Path):
        try:
            import gguf
            import transformers
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
                load_gguf_checkpoint,
            )
        except ImportError as e:
            raise InputError(f"{path}: reading .gguf files needs the gguf package (pip install 'lorascope[gguf]'): "
                             f"{e}") from e
        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only
        except Exception as e:  # a malformed or foreign file, whatever the library raises
            raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.config: dict[str, Any] = dict(parsed["config"])
        arch = self._reader.fields["general.architecture"]
        architecture = bytes(arch.parts[arch.data[0]]).decode()
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.config)
        self._parsed = parsed
        model_type = self.config.get("model_type")
        try:
            cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in self.config.items()
                                                                   if k != "model_type"})
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(cfg)
            to_hf = get_gguf_hf_weights_map(_Flat(model), self._processor)
            matrices = {t.name for t in self._reader.tensors if len(t.shape) == 2}
            if not matrices <= set(to_hf):  # a layout only the submodule walk maps (e.g. Bloom's)
                to_hf = get_gguf_hf_weights_map(model, self._processor)
        except Exception as e:
            raise InputError(f"{path}: transformers cannot map the tensors of GGUF architecture '{architecture}' "
                             f"({type(e).__name__}: {e})") from e
        self.config = {**cfg.to_dict(), "model_type": cfg.model_type}
        shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        self._tensors: dict[str, Any] = {}  # transformers name -> the reader's tensor
        self._to_hf = to_hf
        for t in self._reader.tensors:  # tensors a processor would rename (MoE experts) are not matrices here
            name = to_hf.get(t.name)
            if name is not None and name in shapes:
                self._tensors[name] = t
        self._shapes = {n: shapes[n] for n in self._tensors}
        self._lock = threading.Lock()  # the processors are not documented as thread-safe

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """Dequantise one tensor (float32), as transformers' loader would have stored it."""
        import gguf

        t = self._tensors[name]
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        with self._lock:
            weights = self._processor.process(weights=weights, name=t.name, tensor_key_mapping=self._to_hf,
                                              parsed_parameters=self._parsed).weights
        out = torch.from_numpy(np.array(weights, dtype=np.float32, order="C", copy=True))  # ours, writable
        if tuple(out.shape) != self._shapes[name]:
            raise InputError(f"{self.path}: tensor '{t.name}' ({name}) dequantises to shape {tuple(out.shape)}, "
                             f"not the {self._shapes[name]} its architecture expects")
        return out


class _Flat:
    """A model as transformers' ``get_gguf_hf_weights_map`` sees it, without its submodules: the map of
    the top-level names only. The function also walks every submodule, rebuilding gguf's name map and
    the state dict at each (SmolLM2-135M: 5.6 s of a 15 s open); the walk is kept for files whose
    matrices the top level does not map."""

    def __init__(self, model: torch.nn.Module):
        self.config = model.config
        self._names = list(model.state_dict())

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list:
        return []
