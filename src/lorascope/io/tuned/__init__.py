"""Tuned inputs as updates of a base, one module per format behind one registry.

Each format is a class that keeps the ``TunedSource`` contract (``io.tuned.base``): ``sniff`` an
input, ``open`` it, ``pair`` its tensors with the base's matrices, and give ``delta`` ΔW per matrix.
``open_tuned`` asks the formats in registry order; the first that recognises the input reads it.
Adding a format is one new module here plus one line in ``FORMATS``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorascope.errors import InputError
from lorascope.io.checkpoint import Checkpoint, resolve_path
from lorascope.io.tuned.base import Probe, TunedSource, replacement_delta
from lorascope.io.tuned.full import FullCheckpoint
from lorascope.io.tuned.kohya import KohyaLora
from lorascope.io.tuned.peft import PeftAdapter

FORMATS: list[type[TunedSource]] = [
    PeftAdapter,  # a folder with adapter_config.json
    KohyaLora,  # one file of lora_down / lora_up / alpha tensors
    FullCheckpoint,  # last: any other checkpoint is a full fine-tune
]


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


__all__ = ["FORMATS", "FullCheckpoint", "KohyaLora", "PeftAdapter", "Probe", "TunedSource", "open_tuned",
           "replacement_delta"]
