"""What ``mitigate`` writes: the input's own adapter format with the edit exact (Eq. 3), or a merged
model, one shard at a time. Everything goes into the temporary folder ``atomic_dir`` gives."""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as _save_file

from lorascope.errors import InputError
from lorascope.io.checkpoint import Checkpoint, require_real
from lorascope.io.layout import matrix_kinds, orient, unorient
from lorascope.io.tuned import KohyaLora, PeftAdapter, TunedSource
from lorascope.io.writers import atomic_write_json
from lorascope.scanning.analyze import floats
from lorascope.scanning.engine import default_streams, prefetch, share_threads
from lorascope.scanning.pairing import MatrixPair
from lorascope.schema import MatrixMitigation
from lorascope.spectral import LowRankDelta, Tuned
from lorascope.spectral.edit import Plan, compress_factors, extend_factors, plan_matrix


def save_file(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' writer, its I/O failures (a full disk) raised as OSError, so that ``atomic_dir``
    reports them as an error naming the output instead of a traceback."""
    try:
        _save_file(state, path, metadata=metadata)
    except SafetensorError as e:
        raise OSError(str(e)) from e


_BESIDE_A_FILE = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
                  "merges.txt", "added_tokens.json")
_WEIGHT_SUFFIXES = {
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot",
}


# -- one matrix at a time ------------------------------------------------------------------------
@dataclass
class Run:
    base: Checkpoint
    tuned: TunedSource
    k: int
    epsilon: float
    lam: float
    which: str
    control: str | None
    device: torch.device
    progress: bool

    def tuned_matrix(
        self, pair: MatrixPair, W0_stored: torch.Tensor, check_k: bool = True
    ) -> tuple[torch.Tensor, Any]:
        """(W_0, ΔW) in (out, in) layout, float64 on the compute device."""
        require_real(W0_stored, self.base.file_of(pair.name), pair.name)
        W0 = orient(W0_stored, pair.kind).to(self.device, torch.float64)
        m, n = W0.shape
        if check_k and self.k > min(m, n):
            raise InputError(f"tensor '{pair.name}' has shape {(m, n)}: k={self.k} exceeds its rank bound")
        return W0, self.tuned.delta(pair.ref, W0, pair.kind)

    def plan(self, W0: torch.Tensor, Wt: torch.Tensor, delta: Any) -> Plan:
        return plan_matrix(W0, Wt, self.k, self.epsilon, self.lam, self.which, self.control, delta=delta)

    def record(self, pair: MatrixPair, plan: Plan, shape: tuple[int, int]) -> MatrixMitigation:
        return MatrixMitigation(
            name=pair.name, kind=pair.kind, shape=list(shape), source=pair.ref,
            singular_values=floats(plan.tuned.S), max_cos=floats(plan.max_cos),
            best_match=[int(i) for i in plan.best_match], n_intruders=plan.n_intruders,
            directions=plan.directions,
        )

    def track(self, items: list, description: str):
        if not self.progress:
            return items
        from rich.progress import track

        return track(items, description=description, transient=True)


def _rel_error(written: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((written - exact).norm()) / norm if norm > 0 else float((written - exact).norm())


Planned = tuple[MatrixPair, torch.Tensor, torch.Tensor, Any, torch.Tensor, Plan]


def planned(run: Run, pairs: list[MatrixPair]) -> Iterator[Planned]:
    """(pair, W_0 as stored, W_0, ΔW, W_t, plan) for each pair, in order: each base matrix read once.
    Several matrices are read and planned at once, as ``scanning.engine.scan_jobs`` analyses them:
    on a GPU each in its own thread and CUDA stream (one float64 ``eigh`` runs while other matrices
    take their Krylov steps), on the CPU one per intra-op thread (SmolLM2-135M, 2 cores:
    ``docs/performance.md``); each plan's arithmetic is the same."""
    streams = default_streams(run.base, pairs, run.device, torch.float64)
    cuda = run.device.type == "cuda"
    local = threading.local()

    def load(pair: MatrixPair) -> tuple[MatrixPair, torch.Tensor, torch.Tensor, Any]:
        stored = run.base.get(pair.name)
        return (pair, stored, *run.tuned_matrix(pair, stored))

    def load_and_plan(pair: MatrixPair) -> Planned:
        if not cuda:
            pair, stored, W0, delta = load(pair)
            Wt = Tuned(W0, delta).dense()
            return pair, stored, W0, delta, Wt, run.plan(W0, Wt, delta)
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(run.device)
        with torch.cuda.stream(local.stream):
            pair, stored, W0, delta = load(pair)
            Wt = Tuned(W0, delta).dense()
            item = pair, stored, W0, delta, Wt, run.plan(W0, Wt, delta)
        local.stream.synchronize()  # the consumer uses the results on its own stream
        return item

    items = run.track(pairs, "mitigating matrices")
    if streams == 1:
        for pair, stored, W0, delta in prefetch(items, load, workers=2, depth=3):
            Wt = Tuned(W0, delta).dense()
            yield pair, stored, W0, delta, Wt, run.plan(W0, Wt, delta)
        return
    if cuda:  # the first linalg call loads cuSOLVER, which two threads must not do at once
        torch.linalg.eigvalsh(torch.eye(2, device=run.device))
    with share_threads(streams, run.device):
        for item in prefetch(items, load_and_plan, workers=streams, depth=streams + 1):
            if cuda:
                _adopt(item)
            yield item


def _adopt(item: Planned) -> None:
    """Tell the caching allocator that the consumer's stream uses the tensors a worker's stream made,
    so their memory is not reused by that worker before the consumer is done with them."""
    _, _, W0, delta, Wt, plan = item
    tensors = [W0, Wt, plan.C, plan.D, plan.tuned.U, plan.tuned.S, plan.tuned.V, plan.max_cos, plan.best_match]
    tensors += [delta.B, delta.A] if isinstance(delta, LowRankDelta) else [delta]
    stream = torch.cuda.current_stream()
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(stream)


# -- adapter output ------------------------------------------------------------------------------
def write_adapter(run: Run, pairs: list[MatrixPair], tmp: Path, compress: int | None):
    """The input's adapter format again: changed modules get the factors of Eq. (3) (or their rank-R
    refactorisation), every other tensor is copied as it was. PEFT folders record the new ranks in
    ``rank_pattern`` / ``alpha_pattern``; kohya files in each module's ``alpha``."""
    tuned = run.tuned
    kohya = isinstance(tuned, KohyaLora)
    if not kohya and not isinstance(tuned, PeftAdapter):
        raise InputError(f"{tuned.description}: a {tuned.format} cannot be written as an adapter; use --format merged")
    state = {key: tuned.weights.get(key, check_finite=False) for key in tuned.weights.keys()}
    if not all(map(tuned.weights.fresh, state)):  # torch.load may share storage; safetensors refuses it
        state = {key: t.clone() for key, t in state.items()}
    rslora = not kohya and bool(tuned.config.get("use_rslora"))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    records = []
    for pair, _, W0, delta, Wt, plan in planned(run, pairs):
        rec = run.record(pair, plan, tuple(W0.shape))
        records.append(rec)
        saved = pair.ref.startswith("saved:")
        if not saved:
            rec.rank_before = rec.rank_after = delta.rank
        if not plan.directions:
            continue
        exact = Wt + plan.C @ plan.D
        if saved:  # modules_to_save: a full weight, so W_t' is written in full
            key = tuned._saved[pair.ref[len("saved:"):]]
            state[key] = unorient(exact, pair.kind, state[key].shape).to(state[key].dtype).cpu().contiguous()
            rec.rel_error = _rel_error(orient(state[key], pair.kind).to(exact), exact)
            continue
        B_key, A_key = tuned.factor_keys(pair.ref)
        B2, A2 = extend_factors(delta.B, delta.A, delta.scale, plan.C, plan.D)
        scale = delta.scale
        if compress is not None:
            B2, A2, rec.compress_rel_error = compress_factors(B2, A2, scale, compress)
            scale = 1.0
        r2 = A2.shape[0]
        # conv factors keep their 4-D layout: B (out, r, 1, 1), A (r, in, kh, kw)
        state[B_key] = B2.reshape(B2.shape[0], r2, *state[B_key].shape[2:]).to(state[B_key].dtype).cpu().contiguous()
        state[A_key] = A2.reshape(r2, *state[A_key].shape[1:]).to(state[A_key].dtype).cpu().contiguous()
        if kohya:  # ΔW = (alpha / r) · up @ down
            state[f"{pair.ref}.alpha"] = torch.tensor(scale * r2, dtype=torch.float32)
        else:
            rank_pattern[pair.ref] = r2
            alpha_pattern[pair.ref] = scale * (math.sqrt(r2) if rslora else r2)
        rec.rank_after = r2
        B_w, A_w = state[B_key].reshape(B2.shape[0], r2), state[A_key].reshape(r2, -1)
        written = W0 + scale * (B_w.to(exact) @ A_w.to(exact))
        rec.rel_error = _rel_error(written, exact)

    if kohya:
        name = tuned.root.name if tuned.root.suffix == ".safetensors" else tuned.root.stem + ".safetensors"
        save_file(state, str(tmp / name), metadata=tuned.weights.metadata() or None)
        return records, [name]
    config = dict(tuned.config)
    # ours first: PEFT takes the first pattern that matches a module (peft.utils.other.get_pattern_key)
    for key, new in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        old = config.get(key) or {}
        config[key] = {**new, **{k: v for k, v in old.items() if k not in new}}
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(tmp / "adapter_config.json", config)
    skip = {"adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"}
    _copy_side_files(tuned.root, tmp, skip)
    return records, ["adapter_config.json", "adapter_model.safetensors"]


# -- merged model output -------------------------------------------------------------------------
def write_merged(run: Run, pairs: list[MatrixPair], tmp: Path):
    """A safetensors model folder, one shard at a time, shards named like the source's.

    Full fine-tune: the tuned checkpoint with W_t' in place of each changed matrix. Adapter: the base
    checkpoint with every adapter module merged (W_0 + ΔW) and W_t' for the selected ones.
    """
    if run.tuned.kind == "full":
        src = run.tuned.ckpt
        selected = {p.ref: p for p in pairs}  # keyed by tuned tensor name
        merge_only: dict[str, MatrixPair] = {}
        dropped: list[str] = []
    else:
        src = run.base
        selected = {p.name: p for p in pairs}
        kinds = matrix_kinds(run.base)
        mapping = run.tuned.pair(run.base, kinds)
        merge_only = {b: MatrixPair(b, kinds[b], ref) for b, ref in mapping.items() if b not in selected}
        taken = {ref[len("saved:"):] for ref in mapping.values() if ref.startswith("saved:")}
        dropped = sorted(set(getattr(run.tuned, "_saved", {})) - taken)
    if getattr(src, "components", None):  # shards of unet/, vae/, … share file names: one folder cannot hold them
        raise InputError(f"{src.root}: merged output of a diffusers pipeline folder is not supported; pass its "
                         "component folder (e.g. unet/) as the base")
    if any(f.suffix == ".gguf" for f in set(map(src.file_of, src.keys()))):
        raise InputError(f"{src.root}: merged output from a .gguf checkpoint is not supported")

    files: dict[Path, list[str]] = {}
    for name in src.keys():
        files.setdefault(src.file_of(name), []).append(name)
    records: list[MatrixMitigation] = []
    weight_map: dict[str, str] = {}
    total = 0
    # planned ahead in the order the shards need them (read ahead; on the CPU several at once)
    order = [selected[name] for f in files for name in files[f] if name in selected]
    with contextlib.closing(planned(run, order)) as plans:  # closed here: its threads and thread count end
        for f in list(files):
            shard: dict[str, torch.Tensor] = {}
            for name in files[f]:
                if name in selected:
                    p, stored, W0, delta, Wt, plan = next(plans)
                    assert p is selected[name]
                    t = stored if src is run.base else src.get(name, check_finite=False)  # base: read once
                    rec = run.record(p, plan, tuple(W0.shape))
                    records.append(rec)
                    if plan.directions or src is run.base:
                        exact = Wt + plan.C @ plan.D
                        t = unorient(exact, p.kind, t.shape).to(t.dtype).cpu()
                        rec.rel_error = _rel_error(orient(t, p.kind).to(exact), exact)
                else:
                    t = src.get(name, check_finite=False)
                    if name in merge_only:  # adapter modules outside --modules / --embeddings: merged as they are
                        p = merge_only[name]
                        W0, delta = run.tuned_matrix(p, t, check_k=False)
                        t = unorient(Tuned(W0, delta).dense(), p.kind, t.shape).to(t.dtype).cpu()
                    elif f.suffix != ".safetensors":
                        t = t.clone()  # torch.load may share storage between tied tensors; safetensors refuses it
                shard[name] = t.contiguous()
                total += t.numel() * t.element_size()
            out_name = _shard_name(f) if src.root.is_dir() else "model.safetensors"  # what from_pretrained reads
            save_file(shard, str(tmp / out_name), metadata={"format": "pt"})
            weight_map.update({name: out_name for name in shard})
    written = sorted(set(weight_map.values()))
    if len(written) > 1:
        index = _index_name(src.root)
        atomic_write_json(tmp / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(index)
    _copy_side_files(src.root, tmp, set(written))
    order = {p.name: i for i, p in enumerate(pairs)}
    records.sort(key=lambda r: order[r.name])
    return records, written, dropped


def _shard_name(f: Path) -> str:
    """Shard names are kept; pickled ones become safetensors: pytorch_model-00001-of-00002.bin ->
    model-00001-of-00002.safetensors."""
    if f.suffix == ".safetensors":
        return f.name
    return f.stem.replace("pytorch_model", "model") + ".safetensors"


def _index_name(root: Path) -> str:
    found = sorted(root.glob("*.safetensors.index.json")) if root.is_dir() else []
    return found[0].name if found else "model.safetensors.index.json"


def _copy_side_files(root: Path, dst: Path, skip: set[str]) -> None:
    """Copy config, tokenizer and other small files (and sub-folders without weights, e.g. a
    sentence-transformers 1_Pooling/) from the folder ``root`` into ``dst``; weights and indexes are
    not copied. For a single weight file only the model files known to sit beside it are copied."""
    if not root.is_dir():
        for pattern in _BESIDE_A_FILE:
            for entry in root.parent.glob(pattern):
                if entry.is_file() and not (dst / entry.name).exists():
                    shutil.copy2(entry, dst / entry.name)
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in skip or (dst / entry.name).exists():
            continue
        if entry.is_file():
            if entry.suffix not in _WEIGHT_SUFFIXES and not entry.name.endswith(".index.json"):
                shutil.copy2(entry, dst / entry.name)
        elif entry.is_dir() and not any(
            p.suffix in _WEIGHT_SUFFIXES for p in entry.rglob("*") if p.is_file()
        ):
            shutil.copytree(entry, dst / entry.name)
