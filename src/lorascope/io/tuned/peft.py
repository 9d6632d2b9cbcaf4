"""PEFT adapter folders: adapter_config.json plus adapter_model.safetensors (or .bin).

Plain LoRA (incl. rsLoRA, rank_pattern / alpha_pattern, fan_in_fan_out, embeddings, Conv2d, lora_bias)
is read as factors: ΔW = s·B A with s = α/r, or α/√r with rsLoRA (PEFT ``LoraLayer.update_layer``).
LoRA from an init that moved part of W_0 into the adapter (PiSSA, OLoRA, …) is read against the
original base: ΔW = s·B A − M, M rebuilt from W_0 where that is exact, else from the residual model
the user saved after the init (``io.tuned.residual``). LoRA variants (DoRA, KaSA, MiCA, …) and the
other PEFT tuners go through PEFT's own merge, one module at a time (``io.tuned.peft_merge``).
Trainable tokens (``trainable_token_indices``, TRAINABLE_TOKENS) replace rows of an embedding.
Tuners without a weight-matrix update, or that PEFT cannot merge, are refused by name (``REFUSED``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import InputError, MismatchError
from lorascope.io.checkpoint import Checkpoint, MemoryCheckpoint, TensorSource
from lorascope.io.layout import align_names, orient, unorient
from lorascope.io.tuned import residual as res
from lorascope.io.tuned.base import Probe, replacement_delta
from lorascope.io.tuned.peft_merge import PREFIX, PeftMerge
from lorascope.spectral.operators import Delta, LowRankDelta

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_NO_MATRIX = "it learns {what}, not an update of a weight matrix"
_NO_MERGE = "PEFT cannot merge it into the weights: {why}, so there is no single ΔW per matrix"
REFUSED: dict[str, str] = {
    "PROMPT_TUNING": _NO_MATRIX.format(what="virtual prompt tokens"),
    "MULTITASK_PROMPT_TUNING": _NO_MATRIX.format(what="virtual prompt tokens"),
    "P_TUNING": _NO_MATRIX.format(what="virtual prompt tokens (through a prompt encoder)"),
    "PREFIX_TUNING": _NO_MATRIX.format(what="key/value prefixes of the attention layers"),
    "CPT": _NO_MATRIX.format(what="context prompt tokens"),
    "CARTRIDGE": _NO_MATRIX.format(what="a key/value cache prefix"),
    "ADAPTION_PROMPT": _NO_MATRIX.format(what="gated adaption prompts of the attention layers"),
    "LN_TUNING": _NO_MATRIX.format(what="LayerNorm scales and shifts (vectors)"),
    "BEFT": _NO_MATRIX.format(what="bias vectors"),
    "POLY": _NO_MERGE.format(why="a router mixes several LoRA modules per task"),
    "XLORA": _NO_MERGE.format(why="a classifier mixes several LoRA experts per token"),
    "LILY": _NO_MERGE.format(why="a router mixes shared projections per input"),
    "SHADOW": _NO_MERGE.format(why="its update depends on the input (a layer-space trajectory)"),
    # PEFT can merge these, but each module's update depends on every other adapted module of the full
    # architecture, which lorascope does not rebuild (it merges one module at a time)
    "FROD": "its per-layer bases are recomputed at load time from a joint decomposition of the base weights of "
            "every adapted layer, and lorascope merges one module at a time",
    "TINYLORA": "which shared vector a layer uses depends on the order of all adapted modules in the full "
                "architecture, and lorascope merges one module at a time",
    "UNILORA": "its per-layer indices into the shared vector are drawn over all adapted modules of the full "
               "architecture in order, and lorascope merges one module at a time",
}
# LoRA config options that change what the factors mean
_LORA_REFUSED = {
    "target_parameters": "LoRA on target_parameters (nn.Parameter tensors such as MoE expert weights) is not "
                         "supported: lorascope scans the weight matrices of Linear, Conv1D, Embedding and Conv2d "
                         "modules",
    "layer_replication": "LoRA with layer_replication adapts copies of base layers that the base checkpoint "
                         "does not hold (PEFT cannot merge it either)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) applies ΔW only after its invocation tokens; "
                               "PEFT cannot merge it",
    "arrow_config": "Arrow routing mixes several LoRA experts per token; PEFT cannot merge it",
}
# LoRA variants: the update is not s·B A, so PEFT's merge computes it (init "mica" is one too)
_LORA_VARIANTS = ("use_dora", "use_qalora", "use_bdlora", "velora_config", "monteclora_config", "kasa_config")
_LORA_ROLES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
               "lora_B.bias": "B_bias"}
_TOKENS = ("token_adapter.trainable_tokens_delta", "trainable_tokens_delta")


# -- adapter_config.json -----------------------------------------------------------------------------
def load_config(file: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, or an InputError naming the file and what is wrong."""
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise InputError(f"{file}: missing; a PEFT adapter folder needs its adapter_config.json") from None
    except OSError as e:
        raise InputError(f"{file}: cannot be read ({e})") from e
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file}: expected a JSON object of adapter settings, found a JSON {_json_type(config)}")
    return config


