"""Which tensors are weight matrices, in which layout, and how names line up between checkpoints.

Layouts ("kinds"):
- ``linear``: torch.nn.Linear, stored (out, in): W as stored.
- ``conv1d``: GPT-2's transformers Conv1D, stored (in, out): W = storedᵀ.
- ``embedding``: torch.nn.Embedding, stored (vocab, dim). As a linear map one-hot → vector its
  matrix is storedᵀ (dim × vocab), so its left singular vectors live in the hidden space like a
  Linear layer's outputs (and the Gram matrix is dim × dim, not vocab × vocab).
- ``conv2d``: torch.nn.Conv2d, stored (out, in, kh, kw): W = stored flattened to (out, in·kh·kw),
  the matrix that acts on an unfolded patch (how LoRA/LoCon factor convolutions).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable

import torch

from lorascope.errors import InputError
from lorascope.io.checkpoint import TensorSource

_CONV1D_NAME = re.compile(r"(^|\.)(c_attn|c_fc|c_proj|q_attn)\.weight$")
_EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type|shared)")


def orient(stored: torch.Tensor, kind: str) -> torch.Tensor:
    """The (out, in) matrix W of a stored weight."""
    if kind == "conv2d":
        return stored.reshape(stored.shape[0], -1)
    return stored if kind == "linear" else stored.T


def unorient(W: torch.Tensor, kind: str, stored_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of ``orient``: back to the stored layout (conv2d needs the stored shape)."""
    if kind == "conv2d":
        if stored_shape is None:
            raise ValueError("unorient of a conv2d matrix needs the stored shape")
        return W.reshape(stored_shape)
    return W if kind == "linear" else W.T


def matrix_kinds(ckpt: TensorSource) -> dict[str, str]:
    """Map every 2-D (and 4-D conv) weight of ``ckpt`` to its kind.

    Known transformers architectures (``NAME_RULES``) are read from tensor names alone. Others come
    from instantiating the architecture on the meta device (no memory, no weights, no remote code): a
    transformers ``model_type`` or a diffusers ``_class_name`` config, so Conv1D and Embedding are
    known exactly. Without an architecture either library can build the kinds come from names and
    shapes: 4-D → Conv2d, 2-D → Linear unless the module's own name says embedding. That guess is
    refused where it could be wrong — GPT-2-style ``c_attn``/``c_fc``/``c_proj`` weights may be Conv1D
    (stored transposed) — and announced with a warning naming the tensors when a ``model_type`` was
    given but could not be built. A diffusers pipeline folder (``Checkpoint.components``) is read one
    component at a time, each with its own config.
    """
    parts = getattr(ckpt, "components", None) or {"": ckpt.config}
    names = [k for k in ckpt.keys() if k.endswith(".weight") and len(ckpt.shape(k)) in (2, 4)]
    out: dict[str, str] = {}
    for prefix, config in parts.items():
        mine = [n for n in names if not prefix or n.startswith(prefix + ".")]
        local = {n: n[len(prefix) + 1:] if prefix else n for n in mine}
        rule = NAME_RULES.get((config or {}).get("model_type", ""))
        if rule is not None:  # a known architecture: its names say it all, no need to import transformers
            out.update({n: _by_name(local[n], len(ckpt.shape(n)), conv1d=rule == "gpt2") for n in mine})
            continue
        by_module, why = _module_kinds(config) if config else ({}, "no config.json beside the weights")
        if not by_module:
            _check_guess(ckpt, config or {}, mine, why)
            out.update({n: _by_name(local[n], len(ckpt.shape(n))) for n in mine})
            continue
        out.update({n: kind for n in mine if (kind := _lookup(by_module, local[n])) is not None})
    return out


# Architectures whose layouts follow from tensor names alone ("linear": every 2-D weight is a Linear
# but the embeddings, named so; "gpt2": c_attn/c_fc/c_proj are Conv1D as well). Building the model
# on the meta device would import transformers' modelling code, seconds of every scan's start-up.
# tests/test_layout.py checks each entry against the meta-device model.
NAME_RULES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "olmo2", "granite", "bert", "roberta", "xlm-roberta", "distilbert", "gpt_neox", "opt"),
                    "linear"),
    **dict.fromkeys(("gpt2",), "gpt2"),
}


def _by_name(name: str, ndim: int, conv1d: bool = False) -> str:
    """The kind from a (component-local) tensor name and its number of dimensions."""
    if ndim == 4:
        return "conv2d"
    if conv1d and _CONV1D_NAME.search(name):
        return "conv1d"
    module = name.split(".")[-2] if "." in name else name  # "time_embedding.linear_1" is a Linear
    return "embedding" if _EMBEDDING_NAME.search(module) else "linear"


