"""An on-disk cache of base decompositions, so scanning many adapters of one base pays once.

Alg. 1 needs all left singular vectors of every base matrix W_0; for a 7B model that is most of
a scan's time (one float64 eigendecomposition of a 4096 × 4096 Gram matrix per matrix). The
basis depends only on W_0, so it is stored under a content key:

    key = sha256(stored bytes of the tensor, its dtype and shape) + layout kind + side + compute dtype

and a cheap identity memo, (real path, size, mtime_ns, tensor name) → sha256, spares a second
scan the hashing. Entries are safetensors files: U in float16 (orthonormal columns lose about
3e-4/√m per cosine; measured in docs/performance.md) and the singular values in float64. A size
budget is kept by evicting the least recently used entries.

    lorascope scan BASE ADAPTER --cache-dir ~/.cache/lorascope --cache-budget 20GB
    scan(base, adapter, cache_dir="~/.cache/lorascope")         # the same from Python
    scan(base, adapter, basis=BasisCache("~/.cache/lorascope"))  # the generic basis= hook

Index: ``index.sqlite`` (tables ``memo`` and ``entries``); data: ``bases/<2 hex>/<key>.safetensors``.
Several processes (torchrun ranks) may share one folder: files are written atomically and SQLite
serialises the index.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from lorascope.errors import InputError
from lorascope.io.checkpoint import TensorSource, read_location, safetensors_header
from lorascope.io.layout import orient
from lorascope.io.writers import atomic_write_bytes
from lorascope.spectral import SVD, left_basis

FORMAT = "1"  # bump when the stored maths or layout changes: old entries are then never matched
DEFAULT_BUDGET = "20GB"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: str | int) -> int:
    """'20GB' → 20·10⁹ bytes; '1.5GiB' → 1.5·2³⁰; an int is taken as bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read the size '{size}' (examples: 20GB, 500MB, 1.5GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes as stored."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    t = t.detach().contiguous().cpu()
    # hashlib releases the GIL for large buffers, so worker threads hash in parallel
    h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b""))
    return h.hexdigest()


