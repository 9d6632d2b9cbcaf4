"""Scale intruder dimensions down (paper §5) and write a working PEFT adapter or model.

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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lorascope.errors import InputError
from lorascope.io.adapters import FullCheckpoint, PeftAdapter, open_tuned
from lorascope.io.checkpoint import Checkpoint
from lorascope.io.layout import matrix_kinds, orient, unorient
from lorascope.io.writers import atomic_dir, atomic_write_json
from lorascope.scan import MatrixPair, library_versions, pair_matrices, resolve_device
from lorascope.spectral import SVD, Tuned, exact_top_k, left_basis, max_abs_cos

SCHEMA_VERSION = "1.0"
WHICH = ("top1", "all")
FORMATS = ("auto", "adapter", "merged")
_BESIDE_A_FILE = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
                  "merges.txt", "added_tokens.json")
_WEIGHT_SUFFIXES = {
    ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot",
}


# -- the record ----------------------------------------------------------------------------------
@dataclass
class ScaledDirection:
    """One rank-1 direction whose singular value was multiplied by λ."""

    target: str  # "intruder": (σ_j, u_j, v_j) of W_t, Eq. (1); "neighbour": (σ⁰_i, x_i, y_i) of W_0, Eq. (2)
    intruder_index: int  # j: rank of the intruder among the top-k of W_t (0-based)
    intruder_max_cos: float  # max_i |cos(u_j, x_i)|
    base_index: int  # i* = argmax_i |cos(u_j, x_i)|: the best-matching pre-trained vector (0-based)
    sigma_before: float
    sigma_after: float  # λ · sigma_before


@dataclass
class MatrixMitigation:
    """Alg. 1 and the change made for one matrix (listed whether or not it changed)."""

    name: str  # base tensor name
    kind: str  # linear | conv1d | embedding
    shape: list[int]  # [out, in]
    source: str  # adapter module path, "saved:<name>" (modules_to_save) or the tuned tensor name
    singular_values: list[float]  # σ_1..σ_k of W_t
    max_cos: list[float]  # max_i |cos(u_j, x_i)|, j = 1..k
    best_match: list[int]
    n_intruders: int  # at (ε, k)
    directions: list[ScaledDirection]  # empty: the matrix was left as it was
    rank_before: int | None = None  # LoRA rank in the input adapter
    rank_after: int | None = None  # LoRA rank in the output adapter
    rel_error: float | None = None  # ‖W_written − W_t'‖_F / ‖W_t'‖_F, W_t' exact in float64
    compress_rel_error: float | None = None  # ‖ΔW'_R − ΔW'‖_F / ‖ΔW'‖_F of the rank-R refactorisation


@dataclass
class MitigationResult:
    settings: dict[str, Any]
    matrices: list[MatrixMitigation]
    output: dict[str, Any] = field(default_factory=dict)  # path, format, files
    unpaired: dict[str, list[str]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    command: str | None = None
    created: str | None = None
    schema_version: str = SCHEMA_VERSION
    result_kind: str = "mitigation"

    def summary(self) -> dict[str, Any]:
        errors = [m.rel_error for m in self.matrices if m.rel_error is not None]
        return {
            "n_matrices": len(self.matrices),
            "n_changed": sum(1 for m in self.matrices if m.directions),
            "n_directions": sum(len(m.directions) for m in self.matrices),
            "n_intruders": sum(m.n_intruders for m in self.matrices),
            "max_rel_error": max(errors, default=0.0),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "result_kind": self.result_kind,
            "created": self.created,
            "command": self.command,
            "settings": self.settings,
            "output": self.output,
            "versions": self.versions,
            "timing": self.timing,
            "summary": self.summary(),
            "unpaired": self.unpaired,
            "matrices": [asdict(m) for m in self.matrices],
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        path = Path(out_dir) / "mitigation.json"
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MitigationResult:
        """Read a mitigation.json, or the one inside an output folder."""
        p = Path(path)
        p = p / "mitigation.json" if p.is_dir() else p
        try:
            d = json.loads(p.read_text())
            if d.get("result_kind") != "mitigation" or d["schema_version"].split(".")[0] != "1":
                raise ValueError(f"result_kind {d.get('result_kind')}, schema {d.get('schema_version')}")
            matrices = [
                MatrixMitigation(**{**m, "directions": [ScaledDirection(**s) for s in m["directions"]]})
                for m in d["matrices"]
            ]
            return cls(settings=d["settings"], matrices=matrices, output=d.get("output", {}),
                       unpaired=d.get("unpaired", {}), versions=d.get("versions", {}),
                       timing=d.get("timing", {}), command=d.get("command"), created=d.get("created"),
                       schema_version=d["schema_version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{p}: not a lorascope mitigation result ({e})") from e


# -- maths ---------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What to do to one matrix: W_t' = W_t + C @ D (Eqs. 1-2), plus Alg. 1's numbers."""

    C: torch.Tensor  # (m, p)
    D: torch.Tensor  # (p, n)
    directions: list[ScaledDirection]
    tuned: SVD  # top-k of W_t
    max_cos: torch.Tensor
    best_match: torch.Tensor
    n_intruders: int


