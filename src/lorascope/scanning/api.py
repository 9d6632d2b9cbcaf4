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
    PEFT adapter folder, a kohya LoRA file or a ``lorascope train`` run folder. ``residual_base``: for a
    PEFT adapter whose init changed the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) and was saved
    relative to it, the model saved right after the init (W_res); ΔW = W_res + update − W_0 is then
    measured against ``base``. Settings come as ``options`` or as keywords of
    ``ScanOptions`` (``k=10, epsilon=0.5, side="left", modules=None, embeddings=False,
    device="auto", dtype="float32", cache_dir=None, cache_budget="20GB", streams=None``).
    ``basis``: a hook ``(key, W) -> SVD`` that supplies base bases (wins over ``cache_dir``).
    Under torchrun the matrices are split over the ranks. Returns a ``ScanResult``;
    ``result.save(dir)`` writes scan.json.
    """
    import torch  # here, not at module level: `import lorascope` stays light

    from lorascope.io.checkpoint import Checkpoint
    from lorascope.io.tuned import open_tuned
    from lorascope.runtime import library_versions, resolve_device
    from lorascope.scanning import distributed
    from lorascope.scanning.cache import BasisCache
    from lorascope.scanning.engine import scan_records
    from lorascope.scanning.pairing import pair_matrices

    opts = (options or ScanOptions()).with_(**settings) if settings else (options or ScanOptions())
    dtype = {"float32": torch.float32, "float64": torch.float64}[opts.dtype]
    dev = distributed.setup(resolve_device(opts.device))
    t0 = time.perf_counter()
    base_ckpt = Checkpoint(base)
    tuned_src = open_tuned(tuned, residual_base)
    pairs, unpaired = pair_matrices(base_ckpt, tuned_src, opts)
    cache = BasisCache(opts.cache_dir, opts.cache_budget) if opts.cache_dir and basis is None else None
    share = distributed.share(pairs, base_ckpt)
    records: list[MatrixRecord] = []
    stream = scan_records(base_ckpt, tuned_src, share, opts.k, opts.epsilon, opts.sides, dev, dtype, basis, cache,
                          streams=opts.streams)
    if progress:
        from rich.progress import track

        stream = track(stream, total=len(share), description="scanning matrices", transient=True)
    for recs in stream:
        records.extend(recs)
    records = distributed.gather(records, pairs)
    settings_out = dict(
        base=str(base), tuned=str(tuned), tuned_kind=tuned_src.kind, k=opts.k, epsilon=opts.epsilon,
        side=opts.side, modules=opts.modules, embeddings=opts.embeddings, device=str(dev), dtype=opts.dtype,
        base_basis_dtype="float64",
    )
    if residual_base is not None:
        settings_out["residual_base"] = str(residual_base)
    return ScanResult(
        settings=settings_out,
        matrices=records,
        versions=library_versions(),
        unpaired=unpaired,
        timing={"seconds": round(time.perf_counter() - t0, 3), "n_matrices": len(pairs)},
        command=" ".join(sys.argv) if sys.argv and "lorascope" in sys.argv[0] else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
