"""GGUF files read one tensor at a time: dequantised by the ``gguf`` package, named as transformers names them.

transformers' ``from_pretrained(gguf_file=…)`` dequantises every tensor of the file and builds the
model before a scan can read one matrix (SmolLM2-135M: most of a scan's time). Here the file's tensor
table is read by :func:`tensor_table` (gguf's ``GGUFReader`` builds every metadata field in Python, the
tokenizer's 49k strings included: 3.5–4 s for SmolLM2, and transformers' config parse builds another),
the data is memory-mapped and nothing is dequantised until a tensor is asked for. The
names, and the per-architecture fixes of llama.cpp's conversion (e.g. LLaMA's permuted Q/K rows),
come from transformers' own GGUF loader (``transformers.modeling_gguf_pytorch_utils``): its name
map (``get_gguf_hf_weights_map``) and its ``TENSOR_PROCESSORS``, applied to the one tensor. The map
is fed the state-dict names of ``GGUF_LAYOUTS`` for the decoder families it lists, else those of a
meta-device model of the file's architecture. ``tests/test_gguf.py`` checks every tensor against
transformers' whole-file load, and the table against the meta-device model.
"""

from __future__ import annotations

import math
import tempfile
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorascope.errors import InputError
from lorascope.io.identity import FileMemo


class GGUFFile:
    """The tensors of one GGUF file under their transformers names: ``names``, ``shape``, ``get``."""

    def __init__(self, path: Path):
        try:
            import gguf  # noqa: F401 - here for the message below; tensor_table and get use it
            import transformers
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
            )
        except ImportError as e:
            raise InputError(f"{path}: reading .gguf files needs the gguf package (pip install 'lorascope[gguf]'): "
                             f"{e}") from e
        self.path = path
        try:
            header = read_header(path)
            architecture, tensors = header.architecture, header.tensors
            parsed = load_metadata(path, header)
        except InputError:
            raise
        except Exception as e:  # a malformed or foreign file, whatever the library raises
            raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        # transformers' parse of the metadata; through the meta-device model, with its config's defaults
        self.config: dict[str, Any] = dict(parsed["config"])
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.config)
        self._parsed = parsed
        model_type = self.config.get("model_type")
        known = _known_layout(tensors, self.config, self._processor)
        if known is not None:  # names from the layout table: no modelling code imported (~3 s on 2 cores)
            to_hf, shapes = known
        else:
            try:
                cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in self.config.items()
                                                                       if k != "model_type"})
                with torch.device("meta"):
                    model = transformers.AutoModelForCausalLM.from_config(cfg)
                to_hf = get_gguf_hf_weights_map(_Flat(model.config, list(model.state_dict())), self._processor)
                matrices = {t.name for t in tensors if len(t.shape) == 2}
                if not matrices <= set(to_hf):  # a layout only the submodule walk maps (e.g. Bloom's)
                    to_hf = get_gguf_hf_weights_map(model, self._processor)
            except Exception as e:
                raise InputError(f"{path}: transformers cannot map the tensors of GGUF architecture "
                                 f"'{architecture}' ({type(e).__name__}: {e})") from e
            self.config = {**cfg.to_dict(), "model_type": cfg.model_type}
            shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        self._tensors: dict[str, Any] = {}  # transformers name -> the reader's tensor
        self._to_hf = to_hf
        for t in tensors:  # tensors a processor would rename (MoE experts) are not matrices here
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


_OPEN = FileMemo(size=2)  # files kept open per process


def open_gguf(path: Path) -> GGUFFile:
    """``GGUFFile(path)``, kept per process while the file is unchanged: opening parses the metadata
    through transformers (a full ``GGUFReader``) and builds the name map, 5 s for SmolLM2-135M on 2 cores,
    and an experiment worker opens its base for every unit (an edit: twice). A ``GGUFFile`` is read-only."""
    return _OPEN.get(path, None, lambda: GGUFFile(path))