def plan_matrix(
    W0: torch.Tensor,
    Wt: torch.Tensor,
    k: int,
    epsilon: float,
    lam: float,
    which: str = "top1",
    control: str | None = None,
) -> Plan:
    """Find the intruders of W_t against W_0 (Alg. 1) and the rank-p correction of Eq. (1) or (2).

    W0 and Wt are dense (out, in) matrices; pass float64 for exact triplets.
    """
    base = left_basis(W0)
    tuned = exact_top_k(Wt, k)
    cos, match = max_abs_cos(tuned.U, base.U)
    intruders = [j for j in range(k) if cos[j] < epsilon]
    chosen = intruders[:1] if which == "top1" else intruders
    directions: list[ScaledDirection] = []
    if control is None:
        cols = chosen
        U, S, V = tuned.U[:, cols], tuned.S[cols], tuned.V[:, cols]
        for j in chosen:
            directions.append(ScaledDirection("intruder", j, float(cos[j]), int(match[j]),
                                              float(tuned.S[j]), float(lam * tuned.S[j])))
    else:  # the neighbour control, Eq. (2): each best-matching base triplet once
        cols = []
        for j in chosen:
            i = int(match[j])
            if i not in cols:
                cols.append(i)
                directions.append(ScaledDirection("neighbour", j, float(cos[j]), i, float(base.S[i]),
                                                  float(lam * base.S[i])))
        U, S = base.U[:, cols], base.S[cols]
        V = (W0.T @ U) / S.clamp_min(torch.finfo(W0.dtype).tiny)
    root = S.clamp_min(0).sqrt()
    C = (lam - 1.0) * U * root
    D = (V * root).T
    return Plan(C=C, D=D, directions=directions, tuned=tuned, max_cos=cos, best_match=match,
                n_intruders=len(intruders))


def extend_factors(
    B: torch.Tensor, A: torch.Tensor, scale: float, C: torch.Tensor, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3): B' = [B | C/s], A' = [A ; D], so that s·B'A' = s·BA + CD exactly."""
    if scale == 0:
        raise InputError("the adapter's scaling α/r is 0: it changes nothing, there is nothing to mitigate")
    return torch.cat([B, C / scale], dim=1), torch.cat([A, D], dim=0)


def compress_factors(
    B: torch.Tensor, A: torch.Tensor, scale: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-R factors of s·B A (Eckart–Young) without forming it.

    s·B = Q_B R_B and Aᵀ = Q_A R_A (thin QR) give s·BA = Q_B (R_B R_Aᵀ) Q_Aᵀ; with the core's SVD
    R_B R_Aᵀ = Ũ Σ Ṽᵀ, the factors are B_R = Q_B Ũ_R Σ_R^½ and A_R = Σ_R^½ Ṽ_Rᵀ Q_Aᵀ (scale 1).
    Returns (B_R, A_R, ‖Σ_{>R}‖ / ‖Σ‖), the relative Frobenius error of the truncation.
    """
    qb, rb = torch.linalg.qr(scale * B)
    qa, ra = torch.linalg.qr(A.T)
    Uc, Sc, Vhc = torch.linalg.svd(rb @ ra.T)
    R = min(rank, Sc.numel())
    root = Sc[:R].sqrt()
    total = float(Sc.norm())
    err = float(Sc[R:].norm()) / total if total > 0 else 0.0
    return qb @ (Uc[:, :R] * root), (root[:, None] * Vhc[:R]) @ qa.T, err