def _check_guess(ckpt: TensorSource, config: dict, names: list[str], why: str) -> None:
    """Refuse or announce a layout guessed from names (see ``matrix_kinds``)."""
    ambiguous = [n for n in names if len(ckpt.shape(n)) == 2 and _CONV1D_NAME.search(n)]
    if ambiguous:
        raise InputError(
            f"{ckpt.root}: cannot tell whether '{ambiguous[0]}' ({len(ambiguous)} such matrices) is a Linear or a "
            f"GPT-2 Conv1D weight (stored transposed), because the architecture is unknown: {why}. Pass the model "
            "folder with a config.json that transformers can build"
        )
    if config.get("model_type"):
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"{ckpt.root}: {why}; the layouts of {len(names)} matrices ({shown}) are taken from their names and "
            "shapes: Linear unless named like an embedding, 4-D as Conv2d", LayoutWarning, stacklevel=3,
        )


class LayoutWarning(UserWarning):
    """Matrix layouts were guessed from tensor names because the architecture could not be built."""


def _module_kinds(config: dict) -> tuple[dict[str, str], str]:
    """({parameter-name suffix: kind} from a meta-device instance of the architecture, ""), or
    ({}, why not)."""
    if "_class_name" in config and "model_type" not in config:  # a diffusers model (UNet, DiT, VAE, …)
        model = _diffusers_meta_model(config)
        if model is None:
            return {}, f"diffusers cannot build '{config['_class_name']}'"
        return _index_kinds(model), ""
    if not config.get("model_type"):
        return {}, "its config.json names no transformers model_type"
    try:
        import transformers

        cfg_cls = transformers.AutoConfig.for_model(config["model_type"])
        cfg = cfg_cls.from_dict({k: v for k, v in config.items() if k != "auto_map"})
        arch = (config.get("architectures") or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = model_cls._from_config(cfg) if model_cls else transformers.AutoModel.from_config(cfg)
    except Exception as e:  # unknown, custom or broken architecture: names, checked by _check_guess
        detail = " ".join(str(e).split())  # one line, however the library formats it
        return {}, f"transformers cannot build model_type '{config.get('model_type')}' ({type(e).__name__}: {detail})"
    return _index_kinds(model), ""


def _diffusers_meta_model(config: dict):
    """A meta-device instance of a diffusers model class from its config, or None."""
    try:
        import diffusers

        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception:  # diffusers missing, or a class it does not know: fall back to names
        return None


def _index_kinds(model: torch.nn.Module) -> dict[str, str]:
    from transformers.pytorch_utils import Conv1D

    kinds: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kind = "conv1d"
        elif isinstance(module, torch.nn.Conv2d):
            kind = "conv2d"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        else:
            continue
        kinds[f"{mod_name}.weight"] = kind
    # index every dotted suffix, so "bert.encoder.x.weight" and "encoder.x.weight" both resolve
    index: dict[str, str] = {}
    clash: set[str] = set()
    for full, kind in kinds.items():
        parts = full.split(".")
        for i in range(len(parts) - 1):
            suffix = ".".join(parts[i:])
            if suffix in index and index[suffix] != kind:
                clash.add(suffix)
            index.setdefault(suffix, kind)
    for s in clash:
        index.pop(s, None)
    return index


def _lookup(index: dict[str, str], name: str) -> str | None:
    parts = name.split(".")
    for i in range(len(parts) - 1):
        kind = index.get(".".join(parts[i:]))
        if kind is not None:
            return kind
    return None


def _strips(name: str) -> list[tuple[str, str]]:
    """(prefix, rest) for each way to cut the first 0, 1 or 2 components off a name (always leaving two)."""
    parts = name.split(".")
    out = [("", name)]
    for depth in (1, 2):
        if len(parts) > depth + 1:
            out.append((".".join(parts[:depth]) + ".", ".".join(parts[depth:])))
    return out


def align_names(base_keys: Iterable[str], tuned_keys: Iterable[str]) -> dict[str, str]:
    """Map tuned names to base names.

    Identical names always pair. The rest are paired when the two checkpoints wrap the same backbone
    differently (``bert.encoder.…`` in a classifier against ``encoder.…`` in the bare model, PEFT's
    module paths against checkpoint keys, ``unet.…`` in a pipeline against a bare UNet): of every
    (strip, add) pair of up to two leading components, the one that pairs the most of the remaining
    names is used. Each base name pairs at most once; names that pair under neither are left out."""
    base = set(base_keys)
    tuned = list(dict.fromkeys(tuned_keys))
    mapping = {k: k for k in tuned if k in base}
    rest = [k for k in tuned if k not in mapping]
    free = base - set(mapping)
    if not rest or not free:
        return mapping
    added: dict[str, list[str]] = {}  # rest of a free base name -> the prefixes it can be cut at
    for b in free:
        for pb, tail in _strips(b):
            added.setdefault(tail, []).append(pb)
    votes: Counter = Counter()
    for k in rest:
        for pt, tail in _strips(k):
            for pb in added.get(tail, ()):
                if pt != pb:
                    votes[(pt, pb)] += 1
    if not votes:
        return mapping
    # most names first; on a tie the shortest change, then the alphabet (the same answer every time)
    (pt, pb), _ = min(votes.items(), key=lambda kv: (-kv[1], len(kv[0][0]) + len(kv[0][1]), kv[0]))
    for k in rest:
        if k.startswith(pt) and (b := pb + k[len(pt):]) in free:
            mapping[k] = b
            free.discard(b)
    return mapping
