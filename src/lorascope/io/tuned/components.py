"""Which model of a diffusion pipeline an adapter module belongs to, and pairing modules with base weights.

Adapters for diffusion models name their modules behind a component prefix: ``unet.`` /
``transformer.`` / ``text_encoder.`` / ``text_encoder_2.`` in diffusers files, ``lora_unet_`` /
``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` in kohya and LyCORIS files. The base is either one
model (a UNet, a text encoder: one component, unnamed) or a pipeline folder
(``Checkpoint.components``: its tensors are named ``{component}.{name}``).

``pair_modules`` pairs each module with the base weight it updates:
- pipeline base: a module goes to the component its prefix names (a prefix naming no component
  of this pipeline: unpaired); an unprefixed module goes to the component that pairs the most;
- one-model base: the component (prefix group) that pairs the most modules is the base's; every
  module of the other components is unpaired (reported by the scan, never silently dropped).
"""

from __future__ import annotations

from collections.abc import Callable

from lorascope.errors import InputError
from lorascope.io.checkpoint import TensorSource

# kohya / LyCORIS name prefixes -> the diffusers components they may stand for, in order
KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("unet", "transformer"),
    "lora_transformer_": ("transformer",),
    "lora_te1_": ("text_encoder",),
    "lora_te2_": ("text_encoder_2",),
    "lora_te3_": ("text_encoder_3",),
    "lora_te_": ("text_encoder",),
    "lycoris_": (),  # LyCORIS' own wrapper (create_lycoris): one model, no component
}
# first parts of diffusers adapter keys that name a component
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior",
                        "decoder", "controlnet")


def kohya_split(stem: str) -> tuple[tuple[str, ...], str]:
    """'lora_te2_text_model_…' -> (('text_encoder_2',), 'text_model_…'); no known prefix -> ((), stem)."""
    for prefix, comps in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            return comps, stem[len(prefix):]
    return (), stem


def flat(path: str) -> str:
    """A module path as kohya writes it: dots replaced by underscores."""
    return path.replace(".", "_")


def base_modules(base: TensorSource, base_kinds: dict[str, str],
                 key: Callable[[str], str] = lambda p: p) -> dict[str, dict[str, str]]:
    """{component ('' for a one-model base): {key(module path): base weight name}} of the base's matrices."""
    comps = sorted(getattr(base, "components", None) or {}, key=len, reverse=True)
    out: dict[str, dict[str, str]] = {c: {} for c in comps} or {"": {}}
    for name in base_kinds:
        if not name.endswith(".weight"):
            continue
        comp = next((c for c in comps if name.startswith(c + ".")), "")
        path = name[len(comp) + 1 if comp else 0: -len(".weight")]
        out.setdefault(comp, {})[key(path)] = name
    return out


def pair_modules(
    modules: dict[str, tuple[tuple[str, ...], list[str]]],
    base: TensorSource,
    base_kinds: dict[str, str],
    key: Callable[[str], str] = lambda p: p,
    source: str = "",
) -> tuple[dict[str, str], list[str]]:
    """Pair adapter modules with base weights: ``modules`` maps each module's reference to (the
    components its prefix may stand for, candidate module paths in the order to try). ``key`` turns
    a base module path into the form of those candidates (``flat`` for kohya names). Returns
    ({base weight name: module reference}, unpaired module references)."""
    index = base_modules(base, base_kinds, key)
    pipeline = bool(getattr(base, "components", None))
    groups: dict[tuple[str, ...], list[str]] = {}
    for ref, (comps, _) in modules.items():
        groups.setdefault(comps, []).append(ref)

    def hits(refs: list[str], comp: str) -> dict[str, str]:
        found = {}
        for ref in refs:
            name = next((index[comp][c] for c in modules[ref][1] if c in index[comp]), None)
            if name is not None:
                found[ref] = name
        return found

    chosen: dict[tuple[str, ...], dict[str, str]] = {}
    if pipeline:
        for comps, refs in groups.items():
            present = [c for c in comps if c in index]
            if present:
                chosen[comps] = hits(refs, present[0])
            elif not comps:  # unprefixed names: the component they fit best
                chosen[comps] = max((hits(refs, c) for c in index), key=len)
    else:
        best = max(groups, key=lambda g: (len(hits(groups[g], "")), g == ()))
        chosen[best] = hits(groups[best], "")
    mapping: dict[str, str] = {}
    for found in chosen.values():
        for ref, name in found.items():
            if name in mapping:
                raise InputError(f"{source}: modules '{mapping[name]}' and '{ref}' both update '{name}'")
            mapping[name] = ref
    paired = set(mapping.values())
    return mapping, [ref for ref in modules if ref not in paired]