# -- the API -------------------------------------------------------------------------------------
def mitigate(
    base: str,
    tuned: str,
    out: str | os.PathLike,
    lam: float = 0.75,
    epsilon: float = 0.5,
    k: int = 10,
    which: str = "top1",
    control: str | None = None,
    format: str = "auto",
    compress: int | None = None,
    modules: str | None = None,
    embeddings: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = False,
) -> MitigationResult:
    """Scale the intruder dimensions of a fine-tune by λ (paper §5, Eq. 1) and write the result.

    ``base``: the pre-trained model (folder, weight file or hub id). ``tuned``: a PEFT adapter folder
    or a full fine-tune. ``format``: ``adapter`` (a PEFT LoRA adapter folder, exact by Eq. 3; the
    default for plain LoRA), ``merged`` (a safetensors model folder sharded like its source; the
    default for full fine-tunes and other PEFT types) or ``auto``. ``control="neighbour"`` scales the
    best-matching pre-trained directions instead (Eq. 2). ``compress=R`` refactorises every changed
    adapter module to rank R. ``modules`` (regex) and ``embeddings`` select matrices as in ``scan``.
    Writes OUT/mitigation.json too and returns the ``MitigationResult``; ``out`` must not exist unless
    ``overwrite``, and is never one of the inputs.
    """
    t0 = time.perf_counter()
    control = _check_args(lam, epsilon, k, which, control, format, compress)
    dev = resolve_device(device)
    base_ckpt = Checkpoint(base)
    tuned_src = open_tuned(tuned)
    tuned_root = tuned_src.root if isinstance(tuned_src, PeftAdapter) else tuned_src.ckpt.root
    _check_out(Path(out), [base_ckpt.root, tuned_root])
    if format == "auto":
        format = "adapter" if tuned_src.kind == "lora" else "merged"
    if format == "adapter" and tuned_src.kind != "lora":
        what = "a full fine-tune" if tuned_src.kind == "full" else f"a {tuned_src.peft_type} adapter"
        raise InputError(f"{tuned}: {what} cannot be written as a LoRA adapter exactly; use --format merged")
    if compress is not None and format != "adapter":
        raise InputError("--compress re-factorises LoRA modules: it needs --format adapter")
    if format == "adapter" and tuned_src.config.get("lora_bias"):
        raise InputError(f"{tuned}: adapters with lora_bias are not supported")

    pairs, unpaired = pair_matrices(base_ckpt, tuned_src, modules, embeddings)
    settings = dict(
        base=str(base), tuned=str(tuned), tuned_kind=tuned_src.kind, lam=lam, epsilon=epsilon, k=k,
        which=which, control=control, format=format, compress=compress, modules=modules,
        embeddings=embeddings, device=str(dev), dtype="float64",
    )
    run = _Run(base_ckpt, tuned_src, k, epsilon, lam, which, control, dev, progress)
    with atomic_dir(out, overwrite) as tmp:
        if format == "adapter":
            matrices, files = _write_adapter(run, pairs, tmp, compress)
        else:
            matrices, files, dropped = _write_merged(run, pairs, tmp)
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


