"""``lorascope.merge``: combine several adapters of one base, matrix by matrix, and write the result.

The data flow: the base ``Checkpoint`` and every input (``io.tuned.open_tuned``, any registered
format) are paired by name (``scanning.pairing``); all inputs must change the same matrices of the
same base. Per matrix, in base order, the inputs' ΔW_i (``TunedSource.delta``) are stacked in float64
on the compute device and given to the method (``merging.methods``); the result is written as exact
LoRA factors or merged weights (``merging.writers``). With ``scan`` the merge's intruders are found
against the base and attributed to the inputs (``merging.analysis``), and the existing scan is run on
every output and input.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from lorascope.errors import InputError
from lorascope.io.writers import folder_labels
from lorascope.merging.options import SPARSIFYING, MergeOptions
from lorascope.scanning.options import ScanOptions
from lorascope.schema import MergeResult


def merge(
    base: str,
    adapters: list[str],
    out: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    scan: bool = False,
    scan_options: ScanOptions | None = None,
    overwrite: bool = False,
    progress: bool = False,
    labels: list[str] | None = None,
    **settings: Any,
) -> MergeResult:
    """Merge ``adapters`` (two or more, of the one ``base``) with ``options.method`` and write OUT.

    OUT holds a PEFT LoRA adapter whose ΔW equals the merged update exactly (each matrix at the rank
    it needs, in ``rank_pattern``), or with ``format="merged"`` a safetensors model; EMR writes one
    of them per input, in OUT/<input name>/. OUT/merge.json (``schema.MergeResult``) records the
    method, its settings, each input's sha256 and, per matrix, the ranks and the written weights'
    relative error. ``scan``: find the merge's intruders (``scan_options``: k, ε) and which inputs they
    come from, and write OUT/scans/<name>/scan.json for every output and input. Settings come as
    ``options`` or as keywords of ``MergeOptions``. ``out`` must not exist unless ``overwrite``.
    ``labels``: a unique name per input (its folder's by default), used for EMR's folders and scans.
    """
    import torch  # here, not at module level: `import lorascope` stays light

    from lorascope.io.checkpoint import Checkpoint, require_real
    from lorascope.io.layout import orient
    from lorascope.io.tuned import open_tuned
    from lorascope.io.writers import atomic_dir, guard_output
    from lorascope.merging import analysis, writers
    from lorascope.merging.methods import METHODS, Params
    from lorascope.runtime import library_versions, resolve_device
    from lorascope.spectral.operators import dense

    t0 = time.perf_counter()
    opts = (options or MergeOptions()).with_(**settings) if settings else (options or MergeOptions())
    sopts = scan_options or ScanOptions()
    weights = opts.weights_for(len(adapters))
    method = METHODS[opts.method]
    dev = resolve_device(opts.device)
    base_ckpt = Checkpoint(base)
    sources = [open_tuned(a) for a in adapters]
    labels = list(labels) if labels is not None else folder_labels(adapters)
    if len(labels) != len(adapters) or len(set(labels)) != len(labels):
        raise InputError(f"labels {labels} must name each of the {len(adapters)} inputs once")
    guard_output(out, {"base": base_ckpt.root, **{f"adapter {lab}": s.root for lab, s in zip(labels, sources,
                                                                                             strict=True)}})
    _check_one_base(adapters, sources)
    pairs, unpaired = _common_pairs(base_ckpt, sources, adapters, opts)
    if opts.format == "adapter":
        bad = [p for p in pairs[0] if p.kind not in ("linear", "conv1d")]
        if bad:
            raise InputError(f"'{bad[0].name}' is a {bad[0].kind} matrix: the adapter output holds Linear and "
                             "Conv1D modules only; use --format merged (or --modules to leave it out)")
        if len({p.kind for p in pairs[0]}) > 1:
            raise InputError("the adapters change both Linear and Conv1D (fan_in_fan_out) modules, which one LoRA "
                             "config cannot hold; use --format merged")
    outputs = labels if method.per_input else ["merge"]
    w = torch.tensor(weights, dtype=torch.float64, device=dev)
    density = opts.resolved_density
    records = []
    attribution = analysis.Attribution(sopts.k, sopts.epsilon) if scan else None

    def compute(i: int, W0_stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_0, the outputs' ΔW stacked (n_out, m, n)) of pair ``i``, float64 on the device."""
        name, kind = pairs[0][i].name, pairs[0][i].kind
        require_real(W0_stored, base_ckpt.file_of(name), name)
        W0 = orient(W0_stored, kind).to(dev, torch.float64)
        raw = [src.delta(ps[i].ref, W0, kind) for src, ps in zip(sources, pairs, strict=True)]
        deltas = torch.stack([dense(d).to(dev, torch.float64) for d in raw])
        gen = torch.Generator().manual_seed(matrix_seed(opts.seed, name))
        merged = method.fn(deltas, w, Params(density, gen))
        merged = merged if method.per_input else merged[None]
        rec = dict(name=name, kind=kind, shape=list(W0.shape), sources=[ps[i].ref for ps in pairs],
                   input_ranks=[_rank(d) for d in raw],
                   delta_rel_norm=[float(d.norm() / W0.norm()) if W0.norm() > 0 else 0.0 for d in merged])
        if attribution is not None:
            rec["intruders"] = attribution.matrix(W0, deltas, merged)
        records.append(rec)
        return W0, merged

    order = list(range(len(pairs[0])))
    if progress:
        from rich.progress import track

        order = track(order, description="merging matrices", transient=True)
    with atomic_dir(out, overwrite) as tmp, torch.no_grad():
        folders = [tmp] if len(outputs) == 1 else [tmp / lab for lab in outputs]
        if opts.format == "adapter":
            config = writers.adapter_config(getattr(sources[0], "config", None), pairs[0][0].kind == "conv1d")
            out_writers = [writers.AdapterWriter(config) for _ in outputs]
            for i in order:
                W0, merged = compute(i, base_ckpt.get(pairs[0][i].name))
                module = _module_name(sources[0], pairs[0][i])
                done = [wr.add(module, W0, d) for wr, d in zip(out_writers, merged, strict=True)]
                records[-1]["rank_after"] = [r for r, _ in done]
                records[-1]["rel_error"] = [e for _, e in done]
            files = [wr.write(folder) for wr, folder in zip(out_writers, folders, strict=True)][0]
        else:
            index = {p.name: i for i, p in enumerate(pairs[0])}

            def merged_weights(pair, W0_stored):
                W0, merged = compute(index[pair.name], W0_stored)
                exact = [W0 + d for d in merged]
                stored = [W.to(W0_stored.dtype).to(W0) for W in exact]  # what the shard holds
                records[-1]["rank_after"] = [int(torch.linalg.matrix_rank(d)) for d in merged]
                records[-1]["rel_error"] = [writers.rel_error(s, e) for s, e in zip(stored, exact, strict=True)]
                return exact

            files = writers.write_merged(base_ckpt, {p.name: p for p in pairs[0]}, folders, merged_weights)
        from lorascope.schema import MatrixMerge, MergedIntruder

        order_of = {p.name: i for i, p in enumerate(pairs[0])}
        records.sort(key=lambda r: order_of[r["name"]])
        matrices = [MatrixMerge(**{**r, "intruders": [MergedIntruder(**x) for x in r.get("intruders", [])]})
                    for r in records]
        out_list = [{"label": lab, "path": str(Path(out) if len(outputs) == 1 else Path(out) / lab), "files": files,
                     "bytes": sum((f / n).stat().st_size for n in files)} for lab, f in zip(outputs, folders,
                                                                                            strict=True)]
        storage = _storage(sources, out_list, matrices, method.per_input, opts.format)
        result = MergeResult(
            settings=dict(base=str(base), adapters=[str(a) for a in adapters], labels=labels, method=opts.method,
                          weights=None if not method.weights else list(weights),
                          density=density if opts.method in SPARSIFYING else None, seed=opts.seed,
                          format=opts.format, modules=opts.modules, embeddings=opts.embeddings, device=str(dev),
                          dtype="float64", input_sha256={lab: digest(s.root) for lab, s in zip(labels, sources,
                                                                                            strict=True)}),
            matrices=matrices,
            output={"path": str(out), "format": opts.format, "outputs": out_list, "storage": storage},
            unpaired=unpaired,
            versions=library_versions(),
            timing={"seconds": round(time.perf_counter() - t0, 3), "n_matrices": len(matrices)},
            command=" ".join(sys.argv) if sys.argv and "lorascope" in sys.argv[0] else None,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        if scan:
            result.analysis = analysis.scan_outputs(base, [(o["label"], f, o["path"]) for o, f in
                                                           zip(out_list, folders, strict=True)],
                                                    list(zip(labels, adapters, strict=True)), tmp, sopts, matrices)
        result.save(tmp)
    return result


def _rank(delta) -> int | None:
    from lorascope.spectral.operators import LowRankDelta

    return delta.rank if isinstance(delta, LowRankDelta) else None


def _module_name(source, pair) -> str:
    """The PEFT module path of a matrix: the input's own (a PEFT adapter's), else the base name."""
    if type(source).__name__ == "PeftAdapter" and not pair.ref.startswith("saved:"):
        return pair.ref
    return pair.name[: -len(".weight")] if pair.name.endswith(".weight") else pair.name


def _check_one_base(adapters: list[str], sources: list) -> None:
    """Adapters that name different base models in their configs are refused (the shapes are checked
    against the base when ΔW is read)."""
    named = {a: (getattr(s, "config", None) or {}).get("base_model_name_or_path") for a, s in zip(adapters, sources,
                                                                                                  strict=True)}
    names = {v for v in named.values() if v}
    if len(names) > 1:
        detail = "; ".join(f"{a}: {v}" for a, v in named.items() if v)
        raise InputError(f"the adapters were trained on different base models ({detail}): a merge needs one base")


def _common_pairs(base_ckpt, sources, adapters, opts: MergeOptions):
    """Each input's pairs with the base, in base order, and what is left out; every input must change the
    same matrices."""
    from lorascope.scanning.pairing import pair_matrices

    sopts = ScanOptions(modules=opts.modules, embeddings=opts.embeddings)
    pairs, unpaired = [], {}
    for a, src in zip(adapters, sources, strict=True):
        ps, skipped = pair_matrices(base_ckpt, src, sopts)
        # modules_to_save (a task's head, a saved pooler) are each input's own: kept out of the merge
        saved = [p.name for p in ps if p.ref.startswith("saved:")]
        pairs.append([p for p in ps if not p.ref.startswith("saved:")])
        for key, names in {**skipped, "modules_to_save_not_merged": saved}.items():
            if names:
                unpaired[f"{key} ({Path(a).name})"] = names
        if not pairs[-1]:
            raise InputError(f"{a}: no adapter module to merge (only modules_to_save: {saved[:3]})")
    first = [p.name for p in pairs[0]]
    for a, ps in zip(adapters[1:], pairs[1:], strict=True):
        names = [p.name for p in ps]
        if names != first:
            extra, missing = sorted(set(names) - set(first)), sorted(set(first) - set(names))
            what = (f"changes {len(extra)} matrix(es) that {adapters[0]} does not (e.g. '{extra[0]}')" if extra
                    else f"does not change {len(missing)} matrix(es) that {adapters[0]} does (e.g. '{missing[0]}')")
            raise InputError(f"{a}: target modules differ: it {what}; all adapters of a merge must target the same "
                             "modules (or restrict the merge with --modules)")
    return pairs, unpaired


def matrix_seed(seed: int, name: str) -> int:
    """DARE's per-matrix seed: the first 8 bytes of sha256("{seed}|{name}"), so a matrix's masks do not
    depend on which other matrices are merged."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (their relative paths and bytes, sorted; hidden ones skipped)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:
        fh = hashlib.sha256()
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                fh.update(block)
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def _storage(sources, outputs: list[dict], matrices, per_input: bool, fmt: str) -> dict[str, Any]:
    """Bytes on disk of the inputs and of what was written; for EMR also its own compact form (one
    float32 τ_uni, one bit per entry and input for the masks, one float32 rescaler per input and matrix)."""
    def size(p: Path) -> int:
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*.safetensors"))

    out: dict[str, Any] = {"inputs_bytes": sum(size(s.root) for s in sources),
                           "written_bytes": sum(o["bytes"] for o in outputs), "format": fmt}
    if per_input:
        n = len(sources)
        entries = sum(m.shape[0] * m.shape[1] for m in matrices)
        out["emr_compact_bytes"] = entries * 4 + (entries * n + 7) // 8 + 4 * n * len(matrices)
    return out
