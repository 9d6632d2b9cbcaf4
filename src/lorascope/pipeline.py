"""The scan's fast path: overlapped reads, no memory maps, a lean float64 base basis.

``scan`` runs Alg. 1 on every matrix pair through ``scan_records``, which does the same maths as
``lorascope.scan.iter_scan`` (the same ``analyze_matrix``) with four changes, each measured in
docs/performance.md:

1. Reads overlap the arithmetic. Worker threads read the next tensors while the device works on
   the current pair: plain positioned reads straight into (pinned, when the device is a GPU)
   host buffers, so the copy to the GPU is asynchronous. File reads release the GIL.
2. No memory maps for safetensors. A mapped file's pages count in the process's resident set as
   they are touched, so scanning an 8 GB pair through mmap shows an 8 GB RSS; plain reads into
   buffers that are freed after each pair keep the peak near the largest matrix pair instead.
3. The base basis (``gram_left_basis``) is the float64 Gram route of ``left_basis`` computed in
   column or row blocks, so no float64 copy of W is ever held whole, and U comes back in W's dtype.
4. On a GPU several pairs are analysed at once, each in its own thread and CUDA stream, so the
   GPU never waits on one thread's kernel launches and synchronisations.

Optional: a ``BasisCache`` (lorascope.cache) supplies bases from disk; its look-ups happen in the
worker threads too, so a cached scan is bound by reading W0 and U, not by a decomposition.
"""

from __future__ import annotations

import contextlib
import json
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

from lorascope.errors import InputError, MismatchError, NonFiniteError
from lorascope.io.checkpoint import Checkpoint
from lorascope.io.layout import orient
from lorascope.schema import MatrixRecord
from lorascope.spectral import SVD
from lorascope.spectral.operators import Delta, delta_to

if TYPE_CHECKING:
    from lorascope.cache import BasisCache
    from lorascope.io.adapters import TunedSource
    from lorascope.scan import MatrixPair

BasisFn = Callable[[str, torch.Tensor], SVD]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_GRAM_BLOCK = {"cpu": 1 << 24, "cuda": 1 << 28}  # elements of W made float64 at a time: 128 MB, 2 GB


# -- reading tensors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check every entry
    against the file size, so a truncated or malformed file fails here with its name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 100_000_000):
            raise InputError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise InputError(f"{path}: not a safetensors file (unreadable header: {e})") from e
    out: dict[str, TensorLocation] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if dtype is None:
            continue  # fp8 and friends: read through Checkpoint.get instead
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or 8 + n + end > size or begin < 0:
            raise InputError(f"{path}: tensor '{name}' has byte range {begin}..{end}, which does not fit "
                             f"its shape {list(shape)} or the file ({size} bytes)")
        out[name] = TensorLocation(path, name, dtype, shape, 8 + n + begin, end - begin)
    return out


class TensorReader:
    """Reads named tensors of a ``Checkpoint`` without memory maps (safetensors files), optionally
    into pinned memory. Other formats go through ``Checkpoint.get``. Thread-safe."""

    def __init__(self, ckpt: Checkpoint, pin: bool = False):
        self.ckpt, self.pin = ckpt, pin
        self._headers: dict[Path, dict[str, TensorLocation]] = {}
        self._lock = threading.Lock()

    def locate(self, name: str) -> TensorLocation | None:
        f = self.ckpt.file_of(name)
        if f.suffix != ".safetensors":
            return None
        with self._lock:
            if f not in self._headers:
                self._headers[f] = safetensors_header(f)
        return self._headers[f].get(name)

    def read(self, name: str) -> tuple[torch.Tensor, memoryview | None]:
        """The tensor (CPU, stored dtype and layout) and, when read from a file, its raw bytes."""
        loc = self.locate(name)
        if loc is None:
            return self.ckpt.get(name, check_finite=False), None
        return read_location(loc, self.pin)


def read_location(loc: TensorLocation, pin: bool = False) -> tuple[torch.Tensor, memoryview]:
    """Read one tensor's bytes with plain reads (no mmap) into a fresh, optionally pinned, buffer."""
    buf = torch.empty(loc.nbytes, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buf.numpy()) if loc.nbytes else memoryview(bytearray())
    with open(loc.file, "rb", buffering=0) as f:
        f.seek(loc.offset)
        done = 0
        while done < loc.nbytes:  # a raw read may return fewer bytes than asked: loop until complete
            got = f.readinto(view[done:])
            if not got:
                raise InputError(f"{loc.file}: tensor '{loc.name}' is truncated (the file ends early)")
            done += got
    return buf.view(loc.dtype).reshape(loc.shape), view


