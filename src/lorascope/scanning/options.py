"""A scan's settings, in one place: ``scan``, ``mitigate``, the training tracker, the experiment
config's ``[scan]`` table and the CLI's defaults all read them from ``ScanOptions``.

Kept free of torch so that ``lorascope --help`` can take its defaults from here without importing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorascope.errors import InputError
from lorascope.settings import Settings

SIDES = {"left": ("left",), "right": ("right",), "both": ("left", "right")}
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class ScanOptions(Settings):
    """Alg. 1's settings (paper defaults) and where the arithmetic runs.

    ``k``: top-k singular vectors of W_t tested; ``epsilon``: the intruder threshold on max |cos|;
    ``side``: left (paper: output space), right or both; ``modules``: a regex on tensor names;
    ``embeddings``: also scan embedding matrices; ``device``: auto, cpu, cuda[:N]; ``dtype``: float32
    or float64 for the tuned top-k (the base basis is always float64); ``cache_dir`` / ``cache_budget``:
    keep base decompositions on disk (``scanning.cache``); ``streams``: pairs analysed at once
    (default 8 on a GPU when memory allows; on the CPU one per thread while small, else 1).
    """

    k: int = 10
    epsilon: float = 0.5
    side: str = "left"
    modules: str | None = None
    embeddings: bool = False
    device: str = "auto"
    dtype: str = "float32"
    cache_dir: str | None = None
    cache_budget: str | int = "20GB"
    streams: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"k must be a whole number of at least 1, got {self.k!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, int | float) or not 0 < self.epsilon <= 1:
            raise InputError(f"epsilon must lie in (0, 1], got {self.epsilon!r}")
        if self.side not in SIDES:
            raise InputError(f"side must be left, right or both, got '{self.side}'")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be float32 or float64, got '{self.dtype}'")
        if self.streams is not None and (isinstance(self.streams, bool) or self.streams < 1):
            raise InputError(f"streams must be at least 1, got {self.streams}")
        if self.modules is not None:
            if not isinstance(self.modules, str):
                raise InputError(f"modules must be a regular expression (a string), got {self.modules!r}")
            try:
                re.compile(self.modules)
            except re.error as e:
                raise InputError(f"--modules '{self.modules}' is not a valid regular expression ({e})") from e

    @property
    def sides(self) -> tuple[str, ...]:
        return SIDES[self.side]

    def modules_pattern(self) -> re.Pattern | None:
        return re.compile(self.modules) if self.modules else None


def default(name: str) -> Any:
    """The default of one setting, for the CLI's options."""
    return ScanOptions.default(name)
