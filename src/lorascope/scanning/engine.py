"""The one scan loop: every base matrix and its updates through ``analyze_matrices``, reads overlapped
with the maths.

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
from lorascope.io.checkpoint import require_finite, require_real
from lorascope.io.layout import orient
from lorascope.scanning.analyze import BasisFn, analyze_matrices
from lorascope.scanning.pairing import MatrixPair
from lorascope.schema import MatrixRecord
from lorascope.spectral import SVD, left_basis
from lorascope.spectral.operators import Delta, delta_to

if TYPE_CHECKING:
    from lorascope.io.checkpoint import TensorSource
    from lorascope.io.tuned import TunedSource
    from lorascope.scanning.cache import BasisCache

_CPU_STREAMS_BYTES = 512 << 20  # working sets analysed at once on the CPU (default_streams)


def default_basis(key: str, W: torch.Tensor) -> SVD:
    """The scan's ``basis`` hook when no cache is given: ``left_basis``."""
    return left_basis(W)


# -- prefetching -------------------------------------------------------------------------------
@dataclass
class Job:
    """One base matrix and every tuned source that changes it (one source in a plain scan)."""

    name: str  # base tensor name
    kind: str
    refs: list[tuple[int, str]]  # (source index, that source's reference for the matrix)


@dataclass
class Loaded:
    """One job's inputs, produced by a worker thread (on a GPU run already copied to the device)."""

    job: Job
    W0: torch.Tensor  # stored layout and dtype
    base_file: Path | str
    Wt: dict[int, torch.Tensor] = field(default_factory=dict)  # full fine-tunes' tuned weights, stored layout
    wt_owned: dict[int, bool] = field(default_factory=dict)  # a buffer of ours, free to overwrite
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
    """Reads a job's base matrix (full fine-tunes' tuned matrices, cached bases) in a worker thread.

    On a GPU the tensors are copied to the device right here, on a copy stream, so transfers overlap
    the arithmetic of the previous job; ``Loaded.ready`` marks their completion.
    """

    def __init__(self, base: TensorSource, sources: list[TunedSource], device: torch.device, cache_hook=None):
        self.base = base
        self.sources = sources
        self.cache_hook = cache_hook
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, job: Job) -> Loaded:
        pin = self.copy_stream is not None  # page-locked host buffers: asynchronous copies to the GPU
        W0 = self.base.read(job.name, pin)
        item = Loaded(job, W0, self.base.file_of(job.name))
        if self.cache_hook is not None:
            item.extra = self.cache_hook.prefetch(self.base, job.name, job.kind, W0)
        for i, ref in job.refs:
            src = self.sources[i]
            if src.kind == "full":  # read W_t here too, ahead of the arithmetic
                Wt = src.ckpt.read(ref, pin)
                item.Wt[i] = Wt
                # in place only on a copy of ours: never on a live model's weights or a mapped .bin
                item.wt_owned[i] = src.ckpt.fresh(ref) or (self.copy_stream is not None and not Wt.is_cuda)
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                item.W0 = item.W0.to(self.device, non_blocking=True)
                item.Wt = {i: t.to(self.device, non_blocking=True) for i, t in item.Wt.items()}
                hits = item.extra.get("hits", {})
                for side, h in hits.items():
                    hits[side] = SVD(U=h.U.to(self.device, non_blocking=True), S=h.S.to(self.device, non_blocking=True))
                item.ready = torch.cuda.Event()
                item.ready.record(self.copy_stream)
        return item


def _adopt(item: Loaded) -> None:
    """Make the compute stream wait for the job's copies, and tell the allocator that it uses them."""
    if item.ready is None:
        return
    stream = torch.cuda.current_stream()
    stream.wait_event(item.ready)
    tensors = [item.W0, *item.Wt.values()] + [t for h in item.extra.get("hits", {}).values() for t in (h.U, h.S)]
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)


