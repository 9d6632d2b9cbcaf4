"""Tuned inputs as updates of a base, one module per format behind one registry.

Each format is a class that keeps the ``TunedSource`` contract (``io.tuned.base``): ``sniff`` an
input, ``open`` it, ``pair`` its tensors with the base's matrices, and give ``delta`` ΔW per matrix.
``open_tuned`` asks the formats in registry order; the first that recognises the input reads it.
Adding a format is one new module here plus one line in ``FORMATS``.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from lorascope.errors import InputError
from lorascope.io.checkpoint import Checkpoint, resolve_path
from lorascope.io.tuned.base import Probe, TunedSource, replacement_delta
from lorascope.io.tuned.diffusers import DiffusersLora
from lorascope.io.tuned.full import FullCheckpoint
from lorascope.io.tuned.kohya import KohyaLora
from lorascope.io.tuned.lyco import LycorisFile
from lorascope.io.tuned.peft import PeftAdapter

FORMATS: list[type[TunedSource]] = [
    PeftAdapter,  # a folder with adapter_config.json
    LycorisFile,  # kohya-named LoHa / LoKr / Tucker LoCon / full-diff tensors (before KohyaLora: LoCon has lora_down)
    KohyaLora,  # one file of lora_down / lora_up / alpha tensors
    DiffusersLora,  # unet.… / transformer.… / text_encoder.… lora_A / lora_B (or old lora.down / lora.up)
    FullCheckpoint,  # last: any other checkpoint is a full fine-tune
]


def expand_specs(specs: list[str]) -> list[str]:
    """The inputs a user means by ``specs``: each path as it is, a quoted glob (``'adapters/*'``) as its
    matches, and a folder that holds no weights of its own but adapter or run sub-folders as those
    sub-folders (sorted), so that ``lorascope scan BASE my-adapters/`` scans each of them."""
    out: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists() and any(c in spec for c in "*?["):
            matches = sorted(glob.glob(str(path)))
            if not matches:
                raise InputError(f"{spec}: the pattern matches no file or folder")
            out += matches
        elif path.is_dir() and not _is_input(path) and any(filter(_is_input, path.iterdir())):
            out += [str(c) for c in sorted(filter(_is_input, path.iterdir()))]
        else:
            out.append(spec)
    return out


def _is_input(path: Path) -> bool:
    """A folder that is one input itself: an adapter, a run folder or a model (weights at its top)."""
    if not path.is_dir():
        return False
    markers = ("adapter_config.json", "run.json", "model_index.json")
    weights = ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json")
    return any((path / m).is_file() for m in markers) or any(any(path.glob(w)) for w in weights)


RUN_FILE = "run.json"  # a `lorascope train` output folder: run.json plus adapter/ or model/


def open_tuned(spec: str | os.PathLike, residual_base: str | os.PathLike | None = None) -> TunedSource:
    """The tuned side of a scan or mitigation: a local path or a hub id, in any registered format.

    A ``lorascope train`` run folder stands for the adapter or model inside it. ``residual_base``:
    for a PEFT adapter trained on a changed base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ), the model
    saved right after the init, which the adapter's factors are relative to.
    """
    probe = Probe(run_folder_target(resolve_path(spec, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                        "*.txt"])))
    for fmt in FORMATS:
        if fmt.sniff(probe):
            source = fmt.open(probe)
            break
    else:
        raise AssertionError("FullCheckpoint accepts every input")  # unreachable: the last format sniffs True
    if residual_base is not None:
        if not isinstance(source, PeftAdapter):
            raise InputError(f"{spec}: a residual base applies to PEFT adapters only, not to a {source.format}")
        source.use_residual(Checkpoint(residual_base))
    return source


def run_folder_target(path: Path) -> Path:
    """``path``, or for a ``lorascope train`` run folder (run.json beside adapter/ or model/) the
    sub-folder holding its weights, as named by run.json's ``layout``."""
    if not (path.is_dir() and (path / RUN_FILE).is_file()):
        return path
    layout: dict = {}
    try:
        record = json.loads((path / RUN_FILE).read_text())
        layout = record.get("layout") or {} if isinstance(record, dict) else {}
    except (OSError, ValueError):
        pass
    for name in (layout.get("adapter"), layout.get("model"), "adapter", "model"):
        if isinstance(name, str) and name and (path / name).is_dir():
            return path / name
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise InputError(f"{path}: a lorascope run folder ({RUN_FILE}) without its adapter/ or model/ sub-folder")
    return path


__all__ = ["FORMATS", "DiffusersLora", "FullCheckpoint", "KohyaLora", "LycorisFile", "PeftAdapter", "Probe",
           "TunedSource", "expand_specs", "open_tuned", "replacement_delta"]
