"""``lorascope.scan``: compare a fine-tune or adapter with its base, Alg. 1 on every matrix.

The data flow (docs/architecture.md): the base ``Checkpoint`` and the tuned source
(``io.tuned.open_tuned``) are paired by name (``pairing``), split over torchrun ranks
(``distributed``), streamed through the one scan loop (``engine.scan_records``, which calls
``analyze.analyze_matrix`` per pair) and gathered into a ``schema.ScanResult``.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from typing import Any

from lorascope.errors import InputError
from lorascope.progress import Progress
from lorascope.scanning.analyze import BasisFn
from lorascope.scanning.options import ScanOptions
from lorascope.schema import MatrixRecord, ScanResult


def scan(
    base: str,
    tuned: str,
    options: ScanOptions | None = None,
    *,
    progress: bool = False,
    basis: BasisFn | None = None,
    residual_base: str | None = None,
    **settings: Any,
) -> ScanResult:
    """Compare a fine-tuned model or adapter with its base (paper Alg. 1 on every matrix).

    ``base``: HF model folder, weight file or hub id. ``tuned``: the same for a full fine-tune, a
    PEFT adapter folder, a kohya, diffusers or LyCORIS file, or a ``lorascope train`` run folder.
    ``residual_base``: for a PEFT adapter whose init changed the base (PiSSA, OLoRA, CorDA, LoRA-GA,
    LoftQ) and was saved relative to it, the model saved right after the init (W_res); ΔW = W_res +
    update − W_0 is then measured against ``base``. Settings come as ``options`` or as keywords of
    ``ScanOptions`` (``k=10, epsilon=0.5, side="left", modules=None, embeddings=False,
    device="auto", dtype="float32", cache_dir=None, cache_budget="20GB", streams=None``).
    ``basis``: a hook ``(key, W) -> SVD`` that supplies base bases (wins over ``cache_dir``).
    Under torchrun the matrices are split over the ranks. Returns a ``ScanResult``;
    ``result.save(dir)`` writes scan.json.
    """
    return scan_many(base, [tuned], options, progress=progress, basis=basis, residual_base=residual_base,
                     **settings)[0]


def scan_many(
    base: str,
    tuned: list[str],
    options: ScanOptions | None = None,
    *,
    progress: bool | Progress = False,
    basis: BasisFn | None = None,
    residual_base: str | None = None,
    **settings: Any,
) -> list[ScanResult]:
    """``scan`` of several fine-tunes or adapters of one base at once: each base matrix is read and
    decomposed once, whatever the number of inputs, and each input gets the ``ScanResult`` (the
    same records) that ``scan`` of it alone gives. Arguments as in ``scan``; ``progress`` may also be a
    ``lorascope.progress.Progress`` (its stages: loading, then reading and decomposing the matrices)."""
    import torch  # here, not at module level: `import lorascope` stays light

    from lorascope.io.checkpoint import Checkpoint
    from lorascope.io.tuned import open_tuned
    from lorascope.runtime import library_versions, resolve_device
    from lorascope.scanning import distributed
    from lorascope.scanning.cache import BasisCache
    from lorascope.scanning.engine import jobs_of, scan_jobs, warm_up
    from lorascope.scanning.pairing import pair_matrices

    opts = (options or ScanOptions()).with_(**settings) if settings else (options or ScanOptions())
    if not tuned:
        raise InputError("no fine-tune or adapter to scan")
    dtype = {"float32": torch.float32, "float64": torch.float64}[opts.dtype]
    dev = distributed.setup(resolve_device(opts.device))
    shown = progress if isinstance(progress, Progress) else Progress(bool(progress))
    t0 = time.perf_counter()
    warming = warm_up(dev)  # overlaps the opening and pairing below
    with shown.stage(f"loading {base} and {len(tuned)} tuned input{'s' if len(tuned) > 1 else ''}"):
        base_ckpt = Checkpoint(base)
        sources = [open_tuned(t, residual_base) for t in tuned]
        paired = [pair_matrices(base_ckpt, src, opts) for src in sources]
    jobs = jobs_of(base_ckpt, [pairs for pairs, _ in paired])
    cache = BasisCache(opts.cache_dir, opts.cache_budget) if opts.cache_dir and basis is None else None
    share = distributed.share(jobs, base_ckpt)
    if warming is not None:
        warming.join()
    records: list[list[MatrixRecord]] = [[] for _ in sources]
    stream = scan_jobs(base_ckpt, sources, share, opts.k, opts.epsilon, opts.sides, dev, dtype, basis, cache,
                       streams=opts.streams)
    for results in shown.track(stream, len(share), "reading and decomposing matrices"):
        for i, recs in results:
            records[i].extend(recs)
    seconds = round(time.perf_counter() - t0, 3)
    versions = library_versions()
    command = " ".join(sys.argv) if sys.argv and "lorascope" in sys.argv[0] else None
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = []
    for spec, src, (pairs, unpaired), recs in zip(tuned, sources, paired, records, strict=True):
        settings_out = dict(
            base=str(base), tuned=str(spec), tuned_kind=src.kind, k=opts.k, epsilon=opts.epsilon, side=opts.side,
            modules=opts.modules, embeddings=opts.embeddings, device=str(dev), dtype=opts.dtype,
            base_basis_dtype="float64",
        )
        if residual_base is not None:
            settings_out["residual_base"] = str(residual_base)
        timing: dict[str, Any] = {"seconds": seconds, "n_matrices": len(pairs)}
        if len(sources) > 1:
            timing["scanned_together"] = len(sources)  # seconds: the whole batch's
        if cache is not None:  # thread-seconds inside the cache; waiting_for_writers is on the scan's path
            timing["cache_seconds"] = {what: round(t, 3) for what, t in cache.seconds.items()}
        out.append(ScanResult(settings=settings_out, matrices=distributed.gather(recs, pairs), versions=versions,
                              unpaired=unpaired, timing=timing, command=command, created=created))
    return out
