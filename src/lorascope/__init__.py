"""lorascope: show, measure and undo how fine-tuning changes a pretrained model.

The public API is loaded on first use (PEP 562), so ``import lorascope`` and ``lorascope --help``
import neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "scan": "lorascope.scanning.api",
    "mitigate": "lorascope.mitigation.api",
    "merge": "lorascope.merging.api",
    "MergeOptions": "lorascope.merging.options",
    "MergeResult": "lorascope.schema",
    "ScanOptions": "lorascope.scanning.options",
    "ScanResult": "lorascope.schema",
    "MatrixRecord": "lorascope.schema",
    "MitigationResult": "lorascope.schema",
}

__all__ = ["MatrixRecord", "MergeOptions", "MergeResult", "MitigationResult", "ScanOptions", "ScanResult",
           "__version__", "merge", "mitigate", "scan"]

if TYPE_CHECKING:
    from lorascope.merging.api import merge as merge
    from lorascope.merging.options import MergeOptions as MergeOptions
    from lorascope.mitigation.api import mitigate as mitigate
    from lorascope.scanning.api import scan as scan
    from lorascope.scanning.options import ScanOptions as ScanOptions
    from lorascope.schema import MatrixRecord as MatrixRecord
    from lorascope.schema import MergeResult as MergeResult
    from lorascope.schema import MitigationResult as MitigationResult
    from lorascope.schema import ScanResult as ScanResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lorascope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
