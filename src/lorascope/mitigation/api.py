"""``lorascope.mitigate``: scale intruder dimensions by λ (paper §5) and write a working adapter or model.

The maths of one matrix, Eqs. (1)-(3) (W_t' = W_t + (λ − 1) Σ_{j∈I} σ_j u_j v_jᵀ, the neighbour
control, and the exact rank r + p LoRA form), is ``spectral.edit``, in float64; the outputs, in the
input's own adapter format or as a merged model, are ``mitigation.writers``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_json
from lorascope.scanning.options import ScanOptions
from lorascope.schema import MitigationResult

WHICH = ("top1", "all")
FORMATS = ("auto", "adapter", "merged")


def mitigate(
    base: str,
    tuned: str,
    out: str | os.PathLike,
    lam: float = 0.75,
    which: str = "top1",
    control: str | None = None,
    format: str = "auto",
    compress: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    options: ScanOptions | None = None,
    residual_base: str | None = None,
    **scan_settings,
) -> MitigationResult:
    """Scale the intruder dimensions of a fine-tune by λ (paper §5, Eq. 1) and write the result.

    ``base``: the pre-trained model (folder, weight file or hub id). ``tuned``: a PEFT adapter folder,
    a kohya LoRA file or a full fine-tune. ``format``: ``adapter`` (the input's own adapter format,
    exact by Eq. 3; the default for plain LoRA), ``merged`` (a safetensors model folder sharded like
    its source; the default for full fine-tunes and other PEFT types) or ``auto``.
    ``control="neighbour"`` scales the best-matching pre-trained directions instead (Eq. 2).
    ``compress=R`` refactorises every changed adapter module to rank R. Which intruders: ``k``,
    ``epsilon``, ``modules``, ``embeddings`` and ``device`` as in ``scan`` (``options`` or keywords;
    the arithmetic is always float64). ``residual_base``: as in ``scan``, the model a PEFT adapter from
    a base-changing init (PiSSA, …) was trained on. Writes OUT/mitigation.json too and returns the
    ``MitigationResult``; ``out`` must not exist unless ``overwrite``, and never is, contains or lies
    inside one of the inputs.
    """
    import torch  # here, not at module level: `import lorascope` stays light

    from lorascope.io.checkpoint import Checkpoint
    from lorascope.io.tuned import open_tuned
    from lorascope.io.writers import atomic_dir, guard_output
    from lorascope.mitigation import writers
    from lorascope.runtime import library_versions, resolve_device
    from lorascope.scanning.engine import warm_up
    from lorascope.scanning.pairing import pair_matrices

    t0 = time.perf_counter()
    opts = (options or ScanOptions()).with_(**scan_settings) if scan_settings else (options or ScanOptions())
    control = _check_args(lam, which, control, format, compress)
    dev = resolve_device(opts.device)
    warming = warm_up(dev)  # torch's first linalg call, alone in its thread, while the inputs are opened
    base_ckpt = Checkpoint(base)
    tuned_src = open_tuned(tuned, residual_base)
    inputs = {"base": base_ckpt.root, "tuned": tuned_src.root}
    if residual_base is not None:
        inputs["residual base"] = tuned_src.residual.root
    guard_output(out, inputs)
    if format == "auto":
        format = "adapter" if tuned_src.kind == "lora" else "merged"
    if format == "adapter" and tuned_src.kind != "lora":
        what = "a full fine-tune" if tuned_src.kind == "full" else f"a {tuned_src.label} adapter"
        raise InputError(f"{tuned}: {what} cannot be written as a LoRA adapter exactly; use --format merged")
    if compress is not None and format != "adapter":
        raise InputError("--compress re-factorises LoRA modules: it needs --format adapter")
    if getattr(tuned_src, "config", {}).get("lora_bias"):
        raise InputError(f"{tuned}: adapters with lora_bias are not supported (they change biases, which "
                         "mitigate does not write)")

    pairs, unpaired = pair_matrices(base_ckpt, tuned_src, opts)
    settings = dict(
        base=str(base), tuned=str(tuned), tuned_kind=tuned_src.kind, lam=lam, epsilon=opts.epsilon, k=opts.k,
        which=which, control=control, format=format, compress=compress, modules=opts.modules,
        embeddings=opts.embeddings, device=str(dev), dtype="float64",
    )
    if residual_base is not None:
        settings["residual_base"] = str(residual_base)
    run = writers.Run(base_ckpt, tuned_src, opts.k, opts.epsilon, lam, which, control, dev, progress)
    if warming is not None:
        warming.join()  # before the reader threads and the decompositions start
    with atomic_dir(out, overwrite) as tmp, torch.no_grad():
        if format == "adapter":
            matrices, files = writers.write_adapter(run, pairs, tmp, compress)
        else:
            matrices, files, dropped = writers.write_merged(run, pairs, tmp)
            biased = getattr(tuned_src, "bias_changes", list)()
            if biased:
                raise InputError(f"{tuned}: the {tuned_src.label} adapter also changes the biases of {len(biased)} "
                                 f"module(s) (e.g. '{biased[0]}'), which a merged output written from ΔW would "
                                 "lose; mitigate does not support it")
            if dropped:
                unpaired["adapter_weights_not_in_base"] = dropped
        result = MitigationResult(
            settings=settings,
            matrices=matrices,
            output={"path": str(out), "format": format, "files": files},
            unpaired=unpaired,
            versions=library_versions(),
            timing={"seconds": round(time.perf_counter() - t0, 3), "n_matrices": len(pairs)},
            command=" ".join(sys.argv) if sys.argv and "lorascope" in sys.argv[0] else None,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        result.save(tmp)
    return result


def _check_args(lam, which, control, format, compress) -> str | None:
    if isinstance(lam, bool) or not (isinstance(lam, int | float) and 0 <= lam <= 2):
        raise InputError(f"lambda must lie in [0, 2], got {lam}")
    if which not in WHICH:
        raise InputError(f"which must be top1 or all, got '{which}'")
    if format not in FORMATS:
        raise InputError(f"format must be auto, adapter or merged, got '{format}'")
    if compress is not None and compress < 1:
        raise InputError(f"compress must be a rank of at least 1, got {compress}")
    if control in (None, "none"):
        return None
    if control in ("neighbour", "neighbor"):
        return "neighbour"
    raise InputError(f"control must be neighbour or none, got '{control}'")


def lam_folder(lam: float) -> str:
    """The sub-folder of one λ in a sweep: lam_0, lam_0.75, lam_1."""
    return f"lam_{lam:g}"


def mitigate_run(base: str, run: str | os.PathLike, folder: str | os.PathLike, origin: str | None = None,
                 **kwargs: Any) -> tuple[MitigationResult, Path]:
    """``mitigate`` of a ``lorascope train`` run folder into a new run folder: the new ``adapter/`` or
    ``model/`` (with mitigation.json) beside a copy of the run's tokenizer and its ``run.json``, which
    gains ``mitigation`` (the settings) and ``mitigated_from`` (``origin``, default the run's path), so
    the result loads, scans and evaluates like the run. Returns the result and the weights folder."""
    from lorascope.io.tuned import run_folder_target
    from lorascope.models import read_run

    run, folder = Path(run), Path(folder)
    record = read_run(run)
    weights = run_folder_target(run)
    target = folder / weights.name
    result = mitigate(base, str(weights), target, **kwargs)
    shutil.copytree(run / record["layout"]["tokenizer"], folder / record["layout"]["tokenizer"])
    derived = {**record, "mitigation": result.settings, "mitigated_from": origin or str(run.resolve())}
    atomic_write_json(folder / "run.json", derived)
    return result, target


def mitigate_sweep(
    base: str,
    tuned: str,
    out: str | os.PathLike,
    lams: list[float],
    *,
    measure: Callable[[Path], dict[str, Any]] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """``mitigate`` once per λ of ``lams`` (keywords as in ``mitigate``), all into one folder.

    ``OUT/lam_<λ>/`` holds what ``mitigate`` writes; when ``tuned`` is a ``lorascope train`` run folder
    it is a run folder itself (the run's ``run.json`` and tokenizer beside the new ``adapter/`` or
    ``model/``), so it loads, scans and evaluates like the run. ``measure(folder)`` (e.g. an
    ``evaluate`` of a metric) adds its numbers to that λ's record. ``OUT/records.jsonl`` holds one
    record per λ in the experiment-store form the report reads: ``unit`` {study, lam, control, which},
    ``metrics`` (the mitigation summary and the measures), ``mitigation`` (its mitigation.json).
    Written atomically: ``out`` appears complete or not at all. Returns the records.
    """
    from lorascope.io.writers import atomic_dir, atomic_write_text, guard_output, retarget_paths
    from lorascope.models import is_run, read_run

    lams = [float(lam) for lam in lams]
    for lam in lams:
        _check_args(lam, kwargs.get("which", "top1"), kwargs.get("control"), kwargs.get("format", "auto"),
                    kwargs.get("compress"))
    if len(set(map(lam_folder, lams))) != len(lams):
        raise InputError(f"--lam: each λ once, got {lams}")
    guard_output(out, {"base": base, "tuned": tuned})
    run = read_run(tuned) if is_run(tuned) else None
    records = []
    with atomic_dir(out, overwrite) as tmp:
        for lam in lams:
            folder = tmp / lam_folder(lam)
            if log is not None:
                log(f"λ = {lam:g}: scaling intruders -> {Path(out) / folder.name}")
            if run is None:
                target = folder
                result = mitigate(base, tuned, target, lam=lam, progress=progress, **kwargs)
            else:
                result, target = mitigate_run(base, tuned, folder, lam=lam, progress=progress, **kwargs)
            s = result.summary()
            metrics: dict[str, Any] = {"n_directions": s["n_directions"], "n_changed": s["n_changed"],
                                       "n_intruders_before": s["n_intruders"], "max_rel_error": s["max_rel_error"]}
            if measure is not None:
                metrics.update(measure(folder))
            unit = {"study": "mitigate", "lam": lam, "control": result.settings["control"] or "intruder",
                    "which": result.settings["which"]}
            records.append({"unit": unit, "metrics": metrics,
                            "mitigation": str((target / "mitigation.json").relative_to(tmp))})
        atomic_write_text(tmp / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        retarget_paths(tmp, out)  # mitigation.json names the folder it ends up in, not the temporary one
    return records
