"""LyCORIS files: kohya-style module names with LoHa, LoKr, LoCon (Tucker), full-diff or plain LoRA tensors.

One ``.safetensors`` file; each tensor is ``{name}.{suffix}`` with ``name`` a kohya module name
(``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``, or ``lycoris_…`` from LyCORIS' own
wrapper) and the module type given by its suffixes. ΔW per module, exactly as lycoris-lora 4.1
builds the weight its forward pass adds (``LycorisBaseModule.get_weight`` / ``make_weight``, i.e.
``lycoris.functional.{locon,loha,lokr}.diff_weight``), with r the module's rank and alpha its
``alpha`` tensor (absent or 0: alpha = r, as LyCORIS loads it):

- LoCon / LoRA / DyLoRA: ``lora_up`` (out, r[, 1, 1]), ``lora_down`` (r, in[, kh, kw]):
  ΔW = (alpha/r) · up @ down; Tucker conv (``lora_mid`` (r, r, kh, kw), ``lora_down`` (r, in, 1, 1)):
  ΔW[o, c, ·] = (alpha/r) · Σ_ij mid[i, j, ·] · up[o, i] · down[j, c]. Both are rank ≤ r and returned
  as factors (``LowRankDelta``).
- LoHa: ΔW = (alpha/r) · (w1a @ w1b) ⊙ (w2a @ w2b), r = w1b.shape[0]; Tucker (``hada_t1``/``hada_t2``):
  each half is Σ_ij t[i, j, ·] · wa[i, o] · wb[j, c].
- LoKr: ΔW = scale · kron(w1, w2) with w1 = ``lokr_w1`` or w1a @ w1b, w2 = ``lokr_w2`` or w2a @ w2b,
  or Tucker Σ_ij t2[i, j, ·] · w2a[i, o] · w2b[j, c]; scale = alpha/r with r = w1b.shape[0] (else
  w2b.shape[0]), and scale = 1 when both halves are full matrices (LyCORIS ignores alpha then).
- full (``diff``): ΔW = diff.

LoHa, LoKr and full updates are full-rank in general: ΔW comes back dense, one matrix at a time.
Conv weights are flattened to (out, in·kh·kw) like ``io.layout.orient``. Types whose update is not
one of these (GLoRA, BOFT, Diag-OFT / kohya OFT, IA3, T-LoRA, DoRA weight decomposition) are refused
by name. Norm-layer modules (``w_norm``/``b_norm``) change no weight matrix and are listed as unpaired.

lycoris-lora 4.1's ``get_diff_weight`` (used by ``merge_to``) multiplies LoHa and LoKr weights by
alpha/r a second time; its forward pass and every other loader (kohya sd-scripts, ComfyUI, A1111)
scale once. lorascope follows the forward pass: the weights a model runs with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorascope.errors import InputError, MismatchError
from lorascope.io.checkpoint import Checkpoint, TensorSource
from lorascope.io.tuned.base import Probe, lowrank_delta, scalar
from lorascope.io.tuned.components import KOHYA_PREFIXES, flat, kohya_split, pair_modules
from lorascope.spectral.operators import Delta

LORA = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL = {"diff", "diff_b"}
NORM = {"w_norm", "b_norm"}
# suffix -> (type, why it cannot be read exactly)
REFUSED = {
    "dora_scale": ("DoRA (weight decomposition)", "the merged weight is W₀ + ΔW renormalised per row or column "
                   "to dora_scale, which lorascope does not rebuild"),
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"),
                    ("GLoRA", "its update mixes W₀ into ΔW through GLoRA's own a/b products, which lorascope "
                     "does not rebuild")),
    **dict.fromkeys(("oft_blocks", "rescale"),
                    ("BOFT / Diag-OFT", "it rotates W₀ by an orthogonal matrix built from oft_blocks instead of "
                     "adding an update, and lorascope does not rebuild that rotation")),
    **dict.fromkeys(("on_input", "weight"),
                    ("IA3", "it rescales W₀'s rows or columns by a learned vector instead of adding an update")),
    **dict.fromkeys(("q_layer.weight", "p_layer.weight", "lambda_layer"),
                    ("T-LoRA", "its update depends on the diffusion timestep")),
    "lokr_t1": ("LoKr with a Tucker w1 (lokr_t1)", "LyCORIS itself never builds w1 from a Tucker core"),
}
LYCORIS_ONLY = (LOHA | LOKR | FULL | NORM | set(REFUSED) | {"lora_mid.weight"}) - {"weight"}


def _kohya_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.hada_w1_a' -> ('lora_unet_x', 'hada_w1_a') for kohya-style names, else None."""
    stem, _, suffix = key.partition(".")
    return (stem, suffix) if suffix and stem.startswith(tuple(KOHYA_PREFIXES)) else None


