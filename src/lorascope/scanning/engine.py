"""The one scan loop: every matrix pair through ``analyze_matrix``, reads overlapped with the maths.

``scan_records`` feeds every consumer: ``lorascope.scan`` (files on disk), the training tracker (a
model's live weights through in-memory sources), and torchrun ranks (each its share). Measured in
docs/performance.md:

1. Reads overlap the arithmetic. Worker threads read the next tensors (safetensors' positioned
   reads, no memory map, so resident memory stays near the pairs in flight) while the device works
   on the current pair; on a GPU they also copy them to the device on a copy stream.
2. The base basis is ``spectral.left_basis``: the float64 Gram route in column or row blocks,
   so no float64 copy of W is ever held whole.
3. On a GPU several pairs are analysed at once, each in its own thread and CUDA stream, so the
   GPU never waits on one thread's kernel launches and synchronisations.

Optional: a ``BasisCache`` (``scanning.cache``) supplies bases from disk; its look-ups happen in the
worker threads too, so a cached scan is bound by reading W0 and U, not by a decomposition.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorascope.errors import MismatchError
from lorascope.io.checkpoint import require_finite
from lorascope.io.layout import orient
from lorascope.scanning.analyze import BasisFn, analyze_matrix
from lorascope.scanning.pairing import MatrixPair
from lorascope.schema import MatrixRecord
from lorascope.spectral import SVD, left_basis
from lorascope.spectral.operators import Delta, delta_to

if TYPE_CHECKING:
    from lorascope.io.checkpoint import TensorSource
    from lorascope.io.tuned import TunedSource
    from lorascope.scanning.cache import BasisCache


def default_basis(key: str, W: torch.Tensor) -> SVD:
    """The scan's ``basis`` hook when no cache is given: ``left_basis``."""
    return left_basis(W)


# -- prefetching -------------------------------------------------------------------------------
@dataclass
class Loaded:
    """One pair's inputs, produced by a worker thread (on a GPU run already copied to the device)."""

    pair: MatrixPair
    W0: torch.Tensor  # stored layout and dtype
    base_file: Path | str
    Wt: torch.Tensor | None = None  # a full fine-tune's tuned weight, stored layout
    tuned_file: Path | str = ""
    wt_owned: bool = False  # Wt is a buffer of ours (not a checkpoint's tensor): free to overwrite
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. cached bases, for the basis hook
    ready: Any = None  # a CUDA event recorded after the copies to the device


def prefetch(items: Iterable[Any], load: Callable[[Any], Any], workers: int, depth: int) -> Iterator[Any]:
    """``map(load, items)`` in order, with up to ``depth`` loads running ahead on ``workers`` threads."""
    items = iter(items)
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lorascope-read") as pool:
        try:
            for item in items:
                pending.append(pool.submit(load, item))
                if len(pending) >= max(1, depth):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


# -- the scan loop -----------------------------------------------------------------------------
class PairLoader:
    """Reads a pair's base matrix (a full fine-tune's tuned matrix, cached bases) in a worker thread.

    On a GPU the tensors are copied to the device right here, on a copy stream, so transfers overlap
    the arithmetic of the previous pair; ``Loaded.ready`` marks their completion.
    """

    def __init__(self, base: TensorSource, tuned: TunedSource, device: torch.device, cache_hook=None):
        self.base = base
        self.tuned = tuned.ckpt if tuned.kind == "full" else None  # a full fine-tune: read W_t here too
        self.cache_hook = cache_hook
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, pair: MatrixPair) -> Loaded:
        W0 = self.base.get(pair.name, check_finite=False)
        item = Loaded(pair, W0, self.base.file_of(pair.name))
        if self.cache_hook is not None:
            item.extra = self.cache_hook.prefetch(self.base, pair.name, pair.kind, W0)
        if self.tuned is not None:
            item.Wt = self.tuned.get(pair.ref, check_finite=False)
            item.tuned_file = self.tuned.file_of(pair.ref)
            # in place only on a copy of ours: never on a live model's weights or a mapped .bin
            item.wt_owned = self.tuned.fresh(pair.ref) or (self.copy_stream is not None and not item.Wt.is_cuda)
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                item.W0 = item.W0.to(self.device, non_blocking=True)
                item.Wt = None if item.Wt is None else item.Wt.to(self.device, non_blocking=True)
                hits = item.extra.get("hits", {})
                for side, h in hits.items():
                    hits[side] = SVD(U=h.U.to(self.device, non_blocking=True), S=h.S.to(self.device, non_blocking=True))
                item.ready = torch.cuda.Event()
                item.ready.record(self.copy_stream)
        return item


def _adopt(item: Loaded) -> None:
    """Make the compute stream wait for the pair's copies, and tell the allocator that it uses them."""
    if item.ready is None:
        return
    stream = torch.cuda.current_stream()
    stream.wait_event(item.ready)
    tensors = [item.W0, item.Wt] + [t for h in item.extra.get("hits", {}).values() for t in (h.U, h.S)]
    for t in tensors:
        if t is not None and t.is_cuda:
            t.record_stream(stream)


