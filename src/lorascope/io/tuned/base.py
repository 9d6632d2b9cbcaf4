"""The contract every tuned format keeps (``TunedSource``), and what the formats share."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from lorascope.errors import InputError, MismatchError
from lorascope.io.checkpoint import Checkpoint, TensorSource, require_real
from lorascope.io.layout import orient

if TYPE_CHECKING:
    import torch

    from lorascope.spectral.operators import Delta, LowRankDelta


class Probe:
    """What a format looks at to recognise an input: its path and, opened once on first use, the
    checkpoint at that path (so no header is read twice)."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def ckpt(self) -> Checkpoint:
        return Checkpoint(self.path)


class TunedSource(Protocol):
    """Fine-tuned weights as updates of a base.

    ``sniff`` says, cheaply, whether an input is in this format; ``open`` reads it. ``pair`` maps
    every base matrix the source changes to the source's own reference for it, and ``delta`` returns
    ΔW for one of them in the (out, in) layout of ``io.layout.orient``: factors (``LowRankDelta``)
    when the format stores them, never multiplied out, otherwise a dense matrix for that one matrix.
    Tensors of the source that pair with no base weight go in ``unpaired``, reported in the result.
    """

    format: ClassVar[str]  # the name in messages and docs/inputs.md
    kind: str  # "full" (ΔW = W_t − W_0), "lora" (plain low-rank factors), "peft" (PEFT's own merge)
    # or "lycoris" (LyCORIS factors: ΔW built densely per matrix)
    description: str
    root: Path  # the input, for the guard that no output is written into it
    unpaired: list[str]

    @classmethod
    def sniff(cls, probe: Probe) -> bool: ...

    @classmethod
    def open(cls, probe: Probe) -> TunedSource: ...

    def pair(self, base: TensorSource, base_kinds: dict[str, str]) -> dict[str, str]: ...

    def delta(self, ref: str, W0: torch.Tensor, kind: str) -> Delta: ...


def replacement_delta(ckpt: TensorSource, name: str, W0: torch.Tensor, kind: str) -> torch.Tensor:
    """ΔW = W_t − W_0 for a tuned weight stored in full under ``name``."""
    stored = ckpt.get(name)
    require_real(stored, ckpt.file_of(name), name)
    Wt = orient(stored, kind).to(W0.device, W0.dtype)
    if Wt.shape != W0.shape:
        raise MismatchError(
            f"{ckpt.file_of(name)}: tensor '{name}' has shape {tuple(Wt.shape)} but the base "
            f"matrix has {tuple(W0.shape)}"
        )
    return Wt - W0


def lowrank_delta(up: torch.Tensor, down: torch.Tensor, scale: float, W0: torch.Tensor, source: str,
                  ref: str) -> LowRankDelta:
    """ΔW = scale · up @ down from LoRA factors in any stored layout (Linear: (out, r) and (r, in);
    Conv2d: (out, r, 1, 1) and (r, in, kh, kw)), checked against the base matrix W0 (out, in·kh·kw)."""
    from lorascope.spectral.operators import LowRankDelta

    r = down.shape[0] if down.dim() else 0
    if up.dim() < 2 or down.dim() < 2 or up.numel() != up.shape[0] * r:
        raise InputError(
            f"{source}: the factors of '{ref}' have shapes {tuple(up.shape)} (up) and {tuple(down.shape)} "
            "(down), which do not multiply"
        )
    B = up.reshape(up.shape[0], r).to(W0.device, W0.dtype)
    A = down.reshape(r, -1).to(W0.device, W0.dtype)
    d = LowRankDelta(B, A, scale)
    if d.shape != tuple(W0.shape):
        raise MismatchError(
            f"{source}: '{ref}' gives ΔW of shape {d.shape} but the base matrix is {tuple(W0.shape)}: wrong base?"
        )
    return d


def scalar(ckpt: TensorSource, key: str) -> float:
    """A one-element tensor (an ``alpha``) as a float; InputError naming the file and tensor otherwise."""
    t = ckpt.get(key)
    if t.numel() != 1:
        raise InputError(f"{ckpt.file_of(key)}: tensor '{key}' should hold one number but has shape {tuple(t.shape)}")
    return float(t.reshape(()))