def _json_type(v: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_config(config: dict[str, Any], where: str) -> str:
    """The adapter's PEFT type, after checking the fields lorascope reads (InputError naming
    ``where`` and the field otherwise). Refused tuners raise here, by name."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: expected a JSON object of adapter settings, found a JSON {_json_type(config)}")
    if "peft_type" not in config:
        raise InputError(f"{where}: field 'peft_type' is missing (PEFT writes it into every adapter_config.json)")
    ptype = config["peft_type"]
    if not isinstance(ptype, str):
        raise InputError(f"{where}: field 'peft_type' must be a string such as \"LORA\", got {ptype!r}")
    if ptype in REFUSED:
        raise InputError(f"PEFT tuner {ptype} is not supported because {REFUSED[ptype]} ({where})")
    if ptype == "LORA":
        _check_lora(config, where)
        return ptype
    import peft

    if ptype not in peft.PEFT_TYPE_TO_CONFIG_MAPPING or ptype not in peft.PEFT_TYPE_TO_TUNER_MAPPING:
        known = ", ".join(sorted(str(getattr(t, "value", t)) for t in peft.PEFT_TYPE_TO_CONFIG_MAPPING))
        raise InputError(f"{where}: field 'peft_type' is '{ptype}', a tuner that PEFT {peft.__version__} does not "
                         f"know (known: {known})")
    if ptype == "ADALORA":
        _check_lora(config, where, adalora=True)
    return ptype


def _is_mask(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, bool) for x in v)


def _check_lora(config: dict[str, Any], where: str, adalora: bool = False) -> None:
    for key, why in _LORA_REFUSED.items():
        if config.get(key):
            raise InputError(f"PEFT tuner LORA with '{key}' is not supported because {why} ({where})")
    r = config.get("r", 8)
    if not _is_int(r) or r < 1:
        raise InputError(f"{where}: field 'r' must be a whole number of at least 1, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise InputError(f"{where}: field 'lora_alpha' must be a number, got {alpha!r} ({_json_type(alpha)})")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if key in config and not isinstance(config[key], bool) and config[key] is not None:
            raise InputError(f"{where}: field '{key}' must be true or false, got {config[key]!r}")
    # AdaLoRA's rank_pattern is the mask its training kept of each module's ranks: {"<module>.lora_E": [bool]}
    rank_ok = _is_mask if adalora else (lambda v: _is_int(v) and v >= 1)
    rank_what = "lists of true/false" if adalora else "whole numbers of at least 1"
    for key, ok, what in (("rank_pattern", rank_ok, rank_what),
                          ("alpha_pattern", _is_number, "numbers")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise InputError(f"{where}: field '{key}' must be an object {{module pattern: value}}, got {pattern!r}")
        for name, value in pattern.items():
            if not ok(value):
                raise InputError(f"{where}: field '{key}' maps '{name}' to {value!r}; its values must be {what}")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise InputError(f"{where}: field 'init_lora_weights' must be true, false or a method name, got {init!r}")
    tokens = config.get("trainable_token_indices")
    if tokens is not None and not isinstance(tokens, list | dict):
        raise InputError(f"{where}: field 'trainable_token_indices' must be a list or an object, got {tokens!r}")


# -- the format ----------------------------------------------------------------------------------------
class PeftAdapter:
    """A PEFT adapter folder (or the state dict and config ``save_pretrained`` would write)."""

    format = "PEFT adapter"
    kind = "lora"

    def __init__(self, root: Path, config: dict[str, Any], weights: TensorSource, config_file: str | None = None):
        self.root = Path(root)
        self.description = str(self.root)
        self.config_file = config_file or str(self.root / CONFIG_FILE)
        self.weights = weights
        self.unpaired: list[str] = []
        self.residual: TensorSource | None = None
        self.peft_type = check_config(config, self.config_file)
        self.config = config
        self._merge: PeftMerge | None = None
        self._looked = False  # has one module been checked for factors relative to a residual base?
        if self.peft_type != "LORA":  # PEFT's own checks of the tuner's fields, before any tensor is read
            try:
                PeftMerge(config, None, {}, {}, [], self.config_file).peft_config()
            except Exception as e:
                raise InputError(f"{self.config_file}: PEFT rejects this {self.peft_type} config "
                                 f"({type(e).__name__}: {e})") from e
        self._targets: dict[str, tuple[str, tuple[int, ...]]] = {}  # module -> (kind, stored shape)
        self._base_names: dict[str, str] = {}  # module -> base tensor name
        self._residual_names: dict[str, str] = {}  # base tensor name -> residual tensor name
        self._index()

    @classmethod
    def sniff(cls, probe: Probe) -> bool:
        p = probe.path
        return p.is_dir() and any((p / n).is_file() for n in (CONFIG_FILE, *WEIGHT_FILES))

    @classmethod
    def open(cls, probe: Probe) -> PeftAdapter:
        root = probe.path
        config = load_config(root / CONFIG_FILE)
        weights = [root / n for n in WEIGHT_FILES if (root / n).is_file()]
        if not weights:
            raise InputError(f"{root}: adapter_config.json but no adapter_model.safetensors or .bin")
        return cls(root, config, Checkpoint(weights[0]))

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> PeftAdapter:
        """An adapter held in memory: the config and state dict ``save_pretrained`` would write
        (the training tracker's live LoRA factors)."""
        root = "<in-memory adapter>"
        return cls(Path(root), config, MemoryCheckpoint(state, root), config_file=f"{root} config")

    def use_residual(self, residual: TensorSource) -> None:
        """Read the adapter against ``residual``, the model it was trained on (W_res, as saved right
        after a base-changing init): ΔW = W_res + (the adapter's update of W_res) − W_0."""
        self.residual = residual
        self.kind = "peft"
        self.description = f"{self.root} (on residual base {residual.root})"

    @property
    def label(self) -> str:
        """The tuner in words, for messages: 'VERA', 'LORA (DoRA)', 'LORA (init pissa, on a changed base)'."""
        if self.peft_type != "LORA":
            return self.peft_type
        extra = [k for k in _LORA_VARIANTS if self.config.get(k)]
        if res.mutates_base(self.init):
            extra.append(f"init {self.init}, trained on a changed base")
        return "LORA" + (f" ({', '.join(extra)})" if extra else "")

    # -- keys ----------------------------------------------------------------------------------------
    @property
    def file(self) -> str:
        return str(self.weights.file_of(self.weights.keys()[0])) if self.weights.keys() else str(self.root)

    def _prefix(self) -> str:
        if self.peft_type in ("LORA", "ADALORA"):
            return "lora_"
        import peft

        return peft.PEFT_TYPE_TO_TUNER_MAPPING[self.peft_type].prefix

    def _index(self) -> None:
        """Group ``self.weights``' keys by module, check LoRA factors, decide how ΔW is computed."""
        self.init = res.init_of(self.config) if self.peft_type == "LORA" else "true"
        variant = any(self.config.get(k) for k in _LORA_VARIANTS) or self.init == "mica"
        self.plain = self.peft_type == "LORA" and not variant
        self.kind = "lora" if self.plain and not res.mutates_base(self.init) else "peft"
        prefix = self._prefix()
        self._modules: dict[str, dict[str, str]] = {}  # module path -> {role: tensor key}
        self._saved: dict[str, str] = {}  # full weights of modules_to_save: param name -> key
        self._shared: list[str] = []  # tuner-level state (VeRA's projections, VBLoRA's vector bank, …)
        for key in self.weights.keys():
            if key.startswith("base_model.") and not key.startswith(PREFIX):
                self._shared.append(key)
                continue
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            path, role = _split_adapter_key(name, prefix)
            if role is None:
                self._saved[name] = key
            else:
                if self.peft_type in ("LORA", "ADALORA"):
                    role = _LORA_ROLES.get(role, role)
                self._modules.setdefault(path, {})[role] = key
        if not self._modules and not self._saved:
            raise InputError(f"{self.file}: holds no {self.peft_type} adapter tensors"
                             + (f" (only shared state {self._shared[:2]})" if self._shared else ""))
        if any("tokens" in roles for roles in self._modules.values()):
            self.kind = "peft"  # rows of an embedding replaced: not writable as LoRA factors
        if self.peft_type == "LORA":
            for module, roles in self._modules.items():
                self._check_factors(module, roles)
            self.unpaired.extend(roles["B_bias"] for roles in self._modules.values() if "B_bias" in roles)

    def _check_factors(self, module: str, roles: dict[str, str]) -> None:
        if "tokens" in roles:
            if len(roles) > 1:
                raise InputError(f"{self.file}: module '{module}' has both LoRA factors and trainable tokens; "
                                 "this combination is not supported")
            return
        for role, label in (("A", "lora_A"), ("B", "lora_B")):
            if role not in roles:
                raise InputError(
                    f"{self.file}: module '{module}' has no {label} weight ({', '.join(sorted(roles))} only); "
                    f"PEFT would fill the missing factor with a fresh random initialisation"
                )
        if not self.plain:
            return  # variants store factors their own way (BD-LoRA: block-diagonal B); PEFT's load checks them
        sa, sb = self.weights.shape(roles["A"]), self.weights.shape(roles["B"])
        embedding = roles["A"].endswith("lora_embedding_A")
        # Linear: A (r, in), B (out, r); Embedding: A (r, vocab), B (dim, r);
        # Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)
        ra, rb = (sa[0] if sa else 0), (sb[1] if len(sb) > 1 else 0)
        if len(sa) < 2 or len(sb) < 2:
            raise InputError(f"{self.file}: LoRA factors of '{module}' must be matrices, got shapes {tuple(sa)} "
                             f"and {tuple(sb)}")
        if ra == 0 or rb == 0:
            raise InputError(f"{self.file}: module '{module}' has rank-0 LoRA factors (shapes {tuple(sa)}, "
                             f"{tuple(sb)})")
        if ra != rb:
            raise InputError(
                f"{self.file}: LoRA factors of '{module}' do not fit: lora_{'embedding_' if embedding else ''}A "
                f"has rank {ra} (shape {tuple(sa)}) but lora_{'embedding_' if embedding else ''}B has {rb} "
                f"(shape {tuple(sb)})"
            )
        r = self.rank(module)
        if r != ra:
            raise InputError(
                f"{self.file}: module '{module}' has LoRA rank {ra} but {self.config_file} says r={r} for it "
                "(field 'r' / 'rank_pattern'); PEFT cannot load this adapter"
            )

    # -- pairing -------------------------------------------------------------------------------------
    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]:
        wanted = {f"{p}.weight": p for p in self._modules}
        mapping = align_names(base.keys(), list(wanted) + list(self._saved))
        missing = [w for w in wanted if w not in mapping]
        if missing:
            raise MismatchError(
                f"{self.file}: the adapter targets '{wanted[missing[0]]}' "
                f"({len(missing)} module(s) in all) but the base {base.root} has no such weight: wrong base?"
            )
        out: dict[str, str] = {}
        for tuned_name, base_name in mapping.items():
            if tuned_name in self._saved and base_name not in base_kinds:
                continue  # a saved bias or norm weight: not a matrix, nothing to scan
            if base_name not in base_kinds:
                raise MismatchError(
                    f"{self.file}: the adapter changes '{base_name}', which is not a Linear, Conv1D, "
                    "Embedding or Conv2d weight of the base"
                )
            ref = wanted.get(tuned_name, "saved:" + tuned_name)
            out[base_name] = ref
            if not ref.startswith("saved:"):
                self._targets[ref] = (base_kinds[base_name], tuple(base.shape(base_name)))
                self._base_names[ref] = base_name
        self._base = base
        if self.residual is not None:
            self._pair_residual(base, out)
        return out

    def _pair_residual(self, base: TensorSource, pairs: dict[str, str]) -> None:
        names = [b for b, ref in pairs.items() if not ref.startswith("saved:")]
        direct = {b: b for b in names if b in self.residual}
        rest = [b for b in names if b not in direct]
        aligned = align_names(self.residual.keys(), rest) if rest else {}  # base name -> residual name
        for b in names:
            r = direct.get(b) or aligned.get(b)
            if r is None:
                raise MismatchError(f"residual base {self.residual.root} has no weight for '{b}' of the base "
                                    f"{base.root}: is it the model saved right after the adapter's init?")
            if tuple(self.residual.shape(r)) != tuple(base.shape(b)):
                raise MismatchError(f"residual base {self.residual.root}: '{r}' has shape "
                                    f"{tuple(self.residual.shape(r))} but the base's '{b}' has {tuple(base.shape(b))}")
            self._residual_names[b] = r

    # -- ΔW ------------------------------------------------------------------------------------------
    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta:
        if ref.startswith("saved:"):  # modules_to_save: a full replacement weight
            return replacement_delta(self.weights, self._saved[ref[len("saved:"):]], W0, kind)
        roles = self._modules[ref]
        if "tokens" in roles:
            return self._token_delta(ref, roles["tokens"], W0, kind)
        if self.plain:
            d = self._lora_delta(ref, roles, W0, kind)
            if self.kind == "lora" and not self._looked:
                self._look_for_a_residual_base(ref, d, W0, kind)
            if self.residual is not None:
                return (self._residual_delta(ref, W0, kind) + d.to(W0.device, torch.float64).dense()).to(W0.dtype)
            if self._mutated(kind):
                B_M, A_M = self._mutation(ref, W0, kind, d.rank, d.scale)
                B = torch.cat([d.scale * d.B.to(torch.float64), -B_M], 1)
                return LowRankDelta(B.to(W0.dtype), torch.cat([d.A.to(torch.float64), A_M], 0).to(W0.dtype), 1.0)
            return d
        return self._peft_delta(ref, W0, kind)

    def _look_for_a_residual_base(self, ref: str, d: LowRankDelta, W0: torch.Tensor, kind: str) -> None:
        """Warn when a 'plain' LoRA looks trained on a residual base: PEFT's PiSSA recipe saves the
        initial adapter with init_lora_weights rewritten to true and trains it on the residual model,
        so its config says plain LoRA while s·B A still holds W_0's principal part (PiSSA) or the
        projection on its first columns (OLoRA). One module is checked, at the cost of one SVD."""
        self._looked = True
        if kind not in ("linear", "conv1d") or d.rank >= min(W0.shape):
            return
        with torch.no_grad():
            D = d.to(W0.device, torch.float64).dense()
            # ‖M‖ ≥ σ_1(W_0) for PiSSA's M = U_r U_rᵀ W_0, so a ΔW below half a lower bound on σ_1 leaves
            # ‖D − M‖ ≥ ‖M‖ − ‖D‖ > ‖M‖/2: it cannot be a PiSSA part, and W_0's decomposition is skipped
            # (a float64 eigh per adapter, seconds at 7B, for the trained LoRA that nearly every adapter is)
            small = float(torch.linalg.matrix_norm(D)) < 0.5 * res.top_singular_value_bound(W0)
            for init in res.EXACT:
                if init == "pissa" and small:
                    continue
                try:
                    B_M, A_M = res.mutation(init, W0, kind, d.rank, d.scale, ref)
                except InputError:
                    continue
                M = B_M @ A_M
                if float(torch.linalg.matrix_norm(D - M)) < 0.5 * float(torch.linalg.matrix_norm(M)):
                    import warnings

                    warnings.warn(
                        f"{self.file}: the LoRA update of '{ref}' is close to what a {init.upper()} init moves out of "
                        f"W_0 (‖s·BA − M‖ < ‖M‖/2), but {self.config_file} says init_lora_weights="
                        f"{self.config.get('init_lora_weights', True)!r}: if this adapter was trained on a residual "
                        f"model, ΔW against the original base is wrong; pass that model as residual_base / "
                        "--residual-base", stacklevel=4)
                    return

    def _lora_delta(self, ref: str, roles: dict[str, str], W0: torch.Tensor, kind: str) -> LowRankDelta:
        # Conv2d LoRA stores A as (r, in, kh, kw) and B as (out, r, 1, 1): flatten like W0
        A = self.weights.get(roles["A"]).to(W0.device, W0.dtype)
        A = A.reshape(A.shape[0], -1)
        B = self.weights.get(roles["B"]).to(W0.device, W0.dtype)
        B = B.reshape(B.shape[0], -1)
        d = LowRankDelta(B, A, self.scaling(ref, A.shape[0]))
        if d.shape != tuple(W0.shape):
            raise MismatchError(
                f"{self.file}: LoRA factors of '{ref}' give ΔW of shape {d.shape} but the "
                f"base matrix is {tuple(W0.shape)} (layout {kind}): wrong base?"
            )
        return d

    def _mutated(self, kind: str) -> bool:
        """Did the init change this module's base weight (PEFT ``Linear`` / ``Embedding`` / conv layers)?"""
        if not res.mutates_base(self.init):
            return False
        if kind in ("linear", "conv1d"):
            return True
        if self.init in ("loftq", "lora_ga"):  # PEFT's embedding and conv layers run these two as well
            return True
        if kind == "conv2d":
            raise InputError(f"{self.config_file}: PEFT cannot create init_lora_weights='{self.init}' on Conv2d "
                             "layers; this adapter was not written by PEFT")
        return False  # PEFT's Embedding layer ignores PiSSA / OLoRA / CorDA: W_0 stays

    def _mutation(self, ref: str, W0: torch.Tensor, kind: str, r: int, scale: float):
        why = res.needs_residual_reason(self.init)
        if why is not None:
            raise InputError(
                f"{self.config_file}: init_lora_weights='{self.config.get('init_lora_weights')}' changed the base "
                f"weights when the adapter was created, and the saved factors are relative to that residual base "
                f"W_res; lorascope cannot rebuild W_res from the base because {why}. Pass the residual model you "
                "saved right after the init (scan(..., residual_base=PATH) / --residual-base PATH), or save the "
                "adapter with save_pretrained(..., path_initial_model_for_weight_conversion=...)"
            )
        return res.mutation(self.init, W0, kind, r, scale, f"{self.file}: module '{ref}'")

    def _residual_delta(self, ref: str, W0: torch.Tensor, kind: str) -> torch.Tensor:
        name = self._residual_names[self._base_names[ref]]
        return res.residual_delta(self.residual.get(name), W0, kind)

    def _peft_delta(self, module: str, W0: torch.Tensor, kind: str) -> torch.Tensor:
        """ΔW through PEFT itself: the module rebuilt on its base weight, the adapter injected,
        loaded and merged (``peft_merge``). The base weight is W_0, or W_res for a residual base or a
        base-changing LoRA init (then PEFT is told not to run the init again)."""
        W0_64 = W0.to(torch.float64)
        base = W0_64
        mutated = self.peft_type == "LORA" and self._mutated(kind)
        if self.residual is not None:
            base = W0_64 + self._residual_delta(module, W0, kind)
        elif mutated:
            r = self.rank(module)
            B_M, A_M = self._mutation(module, W0, kind, r, self.scaling(module, r))
            base = W0_64 - B_M.to(W0_64.device) @ A_M.to(W0_64.device)
        if self._merge is None:
            overrides = {"init_lora_weights": True} if self.peft_type == "LORA" and res.mutates_base(self.init) else {}
            self._merge = PeftMerge(self.config, self.weights.get, self._targets,
                                    {m: list(r.values()) for m, r in self._modules.items()}, self._shared,
                                    self.file, overrides, self._base_bias)
        stored = unorient(base, kind, self._targets[module][1])
        merged = self._merge.merged(module, stored).to(W0.device)
        return (orient(merged, kind) - W0_64).to(W0.dtype)

    def _base_bias(self, module: str) -> torch.Tensor | None:
        name = self._base_names[module]
        bias = name[: -len("weight")] + "bias" if name.endswith(".weight") else None
        return self._base.get(bias, check_finite=False) if bias is not None and bias in self._base else None

    def _token_delta(self, module: str, key: str, W0: torch.Tensor, kind: str) -> torch.Tensor:
        """Trainable tokens replace rows of the stored weight (``TrainableTokensLayer.merge``)."""
        rows = self.weights.get(key).to(W0.device, W0.dtype)
        stored = unorient(W0, kind, self._targets[module][1])
        idx = self._token_indices(module)
        if rows.ndim != 2 or rows.shape != (len(idx), stored.shape[1]):
            raise InputError(f"{self.file}: '{key}' has shape {tuple(rows.shape)} but {len(idx)} token indices of "
                             f"a weight with rows of {stored.shape[1]} were configured")
        if idx and (min(idx) < 0 or max(idx) >= stored.shape[0]):
            raise MismatchError(f"{self.config_file}: token index {max(idx)} is outside the {stored.shape[0]} rows "
                                f"of '{module}'")
        D = torch.zeros_like(stored)
        index = torch.tensor(idx, device=W0.device, dtype=torch.long)
        D[index] = rows - stored[index]
        return orient(D, kind)

    def _token_indices(self, module: str) -> list[int]:
        field = "token_indices" if self.peft_type == "TRAINABLE_TOKENS" else "trainable_token_indices"
        spec = self.config.get(field)
        if isinstance(spec, dict):
            hits = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
            spec = hits[0] if hits else None
        if not isinstance(spec, list) or not all(_is_int(i) for i in spec):
            raise InputError(f"{self.config_file}: field '{field}' gives no list of token indices for '{module}'")
        return spec

    def bias_changes(self) -> list[str]:
        """Modules whose bias the adapter changes too (lora_bias; IA3, GLoRA, … as seen while merging):
        a weight-matrix scan ignores biases, a merged output written from ΔW alone would lose them."""
        plain = [m for m, roles in self._modules.items() if "B_bias" in roles]
        return sorted(set(plain) | (self._merge.bias_changed if self._merge is not None else set()))

    # -- LoRA bookkeeping ----------------------------------------------------------------------------
    def factor_keys(self, module: str) -> tuple[str, str]:
        """The tensor keys of a LoRA module's B and A factors."""
        roles = self._modules[module]
        return roles["B"], roles["A"]

    def _pattern(self, key: str, module: str, default: Any) -> Any:
        patterns = self.config.get(key) or {}
        if not patterns:
            return default
        from peft.utils.other import get_pattern_key  # importing peft takes seconds: only when needed

        return patterns.get(get_pattern_key(list(patterns), module), default)

    def rank(self, module: str) -> int:
        """PEFT's rank for ``module``: r, or the rank_pattern entry that matches it."""
        return self._pattern("rank_pattern", module, self.config.get("r", 8))

    def scaling(self, module: str, r: int) -> float:
        """PEFT's scaling for ``module``: α/r, or α/√r with use_rslora; α from alpha_pattern if a
        pattern matches (``peft.utils.other.get_pattern_key``)."""
        alpha = self._pattern("alpha_pattern", module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _split_adapter_key(name: str, prefix: str) -> tuple[str, str | None]:
    """'a.b.lora_A.weight' -> ('a.b', 'lora_A.weight'); 'a.b.hada_w1_a' -> ('a.b', 'hada_w1_a');
    trainable tokens -> ('a.b', 'tokens'); a full weight (modules_to_save) -> (name, None)."""
    for tokens in _TOKENS:
        if name.endswith("." + tokens):
            return name[: -len(tokens) - 1], "tokens"
    parts = name.split(".")
    for i, p in enumerate(parts):
        if i and p.startswith(prefix):
            return ".".join(parts[:i]), ".".join(parts[i:])
    return name, None
