"""What ``merge`` writes: a PEFT LoRA adapter whose ΔW is the merge exactly (at each matrix's own
numerical rank, through ``rank_pattern``), or merged models, one shard at a time. Everything goes into
the temporary folder ``atomic_dir`` gives; side files and shard names as ``mitigation.writers`` does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorascope.io.checkpoint import Checkpoint
from lorascope.io.layout import unorient
from lorascope.io.writers import atomic_write_json
from lorascope.mitigation.writers import _copy_side_files, _index_name, _shard_name
from lorascope.scanning.pairing import MatrixPair

PEFT_PREFIX = "base_model.model."


def lora_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors of a dense ΔW (m × n): the thin SVD ΔW = U Σ Vᵀ cut to its numerical rank
    r (σ_j > σ_1·max(m, n)·eps, at least 1), B = U_r Σ_r^½ (m × r), A = Σ_r^½ V_rᵀ (r × n), so B A = ΔW."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    tol = (S[0] if S.numel() else 0) * max(delta.shape) * torch.finfo(S.dtype).eps
    r = max(1, int((S > tol).sum()))
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


def rel_error(written: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.norm())
    diff = float((written - exact).norm())
    return diff / norm if norm > 0 else diff


class AdapterWriter:
    """Collects one output adapter's factors matrix by matrix, then writes the folder."""

    def __init__(self, config: dict[str, Any], dtype: torch.dtype = torch.float32):
        self.config, self.dtype = config, dtype
        self.state: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}

    def add(self, module: str, W0: torch.Tensor, delta: torch.Tensor) -> tuple[int, float]:
        """Factor ΔW, store it under ``module``; returns (rank, relative error of W_0 + B A as stored)."""
        B, A = lora_factors(delta)
        key = PEFT_PREFIX + module
        self.state[f"{key}.lora_A.weight"] = A.to(self.dtype).cpu().contiguous()
        self.state[f"{key}.lora_B.weight"] = B.to(self.dtype).cpu().contiguous()
        self.ranks[module] = A.shape[0]
        written = W0 + self.state[f"{key}.lora_B.weight"].to(W0) @ self.state[f"{key}.lora_A.weight"].to(W0)
        return A.shape[0], rel_error(written, W0 + delta)

    def write(self, folder: Path) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        r = max(self.ranks.values())
        config = {**self.config, "r": r, "lora_alpha": r, "target_modules": sorted(self.ranks),
                  "rank_pattern": dict(self.ranks), "alpha_pattern": {m: float(v) for m, v in self.ranks.items()}}
        save_file(self.state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(folder / "adapter_config.json", config)
        return ["adapter_config.json", "adapter_model.safetensors"]


def adapter_config(first: dict[str, Any] | None, fan_in_fan_out: bool) -> dict[str, Any]:
    """A plain LoRA config (scale α/r = 1 everywhere: α = r in ``alpha_pattern``), keeping the first
    input's base model and task type."""
    from peft import LoraConfig

    config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out,
                        target_modules=["placeholder"]).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    for key in ("base_model_name_or_path", "task_type", "revision"):
        if first and first.get(key) is not None:
            config[key] = first[key]
    return config


def write_merged(base: Checkpoint, selected: dict[str, MatrixPair], folders: list[Path],
                 merged: Callable[[MatrixPair, torch.Tensor], list[torch.Tensor]]) -> list[str]:
    """Merged models W_0 + ΔW_o, one per output folder, shard by shard: ``merged(pair, stored W_0)``
    gives the outputs' dense W (out, in) for each selected base tensor; other tensors are copied."""
    files: dict[Path, list[str]] = {}
    for name in base.keys():
        files.setdefault(base.file_of(name), []).append(name)
    weight_map: dict[str, str] = {}
    total = 0
    for f, names in files.items():
        shards: list[dict[str, torch.Tensor]] = [{} for _ in folders]
        for name in names:
            t = base.get(name, check_finite=False)
            if name in selected:
                for shard, W in zip(shards, merged(selected[name], t), strict=True):
                    shard[name] = unorient(W, selected[name].kind, t.shape).to(t.dtype).cpu().contiguous()
            else:
                t = t.clone() if f.suffix != ".safetensors" else t
                for shard in shards:
                    shard[name] = t.contiguous()
            total += t.numel() * t.element_size()
        out_name = _shard_name(f) if base.root.is_dir() else "model.safetensors"
        for folder, shard in zip(folders, shards, strict=True):
            folder.mkdir(parents=True, exist_ok=True)
            save_file(shard, str(folder / out_name), metadata={"format": "pt"})
        weight_map.update({name: out_name for name in names})
    written = sorted(set(weight_map.values()))
    if len(written) > 1:
        index = _index_name(base.root)
        for folder in folders:
            atomic_write_json(folder / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(index)
    for folder in folders:
        _copy_side_files(base.root, folder, set(written))
    return written