def read_safetensors(path: Path, pin: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) safetensors file, read without mmap."""
    return {name: read_location(loc, pin)[0] for name, loc in safetensors_header(path).items()}


def check_finite(t: torch.Tensor, file: Path | str, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{file}: tensor '{name}' holds NaN or Inf values")


# -- the base basis ------------------------------------------------------------------------------
def gram_left_basis(W: torch.Tensor, block: int | None = None) -> SVD:
    """All left singular vectors of W (m × n) by the float64 Gram route of ``left_basis``.

    m ≤ n: W Wᵀ = Σ_b W[:, b] W[:, b]ᵀ accumulated over column blocks b in float64, then eigh:
    W Wᵀ = U Σ² Uᵀ. m > n: WᵀW = V Σ² Vᵀ from row blocks, then u_i = W v_i / ‖W v_i‖ row block by
    row block (columns with ‖W v_i‖ ≤ eps·max·max(m, n) are set to zero, as in ``left_basis``).
    Only blocks of W are ever float64; U is returned in W's dtype, S in float64.
    """
    m, n = W.shape
    f64 = torch.float64
    block = block or _GRAM_BLOCK.get(W.device.type, 1 << 24)
    if m <= n:
        G = torch.zeros(m, m, dtype=f64, device=W.device)
        step = max(1, block // max(m, 1))
        for j in range(0, n, step):
            Wb = W[:, j:j + step].to(f64)
            G.addmm_(Wb, Wb.T)
        evals, U = torch.linalg.eigh(G)
        del G
        return SVD(U=U.flip(1).to(W.dtype), S=evals.flip(0).clamp_min(0).sqrt())
    G = torch.zeros(n, n, dtype=f64, device=W.device)
    step = max(1, block // max(n, 1))
    for i in range(0, m, step):
        Wb = W[i:i + step].to(f64)
        G.addmm_(Wb.T, Wb)
    evals, V = torch.linalg.eigh(G)
    del G
    V = V.flip(1)
    S = evals.flip(0).clamp_min(0).sqrt()
    sq = torch.zeros(n, dtype=f64, device=W.device)
    U = torch.empty(m, n, dtype=W.dtype, device=W.device)
    for i in range(0, m, step):  # W V row block by row block; normalise the columns at the end
        P = W[i:i + step].to(f64) @ V
        sq += P.square().sum(0)
        U[i:i + step] = P.to(W.dtype)
    norms = sq.sqrt()
    tiny = norms <= torch.finfo(f64).eps * norms.max() * max(m, n)
    inv = torch.where(tiny, torch.zeros_like(norms), 1 / norms.clamp_min(torch.finfo(f64).tiny))
    U.mul_(inv.to(W.dtype))
    return SVD(U=U, S=S, V=V)


def default_basis(key: str, W: torch.Tensor) -> SVD:
    """The scan's ``basis`` hook when no cache is given: ``gram_left_basis``."""
    return gram_left_basis(W)


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

    On a GPU the host buffers are pinned and copied to the device right here, on a copy stream, so
    transfers overlap the arithmetic of the previous pair; ``Loaded.ready`` marks their completion.
    """

    def __init__(self, base: Checkpoint, tuned: TunedSource, device: torch.device, cache_hook=None):
        cuda = device.type == "cuda"
        self.base = TensorReader(base, pin=cuda)
        self.full = getattr(tuned, "kind", None) == "full" and hasattr(tuned, "ckpt")
        self.tuned = TensorReader(tuned.ckpt, pin=cuda) if self.full else None
        self.cache_hook = cache_hook
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if cuda else None

    def __call__(self, pair: MatrixPair) -> Loaded:
        W0, raw = self.base.read(pair.name)
        item = Loaded(pair, W0, self.base.ckpt.file_of(pair.name))
        if self.cache_hook is not None:
            item.extra = self.cache_hook.prefetch(self.base.ckpt, pair.name, pair.kind, W0, raw)
        if self.tuned is not None:
            item.Wt, raw_t = self.tuned.read(pair.ref)
            item.tuned_file = self.tuned.ckpt.file_of(pair.ref)
            item.wt_owned = raw_t is not None or self.copy_stream is not None
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
    base: Checkpoint,
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

    Same maths as ``lorascope.scan.iter_scan``; reads run ``depth`` pairs ahead (default 2·streams on
    a GPU, 2 on the CPU, where each pending pair costs resident memory) on ``workers`` threads.
    ``basis`` (a caller's hook) wins over ``cache``; without either, ``gram_left_basis``.

    ``streams`` pairs are analysed at once, each in its own thread (and CUDA stream); the default is
    ``default_streams``. One thread cannot keep a GPU busy: Alg. 1 on one pair is hundreds of small
    operations and several waits for their results (docs/performance.md). torch releases the GIL
    while it launches kernels and while it waits, so with a few threads the GPU always has work,
    e.g. the Krylov steps of some pairs run while another pair's base ``eigh`` does. Each pair's
    arithmetic is unchanged, so the records do not depend on ``streams``.
    """
    from lorascope.scan import analyze_matrix

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
            check_finite(W0, item.base_file, p.name)
            delta = _delta(item, tuned, W0, device, dtype)
            basis_fn = basis or (hook.basis_for(item.extra) if hook is not None else default_basis)
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


def default_streams(base: Checkpoint, pairs: list[MatrixPair], device: torch.device, dtype: torch.dtype) -> int:
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
    check_finite(Wt, item.tuned_file, p.ref)
    if item.wt_owned or Wt.data_ptr() != item.Wt.data_ptr():
        return Wt.sub_(W0)  # in place: saves one matrix of memory
    return Wt - W0  # Wt is the checkpoint's own tensor (e.g. a memory-mapped .bin): leave it alone
