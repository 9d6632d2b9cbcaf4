"""Lazy access to the tensors of a model checkpoint: a Hugging Face folder, a hub id or one file.

Nothing is loaded until a tensor is asked for, and then only that tensor, so a scan holds one matrix
pair in memory whatever the model size (mergekit's lazy loader works the same way).

Formats, in order of preference:
- ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (any ``*.safetensors`` index);
- ``pytorch_model.bin`` / sharded ``.bin``, loaded with ``torch.load(weights_only=True, mmap=True)``;
- a single ``.safetensors`` or ``.bin``/``.pt`` file;
- a ``.gguf`` file, dequantised one tensor at a time by the ``gguf`` package (``io/gguf.py``);
- a diffusers pipeline folder (``model_index.json``): every component sub-folder with weights
  (``unet/``, ``transformer/``, ``text_encoder/``, ``vae/``, …), its tensors named
  ``{component}.{name}`` and its config in ``Checkpoint.components``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from lorascope.errors import InputError, NonFiniteError

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_path(spec: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local path for ``spec``: an existing file or folder, else a hub id downloaded by
    huggingface_hub (the only network access lorascope makes, and only when a hub id is named)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if path.is_symlink():
        raise InputError(f"{spec}: a symbolic link to nothing (its target is missing, or it points to itself)")
    text = str(spec)
    local_looking = text.startswith((".", "/", "~")) or text.count("/") > 1 or not _HUB_ID.match(text)
    if local_looking or (text.count("/") == 1 and Path(text.split("/")[0]).is_dir()):
        # `runs/r8` where runs/ is a local folder is a missing path, not a hub repository to download
        raise InputError(f"{spec}: no such file or folder")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt"]
    try:
        local = Path(snapshot_download(text, allow_patterns=patterns))
        if not any(local.glob("*.safetensors")) and allow_patterns is None:
            # Old repositories ship only pickled weights; torch.load(weights_only=True) reads them safely.
            local = Path(snapshot_download(text, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:  # network, auth and missing-repo errors all end the same way for the user
        raise InputError(f"{spec}: not a local path, and the hub download failed: {e}") from e
    return local


class TensorSource(Protocol):
    """What the scan reads weights through: a checkpoint on disk or a model's live state dict."""

    root: Path
    config: dict

    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def file_of(self, name: str) -> Path: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str, check_finite: bool = True) -> torch.Tensor: ...
    def fresh(self, name: str) -> bool:
        """Whether ``get`` returns a new tensor each call (the caller may then change it in place)."""
        ...

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        """``get`` without the finiteness check, into page-locked memory where the source can."""
        ...