def warm_up(device: torch.device) -> threading.Thread | None:
    """Start the CUDA context and load cuBLAS and cuSOLVER in a background thread (seconds in a new
    process), while the caller opens checkpoints and pairs matrices; join it before ``scan_jobs``.
    Only this thread makes torch's first linalg call, which must not run in two threads at once."""
    if device.type != "cuda":
        return None

    def work() -> None:
        x = torch.randn(64, 32, device=device, dtype=torch.float64)
        torch.linalg.eigh(x.T @ x)
        torch.linalg.qr(x.float())
        torch.cuda.synchronize(device)

    thread = threading.Thread(target=work, name="lorascope-cuda-warm-up", daemon=True)
    thread.start()
    return thread


def jobs_of(base: TensorSource, pairings: list[list[MatrixPair]]) -> list[Job]:
    """The union of several sources' pairs, one job per base matrix, in the base checkpoint's order."""
    jobs: dict[str, Job] = {}
    for i, pairs in enumerate(pairings):
        for p in pairs:
            jobs.setdefault(p.name, Job(p.name, p.kind, [])).refs.append((i, p.ref))
    order = {n: j for j, n in enumerate(base.keys())}
    return sorted(jobs.values(), key=lambda job: order.get(job.name, len(order)))


def scan_jobs(
    base: TensorSource,
    sources: list[TunedSource],
    jobs: list[Job],
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
) -> Iterator[list[tuple[int, list[MatrixRecord]]]]:
    """Alg. 1 on every job, in order: per job, ``(source index, records)`` for each source changing it.

    The base matrix is read, and its basis computed (or looked up), once per job, however many
    sources change it (``analyze_matrices``): scanning N adapters of one base costs one first scan
    plus the N top-k's per matrix, which LoRA adapters of one rank compute together (one product
    with W_0 for all of them per Krylov step). Each (source, matrix) gets the records a scan of that
    source alone gives (to float32 rounding of the batched products; tests/test_engine.py).

    Reads run ``depth`` jobs ahead (default 2·streams on a GPU, 2 on the CPU, where each pending job
    costs resident memory) on ``workers`` threads. ``basis`` (a caller's hook) wins over ``cache``;
    without either, ``left_basis``.

    ``streams`` jobs are analysed at once, each in its own thread (and CUDA stream); the default is
    ``default_streams``. One thread cannot keep a GPU busy: Alg. 1 on one pair is hundreds of small
    operations and several waits for their results (docs/performance.md). torch releases the GIL
    while it launches kernels and while it waits, so with a few threads the GPU always has work,
    e.g. the Krylov steps of some pairs run while another pair's base ``eigh`` does. Each pair's
    arithmetic is unchanged, so the records do not depend on ``streams`` (on the CPU, float32 sums
    may round differently with the number of BLAS threads, ~1e-5 in max-cos). On the CPU the intra-op
    threads are shared out among the streams for the scan (torch's thread count is restored after):
    several streams each on its own OpenMP team of all the cores spin against each other (SmolLM2-135M,
    2 cores: 2 streams × 2 threads 71.5 s, 2 × 1 13.9 s, 1 × 2 17.2 s).
    """
    hook = None if basis is not None or cache is None else cache.hook(dtype, sides)
    loader = PairLoader(base, sources, device, cache_hook=hook)
    streams = streams or default_streams(base, jobs, device, dtype)
    depth = depth or (max(8, 2 * streams) if device.type == "cuda" else 2)
    workers = workers or max(1, min(8, depth, os.cpu_count() or 1))
    own_streams = streams > 1 and device.type == "cuda"
    local = threading.local()

    def analyze(item: Loaded) -> list[tuple[int, list[MatrixRecord]]]:
        if own_streams and not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(local.stream) if own_streams else contextlib.nullcontext():
            _adopt(item)
            job = item.job
            require_real(item.W0, item.base_file, job.name)
            W0 = orient(item.W0.to(device, non_blocking=True).to(dtype), job.kind)
            require_finite(W0, item.base_file, job.name)
            basis_fn = basis or (hook.basis_for(item.extra, item.W0) if hook is not None else default_basis)
            deltas = [_delta(item, i, sources[i], ref, W0, device, dtype) for i, ref in job.refs]
            records = analyze_matrices(job.name, job.kind, W0, deltas, k, epsilon, sides, basis_fn)
            return [(i, recs) for (i, _), recs in zip(job.refs, records, strict=True)]

    if own_streams:
        # torch loads its CUDA linear-algebra library on the first linalg call, and two threads making
        # that first call at once fail ("lazy wrapper should be called at most once"): load it here.
        torch.linalg.eigvalsh(torch.eye(2, device=device))
    try:
        with share_threads(streams, device):
            loaded = prefetch(jobs, loader, workers, depth)
            if streams == 1:
                yield from map(analyze, loaded)
            else:
                yield from prefetch(loaded, analyze, streams, streams)
    finally:
        if hook is not None:
            hook.close()