class BasisCache:
    """Left singular bases of base matrices on disk, keyed by content, with an LRU size budget.

    Called as ``cache(key, W)`` it is a ``basis=`` hook for ``scan`` (hashing W itself);
    ``scan(cache_dir=...)`` uses ``hook()`` instead, which hashes the stored bytes in the reader
    threads and remembers the hash per file identity.
    """

    def __init__(self, root: str | os.PathLike, budget: str | int = DEFAULT_BUDGET):
        self.root = Path(root).expanduser()
        self.budget = parse_size(budget)
        try:
            (self.root / "bases").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.root}: cannot create the cache folder ({e})") from e
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "index.sqlite", timeout=60, check_same_thread=False,
                                   isolation_level=None)
        # Switching to WAL needs an exclusive lock, and SQLite may answer "database is locked" at
        # once, without waiting out the timeout, when another process (a torchrun rank) opens the
        # index at the same moment: retry for up to a minute.
        for attempt in range(600):
            try:
                with self._lock:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("CREATE TABLE IF NOT EXISTS memo (path TEXT, size INTEGER, mtime INTEGER, "
                                     "tensor TEXT, digest TEXT, PRIMARY KEY (path, size, mtime, tensor))")
                    self._db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, "
                                     "nbytes INTEGER, last_used REAL)")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 599:
                    raise InputError(f"{self.root}: cannot open the cache index ({e})") from e
                time.sleep(0.1)
        self.stats = {"hits": 0, "misses": 0, "hashed": 0, "memo_hits": 0, "evicted": 0}

    # -- identity memo ---------------------------------------------------------------------
    def digest(self, file: Path, tensor: str, t: torch.Tensor) -> str:
        """The content digest of ``tensor`` in ``file``, from the memo when path, size and mtime match."""
        st = os.stat(file)
        ident = (str(Path(file).resolve()), st.st_size, st.st_mtime_ns, tensor)
        with self._lock:
            row = self._db.execute("SELECT digest FROM memo WHERE path=? AND size=? AND mtime=? AND tensor=?",
                                   ident).fetchone()
        if row:
            self.stats["memo_hits"] += 1
            return row[0]
        d = tensor_digest(t)
        self.stats["hashed"] += 1
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?)", (*ident, d))
        return d

    # -- entries ---------------------------------------------------------------------------
    @staticmethod
    def entry_key(digest: str, kind: str, side: str, dtype: torch.dtype) -> str:
        return f"{digest[:40]}-{kind}-{side}-{str(dtype).replace('torch.', '')}-v{FORMAT}"

    def _path(self, key: str) -> Path:
        return self.root / "bases" / key[:2] / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int, int], pin: bool = False) -> SVD | None:
        """The stored basis (U float16, S float64, on CPU) or None; a damaged entry counts as a miss."""
        path = self._path(key)
        m, n = shape
        try:
            locations = safetensors_header(path)
            U, S = read_location(locations["U"], pin)[0], read_location(locations["S"], pin)[0]
            if tuple(U.shape) != (m, min(m, n)) or tuple(S.shape) != (min(m, n),):
                raise ValueError(f"stored shapes {tuple(U.shape)}, {tuple(S.shape)} do not fit {shape}")
        except Exception:  # unreadable, truncated or foreign: a miss, recomputed and rewritten
            self.stats["misses"] += 1
            return None
        with self._lock:
            self._db.execute("UPDATE entries SET last_used=? WHERE key=?", (time.time(), key))
        self.stats["hits"] += 1
        return SVD(U=U, S=S)

    def store(self, key: str, U: torch.Tensor, S: torch.Tensor) -> None:
        """Write one entry (U as float16) atomically, then evict least recently used entries."""
        data = st_save({"U": U.to(torch.float16).contiguous().cpu(), "S": S.to(torch.float64).cpu()})
        if len(data) > self.budget:
            return  # larger than the whole budget: not worth evicting everything for
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (key, len(data), time.time()))
        self.evict()

    def evict(self) -> None:
        """Delete least recently used entries until the total size is within the budget."""
        with self._lock:
            total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0]
            while total > self.budget:
                row = self._db.execute("SELECT key, nbytes FROM entries ORDER BY last_used LIMIT 1").fetchone()
                if row is None:
                    break
                self._path(row[0]).unlink(missing_ok=True)
                self._db.execute("DELETE FROM entries WHERE key=?", (row[0],))
                total -= row[1]
                self.stats["evicted"] += 1

    def size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0])

    # -- the generic basis= hook -------------------------------------------------------------
    def __call__(self, key: str, W: torch.Tensor) -> SVD:
        """``scan(basis=cache)``: look W up by the hash of its own bytes (as oriented, in compute dtype)."""
        side = key.rsplit(":", 1)[-1]
        ekey = self.entry_key(tensor_digest(W), "matrix", side, W.dtype)
        hit = self.load(ekey, tuple(W.shape))
        if hit is not None:
            return SVD(U=hit.U.to(W.device, W.dtype), S=hit.S.to(W.device))
        svd = left_basis(W)
        self.store(ekey, svd.U, svd.S)
        return svd

    def hook(self, dtype: torch.dtype, sides: tuple[str, ...] = ("left",)) -> ScanHook:
        return ScanHook(self, dtype, sides)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ScanHook:
    """The cache inside ``pipeline.scan_records``: ``prefetch`` runs in reader threads (hash or memo,
    then read the stored bases), ``basis_for`` gives the ``basis`` hook of one pair, and new
    bases are written by one background thread so the device never waits for the disk."""

    def __init__(self, cache: BasisCache, dtype: torch.dtype, sides: tuple[str, ...]):
        self.cache, self.dtype, self.sides = cache, dtype, sides
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="lorascope-cache-writer", daemon=True)
        self._writer.start()

    def prefetch(self, ckpt: TensorSource, name: str, kind: str, W0: torch.Tensor) -> dict[str, Any]:
        digest = self.cache.digest(ckpt.file_of(name), name, W0)
        m, n = orient(torch.empty(W0.shape, device="meta"), kind).shape
        out: dict[str, Any] = {"keys": {}, "hits": {}}
        for side in self.sides:
            key = self.cache.entry_key(digest, kind, side, self.dtype)
            out["keys"][side] = key
            hit = self.cache.load(key, (m, n) if side == "left" else (n, m), pin=W0.is_pinned())
            if hit is not None:
                out["hits"][side] = hit
        return out

    def basis_for(self, extra: dict[str, Any]) -> Callable[[str, torch.Tensor], SVD]:
        """The ``basis`` hook for one pair, given what ``prefetch`` returned for it."""

        def basis(key: str, W: torch.Tensor) -> SVD:
            side = key.rsplit(":", 1)[-1]
            hit = extra.get("hits", {}).get(side)
            if hit is not None:
                return SVD(U=hit.U.to(W.device, non_blocking=True).to(W.dtype), S=hit.S.to(W.device))
            svd = left_basis(W)
            ekey = extra.get("keys", {}).get(side)
            if ekey is not None:
                self._raise_writer_error()
                self._queue.put((ekey, svd.U.to(torch.float16), svd.S))
            return svd

        return basis

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is None:
                    self.cache.store(*job)
            except BaseException as e:  # reported on the compute thread at the next put or at close
                self._error = e

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise InputError(f"{self.cache.root}: cannot write to the basis cache ({self._error})")

    def close(self) -> None:
        """Wait for pending writes (called when the scan ends, also on error)."""
        self._queue.put(None)
        self._writer.join()
        self._raise_writer_error()