def scan_records(
    base: TensorSource,
    tuned: TunedSource,
    pairs: list[MatrixPair],
    k: int,
    epsilon: float,
    sides: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    basis: BasisFn | None = None,
    cache: BasisCache | None = None,
    workers: int | None = None,
    depth: int | None = None,
    streams: int | None = None,
) -> Iterator[list[MatrixRecord]]:
    """Alg. 1 on every pair, in order, one list of records (one per side) per pair.

    Reads run ``depth`` pairs ahead (default 2·streams on
    a GPU, 2 on the CPU, where each pending pair costs resident memory) on ``workers`` threads.
    ``basis`` (a caller's hook) wins over ``cache``; without either, ``left_basis``.

    ``streams`` pairs are analysed at once, each in its own thread (and CUDA stream); the default is
    ``default_streams``. One thread cannot keep a GPU busy: Alg. 1 on one pair is hundreds of small
    operations and several waits for their results (docs/performance.md). torch releases the GIL
    while it launches kernels and while it waits, so with a few threads the GPU always has work,
    e.g. the Krylov steps of some pairs run while another pair's base ``eigh`` does. Each pair's
    arithmetic is unchanged, so the records do not depend on ``streams``.
    """
    hook = None if basis is not None or cache is None else cache.hook(dtype, sides)
    loader = PairLoader(base, tuned, device, cache_hook=hook)
    streams = streams or default_streams(base, pairs, device, dtype)
    depth = depth or (max(8, 2 * streams) if device.type == "cuda" else 2)
    workers = workers or max(1, min(8, depth, os.cpu_count() or 1))
    own_streams = streams > 1 and device.type == "cuda"
    local = threading.local()

    def analyze(item: Loaded) -> list[MatrixRecord]:
        if own_streams and not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(local.stream) if own_streams else contextlib.nullcontext():
            _adopt(item)
            p = item.pair
            W0 = orient(item.W0.to(device, non_blocking=True).to(dtype), p.kind)
            require_finite(W0, item.base_file, p.name)
            delta = _delta(item, tuned, W0, device, dtype)
            basis_fn = basis or (hook.basis_for(item.extra, item.W0) if hook is not None else default_basis)
            return analyze_matrix(p.name, p.kind, W0, delta, k, epsilon, sides, basis_fn)

    if own_streams:
        # torch loads its CUDA linear-algebra library on the first linalg call, and two threads making
        # that first call at once fail ("lazy wrapper should be called at most once"): load it here.
        torch.linalg.eigvalsh(torch.eye(2, device=device))
    try:
        loaded = prefetch(pairs, loader, workers, depth)
        if streams == 1:
            yield from map(analyze, loaded)
        else:
            yield from prefetch(loaded, analyze, streams, streams)
    finally:
        if hook is not None:
            hook.close()


def default_streams(base: TensorSource, pairs: list[MatrixPair], device: torch.device, dtype: torch.dtype) -> int:
    """1 on the CPU (the arithmetic already uses every core). On a GPU 8, or as many as fit in half
    its free memory when each holds the largest pair's working set: W_0, ΔW or W_t and temporaries
    (about 6 matrices in ``dtype``), and the float64 Gram matrix, its eigenvectors and ``eigh``'s
    workspace (about 3 Gram-sized float64 matrices)."""
    if device.type != "cuda" or not pairs:
        return 1
    itemsize = torch.empty(0, dtype=dtype).element_size()
    need = 0
    for p in pairs:
        shape = base.shape(p.name)
        mn = math.prod(shape)
        r = min(shape[0], mn // shape[0]) if shape[0] else 0
        need = max(need, 6 * mn * itemsize + 3 * r * r * 8)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(8, free // 2 // max(need, 1)))


def _delta(item: Loaded, tuned: TunedSource, W0: torch.Tensor, device: torch.device,
           dtype: torch.dtype) -> Delta:
    p = item.pair
    if item.Wt is None:
        return delta_to(tuned.delta(p.ref, W0, p.kind), device, dtype)
    Wt = orient(item.Wt.to(device, non_blocking=True).to(dtype), p.kind)
    if Wt.shape != W0.shape:
        raise MismatchError(
            f"{item.tuned_file}: tensor '{p.ref}' has shape {tuple(Wt.shape)} but the base matrix has "
            f"{tuple(W0.shape)}"
        )
    require_finite(Wt, item.tuned_file, p.ref)
    if item.wt_owned or Wt.data_ptr() != item.Wt.data_ptr():
        return Wt.sub_(W0)  # in place: saves one matrix of memory
    return Wt - W0  # Wt is the checkpoint's own tensor (e.g. a memory-mapped .bin): leave it alone