class LycorisFile:
    """A LyCORIS file as a TunedSource (see the module docstring for the update of each type)."""

    format = "LyCORIS"
    kind = "lycoris"
    peft_type = "LyCORIS"  # for the mitigation message that this cannot be written as a LoRA adapter

    def __init__(self, path: Path, weights: Checkpoint):
        self.root = path
        self.weights = weights
        self.description = str(path)
        self.modules: dict[str, dict[str, str]] = {}  # kohya module name -> {suffix: key}
        for key in weights.keys():
            split = _kohya_key(key)
            if split is None or split[1] not in LORA | LOHA | LOKR | FULL | NORM | set(REFUSED):
                raise InputError(f"{path}: tensor '{key}' is not a LyCORIS tensor of a kohya-named module")
            self.modules.setdefault(split[0], {})[split[1]] = key
        self.types: dict[str, str] = {}
        for stem, parts in self.modules.items():
            refused = [s for s in parts if s in REFUSED and not (s == "weight" and "on_input" not in parts)]
            if refused:
                what, why = REFUSED[refused[0]]
                if refused[0] == "oft_blocks" or refused[0] == "rescale":
                    blocks = parts.get("oft_blocks")
                    ndim = len(weights.shape(blocks)) if blocks else 0
                    what = "BOFT" if ndim == 4 else "Diag-OFT (or kohya OFT)"
                raise InputError(f"{path}: LyCORIS {what} ('{parts[refused[0]]}') is not supported because {why}")
            self.types[stem] = self._type(stem, parts)
        self.unpaired: list[str] = [s for s, t in self.types.items() if t == "norm"]

    def _type(self, stem: str, parts: dict[str, str]) -> str:
        def need(*names: str) -> None:
            missing = [n for n in names if n not in parts]
            if missing:
                raise InputError(f"{self.root}: module '{stem}' has no '{stem}.{missing[0]}' tensor")

        if parts.keys() & LOHA:
            need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
            if ("hada_t1" in parts) != ("hada_t2" in parts):
                need("hada_t1", "hada_t2")
            return "loha"
        if parts.keys() & LOKR:
            if "lokr_w1" not in parts:
                need("lokr_w1_a", "lokr_w1_b")
            if "lokr_w2" not in parts:
                need("lokr_w2_a", "lokr_w2_b")
            return "lokr"
        if "diff" in parts:
            return "full"
        if parts.keys() & NORM:
            return "norm"
        need("lora_down.weight", "lora_up.weight")
        return "locon"

    @classmethod
    def sniff(cls, probe: Probe) -> bool:
        return any((s := _kohya_key(k)) is not None and s[1] in LYCORIS_ONLY for k in probe.ckpt.keys())

    @classmethod
    def open(cls, probe: Probe) -> LycorisFile:
        return cls(probe.path, probe.ckpt)

    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]:
        modules = {}
        for stem, t in self.types.items():
            if t != "norm":
                comps, module = kohya_split(stem)
                modules[stem] = (comps, [module])
        out, unpaired = pair_modules(modules, base, base_kinds, key=flat, source=self.description)
        self.unpaired = unpaired + [s for s, t in self.types.items() if t == "norm"]
        if not out:
            raise MismatchError(
                f"{self.description}: none of its {len(modules)} LyCORIS modules (e.g. "
                f"'{next(iter(modules), '')}') is a weight of {base.root}: wrong base or component?"
            )
        return out

    def _get(self, stem: str, suffix: str, W0: torch.Tensor) -> torch.Tensor | None:
        key = self.modules[stem].get(suffix)
        return None if key is None else self.weights.get(key).to(W0.device, W0.dtype)

    def _alpha(self, stem: str, r: int) -> float:
        key = self.modules[stem].get("alpha")
        alpha = scalar(self.weights, key) if key is not None else 0.0
        return alpha if alpha != 0 else float(r)  # LyCORIS: alpha None or 0 means alpha = r

    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta:
        t = self.types[ref]
        get = lambda s: self._get(ref, s, W0)  # noqa: E731
        try:
            if t == "locon":
                up, down, mid = get("lora_up.weight"), get("lora_down.weight"), get("lora_mid.weight")
                r = down.shape[0]
                if mid is not None:  # Tucker: fold the core into the down factor, still rank r
                    down = torch.einsum("ij...,jc->ic...", mid, down.reshape(r, -1))
                return lowrank_delta(up, down, self._alpha(ref, r) / r, W0, self.description, ref)
            if t == "loha":
                w1a, w1b, w2a, w2b = get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b")
                t1, t2 = get("hada_t1"), get("hada_t2")
                r = w1b.shape[0]
                if t1 is not None:
                    w1 = torch.einsum("ij...,jc,io->oc...", t1, w1b, w1a)
                    w2 = torch.einsum("ij...,jc,io->oc...", t2, w2b, w2a)
                else:
                    w1 = w1a.reshape(-1, w1a.shape[1]) @ w1b.reshape(r, -1)
                    w2 = w2a.reshape(-1, w2a.shape[1]) @ w2b.reshape(w2b.shape[0], -1)
                if w1.shape != w2.shape:
                    raise RuntimeError(f"the two Hadamard halves have shapes {tuple(w1.shape)} and {tuple(w2.shape)}")
                d = (w1 * w2) * (self._alpha(ref, r) / r)
            elif t == "lokr":
                w1, w2 = get("lokr_w1"), get("lokr_w2")
                r = None
                if w1 is None:
                    w1b = get("lokr_w1_b")
                    r = w1b.shape[0]
                    w1 = get("lokr_w1_a") @ w1b
                if w2 is None:
                    w2a, w2b, t2 = get("lokr_w2_a"), get("lokr_w2_b"), get("lokr_t2")
                    r = r or w2b.shape[0]
                    if t2 is not None:
                        w2 = torch.einsum("ij...,io,jc->oc...", t2, w2a, w2b)
                    else:
                        w2 = (w2a @ w2b.reshape(w2b.shape[0], -1)).reshape(-1, *w2b.shape[1:])
                w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
                d = torch.kron(w1, w2) * (1.0 if r is None else self._alpha(ref, r) / r)
            else:  # full
                d = get("diff")
        except (RuntimeError, IndexError, ValueError) as e:  # factors whose shapes do not multiply
            raise InputError(f"{self.description}: the {t} tensors of '{ref}' do not fit together ({e})") from e
        if d.numel() != W0.numel() or d.shape[0] != W0.shape[0]:
            raise MismatchError(
                f"{self.description}: LyCORIS {t} module '{ref}' gives ΔW of shape {tuple(d.shape)} but the "
                f"base matrix is {tuple(W0.shape)}: wrong base?"
            )
        return d.reshape(W0.shape)