@contextlib.contextmanager
def share_threads(streams: int, device: torch.device) -> Iterator[None]:
    """On the CPU with several streams, torch's intra-op threads shared out among them, restored after:
    each stream on its own OpenMP team of every core spins against the others (``scan_jobs``)."""
    if streams <= 1 or device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    **engine: Any,
) -> Iterator[list[MatrixRecord]]:
    """Alg. 1 on every pair of one source, in order, one list of records (one per side) per pair:
    ``scan_jobs`` with a single source (``engine``: its workers, depth and streams)."""
    jobs = [Job(p.name, p.kind, [(0, p.ref)]) for p in pairs]
    for results in scan_jobs(base, [tuned], jobs, k, epsilon, sides, device, dtype, basis, cache, **engine):
        yield results[0][1]


def default_streams(base: TensorSource, jobs: list, device: torch.device, dtype: torch.dtype) -> int:
    """How many pairs to analyse at once, from the largest pair's working set: W_0, ΔW or W_t and
    temporaries (about 6 matrices in ``dtype``), and the float64 Gram matrix, its eigenvectors and
    ``eigh``'s workspace (about 3 Gram-sized float64 matrices).

    On a GPU 8, or as many as fit in half its free memory. On the CPU one per intra-op thread (at most
    4) while their working sets together stay within 512 MB, else 1: small matrices (SmolLM2's 576 ×
    1536) are bound by per-operation overhead and one LAPACK call gains little from a second core,
    large ones (a 7B layer) keep the peak resident memory of one pair (docs/performance.md)."""
    if not jobs or device.type not in ("cuda", "cpu"):
        return 1
    itemsize = torch.empty(0, dtype=dtype).element_size()
    need = 0
    for p in jobs:
        shape = base.shape(p.name)
        mn = math.prod(shape)
        r = min(shape[0], mn // shape[0]) if shape[0] else 0
        need = max(need, 6 * mn * itemsize + 3 * r * r * 8)
    if device.type == "cpu":
        return max(1, min(torch.get_num_threads(), 4, _CPU_STREAMS_BYTES // max(need, 1)))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(8, free // 2 // max(need, 1)))


def _delta(item: Loaded, i: int, tuned: TunedSource, ref: str, W0: torch.Tensor, device: torch.device,
           dtype: torch.dtype) -> Delta:
    """ΔW of source ``i`` for the job's matrix: its own delta, or W_t − W_0 for a full fine-tune."""
    job = item.job
    if i not in item.Wt:
        return delta_to(tuned.delta(ref, W0, job.kind), device, dtype)
    stored = item.Wt[i]
    file = tuned.ckpt.file_of(ref)
    require_real(stored, file, ref)
    Wt = orient(stored.to(device, non_blocking=True).to(dtype), job.kind)
    if Wt.shape != W0.shape:
        raise MismatchError(
            f"{file}: tensor '{ref}' has shape {tuple(Wt.shape)} but the base matrix has {tuple(W0.shape)}"
        )
    require_finite(Wt, file, ref)
    if item.wt_owned[i] or Wt.data_ptr() != stored.data_ptr():
        return Wt.sub_(W0)  # in place: saves one matrix of memory
    return Wt - W0  # Wt is the checkpoint's own tensor (e.g. a memory-mapped .bin): leave it alone
