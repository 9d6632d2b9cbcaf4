"""A fully fine-tuned checkpoint (folder, shards, single file, .bin, .gguf or hub id): ΔW = W_t − W_0."""

from __future__ import annotations

from pathlib import Path

import torch

from lorascope.errors import MismatchError
from lorascope.io.checkpoint import TensorSource
from lorascope.io.layout import align_names
from lorascope.io.tuned.base import Probe, replacement_delta
from lorascope.spectral.operators import Delta


class FullCheckpoint:
    """A fully fine-tuned model: ΔW = W_t − W_0, dense. The registry's last entry: any checkpoint."""

    format = "full fine-tune"
    kind = "full"

    def __init__(self, ckpt: TensorSource):
        self.ckpt = ckpt
        self.root: Path = ckpt.root
        self.description = str(ckpt.root)
        self.unpaired: list[str] = []

    @classmethod
    def sniff(cls, probe: Probe) -> bool:
        return True

    @classmethod
    def open(cls, probe: Probe) -> FullCheckpoint:
        return cls(probe.ckpt)

    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]:
        mapping = align_names(base_kinds, self.ckpt.keys())
        if not mapping:
            raise MismatchError(
                f"{self.ckpt.root} shares no weight matrix with {base.root}: is it a fine-tune of that base?"
            )
        for t, b in mapping.items():  # a matrix of the base that is no matrix here is an error, not left out
            if len(self.ckpt.shape(t)) != len(base.shape(b)):
                raise MismatchError(
                    f"{self.ckpt.file_of(t)}: tensor '{t}' has shape {list(self.ckpt.shape(t))} where the base "
                    f"matrix '{b}' has {list(base.shape(b))}"
                )
        return {b: t for t, b in mapping.items()}

    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta:
        return replacement_delta(self.ckpt, ref, W0, kind)