@dataclass(frozen=True)
class Tensor:
    """One entry of a GGUF tensor table: ``shape`` in GGUF's order (fastest dimension first), ``data``
    a read-only memory map shaped as ``gguf.quants.dequantize`` takes it."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class Header:
    """What ``read_header`` found: ``kvs`` holds each metadata entry as (key, value type, first byte,
    end byte, element count for arrays else 1); ``infos`` the byte range of the tensor-info table;
    ``data_start`` the aligned start of the tensor data."""

    architecture: str
    tensors: list[Tensor]
    kvs: list[tuple[str, int, int, int, int]]
    infos: tuple[int, int]
    alignment: int
    data_start: int
    size: int


def tensor_table(path: Path) -> tuple[str, list[Tensor]]:
    """(``general.architecture``, the tensors) of a GGUF v2/v3 file, its metadata values skipped rather
    than built: the same tensors, types, shapes and bytes as ``gguf.GGUFReader`` gives
    (``tests/test_gguf.py``), in milliseconds. Every length and offset is checked against the file."""
    header = read_header(path)
    return header.architecture, header.tensors


def read_header(path: Path) -> Header:
    """The walk behind ``tensor_table``, with where each metadata entry lies in the file."""
    import gguf

    def bad(detail: str) -> InputError:
        return InputError(f"{path}: not a readable GGUF file ({detail})")

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    view, size, pos = memoryview(raw), len(raw), 0  # memoryview slices are cheap; memmap slices are not

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise bad(f"its header runs past the end of the file at byte {pos}")
        pos += n
        return view[pos - n:pos]

    def u32() -> int:
        return int.from_bytes(take(4), "little")

    def u64() -> int:
        return int.from_bytes(take(8), "little")

    def string() -> str:
        return bytes(take(u64())).decode("utf-8", errors="replace")

    def skip(kind: int) -> None:
        if kind == _STRING:
            take(u64())
        elif kind == _ARRAY:
            item, n = u32(), u64()
            if item in _SCALARS:
                take(n * _SCALARS[item])
            else:
                for _ in range(n):
                    skip(item)
        elif kind in _SCALARS:
            take(_SCALARS[kind])
        else:
            raise bad(f"unknown value type {kind} at byte {pos}")

    if u32() != gguf.GGUF_MAGIC:
        raise bad("bad magic")
    if (version := u32()) not in (2, 3):
        raise bad(f"version {version}; lorascope reads versions 2 and 3")
    n_tensors, n_kv = u64(), u64()
    architecture, alignment = None, gguf.GGUF_DEFAULT_ALIGNMENT
    kvs = []
    for _ in range(n_kv):
        begin = pos
        key, kind = string(), u32()
        count = int.from_bytes(view[pos + 4:pos + 12], "little") if kind == _ARRAY else 1
        if key == "general.architecture" and kind == _STRING:
            architecture = string()
        elif key == "general.alignment" and kind == 4:  # UINT32
            alignment = u32()
        else:
            skip(kind)
        kvs.append((key, kind, begin, pos, count))
    infos_begin = pos
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), u32()
        dims = tuple(u64() for _ in range(n_dims))
        infos.append((name, dims, u32(), u64()))
    if architecture is None or alignment <= 0:
        raise bad(f"no general.architecture, or alignment {alignment}")
    infos_end = pos
    start = -(-pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, kind, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError as e:
            raise bad(f"tensor '{name}' has unknown GGML type {kind}") from e
        if name in seen:
            raise bad(f"tensor '{name}' appears twice")
        seen.add(name)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)  # Python ints: a hostile header cannot wrap it around
        if n % block:
            raise bad(f"tensor '{name}' of {n} elements is not whole blocks of {block}")
        n_bytes, begin = n * type_size // block, start + offset
        if begin + n_bytes > size:
            raise bad(f"tensor '{name}' runs past the end of the file")
        shape = tuple(reversed(dims))
        if qtype.name in _PLAIN:
            data = raw[begin:begin + n_bytes].view(_PLAIN[qtype.name]).reshape(shape)
        else:
            data = raw[begin:begin + n_bytes].reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
        tensors.append(Tensor(name, qtype, dims, data))
    return Header(architecture, tensors, kvs, (infos_begin, infos_end), alignment, start, size)


_TOKENIZER_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges"}


def load_metadata(path: Path, header: Header) -> dict[str, Any]:
    """transformers' ``load_gguf_checkpoint(path, return_tensors=False)``, config included, without the
    cost of the tokenizer's arrays: gguf's ``GGUFReader`` builds every array element in Python (SmolLM2's
    49k tokens and merges: 3–4 s; Gemma 3's 262k tokens: 18 s), and the config needs none of them.

    transformers parses a copy of the header with those arrays left out (every other entry and the
    tensor table byte for byte; the tensor data a sparse hole of the same length, never read). The one
    config value transformers derives from them, ``vocab_size`` = the number of tokens when the file has
    no ``{arch}.vocab_size``, is given as that entry. If transformers does not take it (an architecture
    whose map has no ``vocab_size``), the whole file is parsed instead. ``parsed["tokenizer"]`` lacks the
    arrays; nothing here uses it (the tokenizer is built by ``models.load_tokenizer``)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    def whole_file() -> dict[str, Any]:
        return load_gguf_checkpoint(str(path), return_tensors=False)

    counts = {key: count for key, _, _, _, count in header.kvs}
    n_tokens = counts.get("tokenizer.ggml.tokens")
    if not _TOKENIZER_ARRAYS & counts.keys():
        return whole_file()
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    entries = [raw[b:e].tobytes() for key, _, b, e, _ in header.kvs if key not in _TOKENIZER_ARRAYS]
    vocab_key = f"{header.architecture}.vocab_size"
    if n_tokens is not None and vocab_key not in counts:
        name = vocab_key.encode()
        entries.append(len(name).to_bytes(8, "little") + name + (4).to_bytes(4, "little")  # UINT32
                       + n_tokens.to_bytes(4, "little"))
    try:
        with tempfile.TemporaryDirectory(prefix="lorascope-gguf-") as d:
            copy = Path(d) / path.name
            with open(copy, "wb") as f:
                f.write(raw[:16].tobytes())  # magic, version, tensor count
                f.write(len(entries).to_bytes(8, "little"))
                f.writelines(entries)
                f.write(raw[header.infos[0]:header.infos[1]].tobytes())
                start = -(-f.tell() // header.alignment) * header.alignment
                f.truncate(start + header.size - header.data_start)  # a hole: no bytes written
            parsed = load_gguf_checkpoint(str(copy), return_tensors=False)
    except OSError:  # no writable temporary folder: parse the file itself, slower but the same
        return whole_file()
    if n_tokens is not None and parsed["config"].get("vocab_size") is None:
        return whole_file()
    if "kv_count" in parsed.get("ignore", {}):
        parsed["ignore"]["kv_count"] = len(header.kvs)  # the file's, not the copy's
    return parsed


class _Flat:
    """A model as transformers' ``get_gguf_hf_weights_map`` sees it, without its submodules: the map of
    the top-level names only. The function also walks every submodule, rebuilding gguf's name map and
    the state dict at each (SmolLM2-135M: 5.6 s of a 15 s open); the walk is kept for files whose
    matrices the top level does not map."""

    def __init__(self, config: Any, names: list[str]):
        self.config = config
        self._names = names

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list:
        return []


# The state-dict names of known decoder families, per layer ("model.layers.N." + each) and at the top,
# so that a GGUF of one is mapped without building the model on the meta device, which imports
# transformers' modelling code (AutoConfig and the meta model: ~3 s of a SmolLM2 scan on 2 cores). The
# names go through transformers' own ``get_gguf_hf_weights_map``, so each maps as it would from the
# model; a file with any tensor they leave unmapped takes the meta-device route instead.
# tests/test_gguf.py checks every entry against the meta-device model.
_LLAMA = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
          "input_layernorm.weight", "post_attention_layernorm.weight")
_QK_NORM = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
_FFN_NORMS = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
GGUF_LAYOUTS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA + ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "qwen3": _LLAMA + _QK_NORM,
    "gemma2": _LLAMA + _FFN_NORMS,
    "gemma3_text": _LLAMA + _QK_NORM + _FFN_NORMS,
}
_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_NOT_PARAMETERS = ("rope_freqs.weight",)  # LLaMA 3's RoPE factors: no parameter of the model (dropped either way)


