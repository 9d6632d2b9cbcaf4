"""``lorascope.mitigate``: scale intruder dimensions by λ (paper §5) and write a working adapter or model.

The maths of one matrix is ``spectral.edit`` (Eqs. 1-3 below); the outputs are ``mitigation.writers``.

For one weight matrix in (out, in) layout, W_t = W_0 + ΔW with SVD W_t = Σ_j σ_j u_j v_jᵀ, and
the intruders I ⊆ {0..k-1}: top-k left vectors u_j with max_i |cos(u_j, x_i)| < ε over all left
singular vectors x_i of W_0 (Alg. 1). The intervention of §5 sets σ_j ← λσ_j for j ∈ I:

    W_t' = W_t + (λ − 1) Σ_{j∈I} σ_j u_j v_jᵀ                                       (1)

``which="top1"`` takes I = {the highest-ranked intruder} (the paper's experiment), ``which="all"``
every intruder in the top-k (PEFT's ``reduce_intruder_dimension``). λ = 0 removes the directions,
λ = 1 is the identity, λ ∈ [0, 2].

Control (``control="neighbour"``): for each chosen intruder j, the pre-trained singular triplet it
matches best, i* = argmax_i |cos(u_j, x_i)|, is scaled instead (each i* once):

    W_t' = W_t + (λ − 1) Σ_{i*} σ⁰_{i*} x_{i*} y_{i*}ᵀ,   y_{i*} = W_0ᵀ x_{i*} / σ⁰_{i*}          (2)

i.e. W_0's own σ⁰_{i*} becomes λσ⁰_{i*} and ΔW is untouched, so the same λ hits a direction the
fine-tune did not create.

Both corrections are rank p = |I| and are applied as C D with C = (λ−1) U_I Σ_I^½, D = Σ_I^½ V_Iᵀ.
A LoRA update ΔW = s·B A then stays exact as a LoRA of rank r + p:

    s·B' A' = s·B A + C D,   B' = [B | C / s],   A' = [A ; D]                        (3)

with the module's rank and alpha in ``rank_pattern`` / ``alpha_pattern`` (α' = s·r', or s·√r' with
rsLoRA) so that PEFT's scaling is s again; B and A are kept bit for bit. ``compress=R`` re-factorises
s·B'A' to rank R by the SVD of its (r+p)×(r+p) core (QR of both factors; never an m×n SVD).

All decompositions run in float64: the base basis by ``left_basis`` and the exact top-k of W_t by
``exact_top_k``, so u_j, σ_j, v_j are the SVD's triplets to float64 accuracy and (1) is exact.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time

from lorascope.errors import InputError
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
    from lorascope.scanning.pairing import pair_matrices

    t0 = time.perf_counter()
    opts = (options or ScanOptions()).with_(**scan_settings) if scan_settings else (options or ScanOptions())
    control = _check_args(lam, which, control, format, compress)
    dev = resolve_device(opts.device)
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
