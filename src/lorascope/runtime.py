"""Where the maths runs and what it ran with: the compute device and the library versions."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from lorascope.errors import InputError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; an explicit cuda without one is an error."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"--device '{device}' is not a device torch knows (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but torch sees no CUDA device")
    return dev


def library_versions() -> dict[str, str]:
    """Python and the versions of the libraries whose arithmetic a result depends on."""
    import torch

    out = {"python": platform.python_version()}
    for pkg in ("lorascope", "torch", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out
