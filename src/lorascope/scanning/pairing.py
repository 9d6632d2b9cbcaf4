"""Which matrices a scan compares: base weight names paired with the tuned source's references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorascope.errors import InputError
from lorascope.io.layout import matrix_kinds

if TYPE_CHECKING:
    from lorascope.io.checkpoint import TensorSource
    from lorascope.io.tuned import TunedSource
    from lorascope.scanning.options import ScanOptions


@dataclass
class MatrixPair:
    name: str  # base tensor name
    kind: str  # layout: linear | conv1d | embedding | conv2d (io.layout)
    ref: str  # the tuned source's reference for it


def pair_matrices(
    base: TensorSource, tuned: TunedSource, options: ScanOptions
) -> tuple[list[MatrixPair], dict[str, list[str]]]:
    """The matrices to scan, in base order, and what could not be paired (reported, not hidden)."""
    kinds = matrix_kinds(base)
    mapping = tuned.pair(base, kinds)
    pattern = options.modules_pattern()
    pairs, skipped = [], {"embeddings_not_requested": [], "not_matching_modules": []}
    for name, kind in kinds.items():
        if name not in mapping:
            continue
        if kind == "embedding" and not options.embeddings:
            skipped["embeddings_not_requested"].append(name)
        elif pattern is not None and not pattern.search(name):
            skipped["not_matching_modules"].append(name)
        else:
            pairs.append(MatrixPair(name, kind, mapping[name]))
    if not pairs:
        raise InputError(
            f"no weight matrix to scan between {base.root} and {tuned.description}"
            + (f" matching --modules '{options.modules}'" if options.modules else "")
        )
    skipped["base_only"] = sorted(set(kinds) - set(mapping)) if tuned.kind == "full" else []
    skipped["not_in_base"] = list(getattr(tuned, "unpaired", []))
    return pairs, {k: v for k, v in skipped.items() if v}
