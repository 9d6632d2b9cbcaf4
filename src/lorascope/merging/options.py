"""A merge's settings, in one place: ``merge``, the CLI's defaults and the ``merge`` study read them.

Torch-free, so that ``lorascope --help`` can take its defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorascope.errors import InputError
from lorascope.settings import Settings

METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "knots_ties", "knots_dare", "emr")
SPARSIFYING = ("ties", "dare_linear", "dare_ties", "knots_ties", "knots_dare")  # the ones that take a density
FORMATS = ("adapter", "merged")
DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class MergeOptions(Settings):
    """``method``: one of ``METHOD_NAMES``; ``weights``: one per input (default 1 each; EMR takes none);
    ``density``: the fraction kept by TIES' trim or DARE's drop (default 0.5; only those methods);
    ``seed``: DARE's random masks; ``format``: ``adapter`` (a PEFT LoRA whose ΔW is the merge exactly)
    or ``merged`` (a model); ``modules`` / ``embeddings``: which matrices, as in ``ScanOptions``;
    ``device``: auto, cpu or cuda (the arithmetic is float64)."""

    method: str = "task_arithmetic"
    weights: tuple[float, ...] | None = None
    density: float | None = None
    seed: int = 0
    format: str = "adapter"
    modules: str | None = None
    embeddings: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise InputError(f"--method: unknown merge method '{self.method}' (choose from {', '.join(METHOD_NAMES)})")
        if self.format not in FORMATS:
            raise InputError(f"--format must be adapter or merged, got '{self.format}'")
        if self.weights is not None:
            if self.method == "emr":
                raise InputError("--weights: EMR-merging is tuning-free and takes no weights")
            object.__setattr__(self, "weights", tuple(self.weights))
            if not self.weights or not all(_finite(w) for w in self.weights):
                raise InputError(f"--weights must be finite numbers, got {list(self.weights)}")
            if self.method == "linear" and abs(sum(self.weights)) < 1e-8:
                raise InputError("--weights of a linear merge sum to 0: the average Σ w_i ΔW_i / Σ w_i is undefined")
        if self.density is not None:
            if self.method not in SPARSIFYING:
                raise InputError(f"--density applies to {', '.join(SPARSIFYING)}, not to {self.method}")
            if not _finite(self.density) or not 0 < self.density <= 1:
                raise InputError(f"--density must lie in (0, 1], got {self.density}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"--seed must be a whole number, got {self.seed!r}")

    @property
    def resolved_density(self) -> float:
        if self.method not in SPARSIFYING:
            return 1.0
        return DEFAULT_DENSITY if self.density is None else float(self.density)

    def weights_for(self, n: int) -> tuple[float, ...]:
        """The weights of ``n`` inputs: an InputError when their count does not match."""
        if n < 2:
            raise InputError(f"a merge needs at least two adapters, got {n}")
        if self.weights is None:
            return (1.0,) * n
        if len(self.weights) != n:
            raise InputError(f"--weights gives {len(self.weights)} weight(s) for {n} adapters")
        return tuple(float(w) for w in self.weights)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def default(name: str) -> Any:
    """The default of one setting, for the CLI's options."""
    return MergeOptions.default(name)