def _known_layout(tensors: list[Tensor], config: dict[str, Any],
                  processor: Any) -> tuple[dict[str, str], dict[str, tuple[int, ...]]] | None:
    """(GGUF name -> transformers name, transformers name -> shape) from ``GGUF_LAYOUTS``, or None where
    the family is not in it or the names do not account for every tensor of the file, one to one.
    Shapes are the file's (GGUF lists the fastest dimension first); ``GGUFFile.get`` checks each
    dequantised tensor against them."""
    per_layer = GGUF_LAYOUTS.get(config.get("model_type", ""))
    layers = config.get("num_hidden_layers")
    if per_layer is None or not isinstance(layers, int) or layers < 1:
        return None
    names = [*_TOP, *(f"model.layers.{i}.{n}" for i in range(layers) for n in per_layer)]
    fake = types.SimpleNamespace(model_type=config["model_type"], num_hidden_layers=layers)
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    to_hf = get_gguf_hf_weights_map(_Flat(fake, names), processor)
    tensors = [t for t in tensors if t.name not in _NOT_PARAMETERS]
    mapped = [to_hf.get(t.name) for t in tensors]
    if None in mapped or len(set(mapped)) != len(mapped):
        return None
    return to_hf, {n: tuple(reversed(t.shape)) for n, t in zip(mapped, tensors, strict=True)}
