"""Tuned inputs as updates of a base, one module per format behind one registry.

Each format is a class that keeps the ``TunedSource`` contract (``io.tuned.base``): ``sniff`` an
input, ``open`` it, ``pair`` its tensors with the base's matrices, and give ``delta`` ΔW per matrix.
``open_tuned`` asks the formats in registry order; the first that recognises the input reads it.
Adding a format is one new module here plus one line in ``FORMATS``.
"""

from __future__ import annotations

import os

from lorascope.io.checkpoint import resolve_path
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


def open_tuned(spec: str | os.PathLike) -> TunedSource:
    """The tuned side of a scan or mitigation: a local path or a hub id, in any registered format."""
    probe = Probe(resolve_path(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    for fmt in FORMATS:
        if fmt.sniff(probe):
            return fmt.open(probe)
    raise AssertionError("FullCheckpoint accepts every input")  # unreachable: the last format sniffs True


__all__ = ["FORMATS", "DiffusersLora", "FullCheckpoint", "KohyaLora", "LycorisFile", "PeftAdapter", "Probe",
           "TunedSource", "open_tuned", "replacement_delta"]