def _check_args(lam, epsilon, k, which, control, format, compress) -> str | None:
    if not (isinstance(lam, int | float) and 0 <= lam <= 2):
        raise InputError(f"lambda must lie in [0, 2], got {lam}")
    if not 0 < epsilon <= 1:
        raise InputError(f"epsilon must lie in (0, 1], got {epsilon}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
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


def _check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is an input or contains one: --overwrite would delete it."""
    o = out.resolve()
    for p in inputs:
        p = p.resolve()
        if o == p or o in p.parents:
            raise InputError(f"--out {out} is (or contains) the input {p}; choose another folder")


# -- one matrix at a time ------------------------------------------------------------------------
@dataclass
class _Run:
    base: Checkpoint
    tuned: FullCheckpoint | PeftAdapter
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
        W0 = orient(W0_stored, pair.kind).to(self.device, torch.float64)
        m, n = W0.shape
        if check_k and self.k > min(m, n):
            raise InputError(f"tensor '{pair.name}' has shape {(m, n)}: k={self.k} exceeds its rank bound")
        return W0, self.tuned.delta(pair.ref, W0, pair.kind)

    def plan(self, W0: torch.Tensor, Wt: torch.Tensor) -> Plan:
        return plan_matrix(W0, Wt, self.k, self.epsilon, self.lam, self.which, self.control)

    def record(self, pair: MatrixPair, plan: Plan, shape: tuple[int, int]) -> MatrixMitigation:
        return MatrixMitigation(
            name=pair.name, kind=pair.kind, shape=list(shape), source=pair.ref,
            singular_values=_floats(plan.tuned.S), max_cos=_floats(plan.max_cos),
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


def _floats(t: torch.Tensor) -> list[float]:
    return [round(float(x), 7) for x in t.detach().cpu().flatten()]


# -- adapter output ------------------------------------------------------------------------------
def _write_adapter(run: _Run, pairs: list[MatrixPair], tmp: Path, compress: int | None):
    """A PEFT adapter folder: changed modules get the factors of Eq. (3) (or their rank-R
    refactorisation) and rank/alpha patterns; every other tensor is copied as it was."""
    tuned: PeftAdapter = run.tuned  # type: ignore[assignment]
    state = {key: tuned.weights.get(key, check_finite=False) for key in tuned.weights.keys()}
    if tuned.weights.root.suffix != ".safetensors":  # torch.load may share storage; safetensors refuses it
        state = {key: t.clone() for key, t in state.items()}
    rslora = bool(tuned.config.get("use_rslora"))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    records = []
    for pair in run.track(pairs, "mitigating matrices"):
        W0, delta = run.tuned_matrix(pair, run.base.get(pair.name))
        Wt = Tuned(W0, delta).dense()
        plan = run.plan(W0, Wt)
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
            state[key] = unorient(exact, pair.kind).to(state[key].dtype).cpu().contiguous()
            rec.rel_error = _rel_error(orient(state[key], pair.kind).to(exact), exact)
            continue
        roles = tuned._modules[pair.ref]
        B_key, A_key = roles["B"], roles["A"]
        B2, A2 = extend_factors(delta.B, delta.A, delta.scale, plan.C, plan.D)
        scale = delta.scale
        if compress is not None:
            B2, A2, rec.compress_rel_error = compress_factors(B2, A2, scale, compress)
            scale = 1.0
        state[B_key] = B2.to(state[B_key].dtype).cpu().contiguous()
        state[A_key] = A2.to(state[A_key].dtype).cpu().contiguous()
        r2 = A2.shape[0]
        rank_pattern[pair.ref] = r2
        alpha_pattern[pair.ref] = scale * (math.sqrt(r2) if rslora else r2)
        rec.rank_after = r2
        written = W0 + scale * (state[B_key].to(exact) @ state[A_key].to(exact))
        rec.rel_error = _rel_error(written, exact)

    config = dict(tuned.config)
    # ours first: PEFT takes the first pattern that matches a module (peft.utils.other.get_pattern_key)
    for name, new in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        old = config.get(name) or {}
        config[name] = {**new, **{key: v for key, v in old.items() if key not in new}}
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(tmp / "adapter_config.json", config)
    skip = {"adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"}
    _copy_side_files(tuned.root, tmp, skip)
    return records, ["adapter_config.json", "adapter_model.safetensors"]


# -- merged model output -------------------------------------------------------------------------
def _write_merged(run: _Run, pairs: list[MatrixPair], tmp: Path):
    """A safetensors model folder, one shard at a time, shards named like the source's.

    Full fine-tune: the tuned checkpoint with W_t' in place of each changed matrix. Adapter: the base
    checkpoint with every adapter module merged (W_0 + ΔW) and W_t' for the selected ones.
    """
    if isinstance(run.tuned, FullCheckpoint):
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
        dropped = sorted(set(run.tuned._saved) - taken)
    if any(f.suffix == ".gguf" for f in set(map(src.file_of, src.keys()))):
        raise InputError(f"{src.root}: merged output from a .gguf checkpoint is not supported")

    files: dict[Path, list[str]] = {}
    for name in src.keys():
        files.setdefault(src.file_of(name), []).append(name)
    records: list[MatrixMitigation] = []
    weight_map: dict[str, str] = {}
    total = 0
    for f in run.track(list(files), "writing shards"):
        shard: dict[str, torch.Tensor] = {}
        for name in files[f]:
            t = src.get(name, check_finite=False)
            if name in selected:
                p = selected[name]
                W0_stored = t if src is run.base else run.base.get(p.name)
                W0, delta = run.tuned_matrix(p, W0_stored)
                Wt = Tuned(W0, delta).dense()
                plan = run.plan(W0, Wt)
                rec = run.record(p, plan, tuple(W0.shape))
                records.append(rec)
                if plan.directions or src is run.base:
                    exact = Wt + plan.C @ plan.D
                    t = unorient(exact, p.kind).to(t.dtype).cpu()
                    rec.rel_error = _rel_error(orient(t, p.kind).to(exact), exact)
            elif name in merge_only:  # adapter modules outside --modules / --embeddings: merged as they are
                p = merge_only[name]
                W0, delta = run.tuned_matrix(p, t, check_k=False)
                t = unorient(Tuned(W0, delta).dense(), p.kind).to(t.dtype).cpu()
            elif f.suffix != ".safetensors":
                t = t.clone()  # torch.load may share storage between tied tensors; safetensors refuses that
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