class Checkpoint:
    """Read-only, lazy view of one checkpoint's tensors by name (a ``TensorSource``)."""

    def __init__(self, spec: str | os.PathLike):
        self.spec = str(spec)
        self.root = resolve_path(spec)
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        self._gguf: dict[Path, Any] = {}  # GGUF files (io.gguf.GGUFFile)
        self._locations: dict[Path, dict[str, TensorLocation]] = {}  # safetensors byte ranges, parsed once
        self._lock = threading.Lock()
        self._state: dict[str, torch.Tensor] | None = None  # for formats that cannot be read lazily
        self._stored: dict[str, str] = {}  # pipeline tensor name -> its name in the component's file
        self.config: dict = {}
        self.components: dict[str, dict] = {}  # a pipeline's components: name -> its config.json
        self._index()

    # -- discovery -------------------------------------------------------------------------
    def _index(self) -> None:
        root = self.root
        if root.is_dir() and (root / "model_index.json").is_file():
            self._index_pipeline(root)
            cfg = root / "config.json"  # none: each component has its own (``components``)
        elif root.is_file():
            self._index_file(root)
            cfg = root.parent / "config.json"
        else:
            files = _weight_files(root)
            if not files:
                raise InputError(
                    f"{root}: no model weights found (expected *.safetensors, a safetensors index, "
                    "pytorch_model*.bin or a .gguf file)"
                )
            for f in files:
                self._index_file(f)
            cfg = root / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{cfg}: not a readable JSON model config ({e})") from e
            if not isinstance(self.config, dict):
                raise InputError(f"{cfg}: a model config must be a JSON object, got {type(self.config).__name__}")
            quant = self.config.get("quantization_config")
            if isinstance(quant, dict):
                method = quant.get("quant_method") or ("bitsandbytes" if "load_in_4bit" in quant else "unknown")
                raise InputError(
                    f"{cfg}: the weights are quantised ({method}); lorascope compares real-valued weights, so "
                    "dequantise the model with its own library first (e.g. transformers' model.dequantize()) "
                    "or pass the unquantised checkpoint"
                )
        if not self._where:
            raise InputError(f"{root}: the weight files hold no tensors")

    def _index_pipeline(self, root: Path) -> None:
        """A diffusers pipeline: each component listed in model_index.json whose sub-folder holds weights."""
        try:
            index = json.loads((root / "model_index.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{root / 'model_index.json'}: not readable JSON ({e})") from e
        for name, spec in index.items():
            sub = root / name
            if name.startswith("_") or not isinstance(spec, list) or not sub.is_dir():
                continue
            files = _weight_files(sub)
            if not files:
                continue  # scheduler, tokenizer, feature extractor: no weights
            before = set(self._where)
            for f in files:
                self._index_file(f)
            for k in set(self._where) - before:  # name the tensors by component
                self._where[f"{name}.{k}"] = self._where.pop(k)
                if self._state is not None and k in self._state:  # .bin: components may share names
                    self._state[f"{name}.{k}"] = self._state.pop(k)
                else:
                    self._stored[f"{name}.{k}"] = k
            cfg = sub / "config.json"
            try:
                self.components[name] = json.loads(cfg.read_text()) if cfg.is_file() else {}
            except ValueError as e:
                raise InputError(f"{cfg}: not readable JSON ({e})") from e
        if not self.components:
            raise InputError(f"{root}: model_index.json names no component folder with weights")

    def _index_file(self, f: Path) -> None:
        suffix = f.suffix
        if suffix == ".safetensors":
            handle = open_safetensors(f)
            self._handles[f] = handle
            for k in handle.keys():
                self._where[k] = f
        elif suffix in {".bin", ".pt", ".pth"}:
            sd = _torch_load(f)
            if not isinstance(sd, dict):
                raise InputError(f"{f}: expected a state dict of tensors, got {type(sd).__name__}")
            sd = sd.get("state_dict", sd)
            self._state = {**(self._state or {}), **{k: v for k, v in sd.items() if torch.is_tensor(v)}}
            for k in sd:
                self._where[k] = f
        elif suffix == ".gguf":
            from lorascope.io.gguf import open_gguf

            self._gguf[f] = handle = open_gguf(f)
            self.config = dict(handle.config)  # a config.json beside the file, read after this, wins
            for k in handle.names():
                self._where[k] = f
        else:
            raise InputError(f"{f}: unknown weight format '{suffix}' (expected .safetensors, .bin or .gguf)")

    # -- access ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        f, stored = self._where[name], self._stored.get(name, name)
        if f in self._handles:
            return tuple(self._handles[f].get_slice(stored).get_shape())
        if f in self._gguf:
            return self._gguf[f].shape(stored)
        return tuple(self._state[stored].shape)

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        """A safetensors tensor by positioned reads into a fresh (``pin``: page-locked) buffer; other
        formats through ``get``."""
        f, stored = self._where[name], self._stored.get(name, name)
        if f not in self._handles:
            return self.get(name, check_finite=False)
        with self._lock:
            if f not in self._locations:
                self._locations[f] = safetensors_header(f)
        loc = self._locations[f].get(stored)
        if loc is None:  # a dtype torch cannot view raw bytes as (fp8 and friends): the library reads it
            return self._handles[f].get_tensor(stored)
        return read_location(loc, pin)[0]

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of a single safetensors file (kohya files keep their training notes there)."""
        return dict(next(iter(self._handles.values())).metadata() or {}) if len(self._handles) == 1 else {}

    def fresh(self, name: str) -> bool:
        f = self._where[name]
        return f in self._handles or f in self._gguf  # safetensors and GGUF read a new buffer; .bin shares its own

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        """Load one tensor (CPU), raising NonFiniteError if it holds NaN or Inf."""
        if name not in self._where:
            raise InputError(f"{self.root}: no tensor named '{name}'")
        f, stored = self._where[name], self._stored.get(name, name)
        if f in self._handles:
            t = self.read(name)
        elif f in self._gguf:
            t = self._gguf[f].get(stored)
        else:
            t = self._state[stored]
        if check_finite:
            require_finite(t, f, name)
        return t


class MemoryCheckpoint:
    """A ``TensorSource`` over a state dict held in memory (a model in training)."""

    def __init__(self, state: dict[str, torch.Tensor], root: str):
        self._state = state
        self.root = Path(root)
        self.config: dict = {}

    def keys(self) -> list[str]:
        return list(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def file_of(self, name: str) -> Path:
        return self.root

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def fresh(self, name: str) -> bool:
        return False  # the live parameter itself: never to be changed

    def read(self, name: str, pin: bool = False) -> torch.Tensor:
        return self.get(name, check_finite=False)

    def get(self, name: str, check_finite: bool = True) -> torch.Tensor:
        t = self._state[name].detach()
        if check_finite:
            require_finite(t, self.root, name)
        return t


def require_real(t: torch.Tensor, file: Path | str, name: str) -> None:
    """An InputError naming the tensor when a weight matrix is stored as integers or booleans: the
    packed weights of a quantised checkpoint (GPTQ, AWQ, bitsandbytes) are not its values."""
    if not t.is_floating_point():
        raise InputError(
            f"{file}: tensor '{name}' holds {str(t.dtype).replace('torch.', '')} values, not real-valued weights: "
            "a quantised checkpoint must be dequantised with its own library first (GGUF files are read as they are)"
        )


def require_finite(t: torch.Tensor, file: Path | str, name: str) -> None:
    """NonFiniteError naming the file and tensor when a float tensor holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{file}: tensor '{name}' holds NaN or Inf values")


# -- positioned reads of safetensors files ------------------------------------------------------
# safetensors' own readers are not used for the bytes of big tensors: its memory map counts every
# page touched in the process's resident set (an 8 GB pair shows 8 GB RSS), and its pread backend
# (0.8) read at 0.5 GB/s here and held the GIL, so reader threads could not overlap: a cached 7B scan
# took 23 s on an H200 against 3 s with the plain reads below (docs/performance.md).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# -- reading tensors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check every entry
    against the file size, so a truncated or malformed file fails here with its name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise InputError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise InputError(f"{path}: not a safetensors file (unreadable header: {e})") from e
    out: dict[str, TensorLocation] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if dtype is None:
            continue  # fp8 and friends: read through Checkpoint.get instead
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or 8 + n + end > size or begin < 0:
            raise InputError(f"{path}: tensor '{name}' has byte range {begin}..{end}, which does not fit "
                             f"its shape {list(shape)} or the file ({size} bytes)")
        out[name] = TensorLocation(path, name, dtype, shape, 8 + n + begin, end - begin)
    return out


def read_location(loc: TensorLocation, pin: bool = False) -> tuple[torch.Tensor, memoryview]:
    """Read one tensor's bytes with plain reads (no mmap) into a fresh, optionally pinned, buffer."""
    buf = torch.empty(loc.nbytes, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buf.numpy()) if loc.nbytes else memoryview(bytearray())
    with open(loc.file, "rb", buffering=0) as f:
        f.seek(loc.offset)
        done = 0
        while done < loc.nbytes:  # a raw read may return fewer bytes than asked: loop until complete
            got = f.readinto(view[done:])
            if not got:
                raise InputError(f"{loc.file}: tensor '{loc.name}' is truncated (the file ends early)")
            done += got
    return buf.view(loc.dtype).reshape(loc.shape), view


def _torch_load(f: Path) -> Any:
    """A pickled checkpoint through ``torch.load(weights_only=True)`` (no code runs): memory-mapped when
    it is a zip archive (torch ≥ 1.6), read whole when it is the legacy format, which cannot be mapped."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = e
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{f}: cannot be read with torch.load(weights_only=True): {e or first}") from e


def open_safetensors(f: Path):
    """safetensors' lazy reader, for names, shapes and dtypes (the library checks the header and every
    tensor's byte range against the file when it opens); bytes are read by ``Checkpoint.read``."""
    try:
        return safe_open(str(f), framework="pt")
    except Exception as e:
        raise InputError(f"{f}: not a readable safetensors file ({e})") from e


def _weight_files(root: Path) -> list[Path]:
    """The weight files of a folder, safetensors first; shards come from the index when present."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        # the plain index before variants (diffusion_pytorch_model.fp16.safetensors.index.json)
        for index in sorted(root.glob(pattern), key=lambda p: (p.name.count("."), p.name)):
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted({root / v for v in weight_map.values()})
            missing = [s for s in shards if not s.is_file()]
            if missing:
                raise InputError(f"{index}: names shard {missing[0].name}, which is missing")
            return shards
    patterns = ("model.safetensors", "diffusion_pytorch_model.safetensors", "*.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin", "*.bin", "*.gguf")
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if not p.name.startswith("adapter_"))
        if found:
            return found[:1] if pattern.endswith(".gguf") else found
    return []
