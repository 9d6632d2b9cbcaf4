"""LoRA inits that move part of W_0 into the adapter, and how an adapter trained on them is read.

PiSSA, OLoRA, CorDA, LoRA-GA and LoftQ change the base weight when the adapter is created:
W_res = W_0 − M, with M = s·B_0 A_0 for the first four (LoftQ replaces W_0 by its quantisation).
``save_pretrained`` then stores the trained B, A relative to W_res, so the tuned model is

    W_t = W_res + s·B A = W_0 + (s·B A − M),     ΔW = s·B A − M.

(Unless ``path_initial_model_for_weight_conversion`` was passed: then PEFT stores a plain LoRA of
rank 2r against W_0 and rewrites ``init_lora_weights`` to True, and nothing here applies.)

M follows from W_0 alone for two inits (``peft.tuners.lora.layer.LoraLayer``):

- ``"pissa"``: the exact SVD's top-r triplets, A_0 = S_r^½ V_rᵀ / √s, B_0 = U_r S_r^½ / √s, so
  M = U_r S_r V_rᵀ = U_r U_rᵀ W_0, the best rank-r approximation of W_0 (in the (out, in) layout;
  PEFT transposes Conv1D weights first). Unique unless σ_r = σ_{r+1}.
- ``"olora"``: Q, R = qr(W) of the *stored* weight (PEFT does not transpose Conv1D weights here),
  B_0 = Q_r, A_0 = R_r, so M_stored = s·Q_r R_r = s·Q_r Q_rᵀ W, Q_r the orthonormal basis of W's
  first r columns. Unique when those columns are independent.

The others are random (``pissa_niter_N``: a randomised SVD) or need data (CorDA: activation
covariances, LoRA-GA: gradients, EVA leaves W_0 alone) or a quantiser (LoftQ): their W_res must be
given, as the model the user saved right after the init (``residual_base``).
"""

from __future__ import annotations

import torch

from lorascope.errors import InputError
from lorascope.io.layout import orient, unorient
from lorascope.spectral.decompose import left_basis

# init_lora_weights values (lower case; "pissa_niter_" is a prefix) and what they do to W_0
NO_CHANGE = ("true", "false", "gaussian", "eva", "orthogonal", "mica")
EXACT = ("pissa", "olora")
NEEDS_RESIDUAL = {
    "pissa_niter_": "its randomised SVD (torch.svd_lowrank) cannot be repeated",
    "corda": "its decomposition depends on activation statistics of the training data",
    "lora_ga": "its factors come from gradients on the training data",
    "loftq": "it replaces W_0 by its quantisation",
}
_FLOAT32_EPS = 2.0 ** -23
_AMBIGUITY = 1e-5  # largest tolerated uncertainty of M relative to ‖W_0‖₂


def init_of(config: dict) -> str:
    """``init_lora_weights`` as a lower-case string ("true" for the default)."""
    return str(config.get("init_lora_weights", True)).lower()


def mutates_base(init: str) -> bool:
    return init not in NO_CHANGE


def needs_residual_reason(init: str) -> str | None:
    """Why W_res cannot be rebuilt from W_0 for this init, or None when it can (or W_0 is unchanged)."""
    if init in NO_CHANGE or init in EXACT:
        return None
    for prefix, why in NEEDS_RESIDUAL.items():
        if init.startswith(prefix):
            return why
    return f"lorascope does not know what init_lora_weights='{init}' does to the base weight"


def top_singular_value_bound(W: torch.Tensor, steps: int = 4) -> float:
    """A lower bound on σ_1(W) from a few matrix-vector products: ‖Wᵀy‖ / ‖y‖ ≤ σ_1 for every y ≠ 0,
    with y a few power steps of W Wᵀ from W's largest column (itself already a bound)."""
    W = W.to(torch.float64)
    y = W[:, int(W.norm(dim=0).argmax())]
    for _ in range(steps):
        norm = float(y.norm())
        if norm == 0.0:  # W = 0
            return 0.0
        y = W @ (W.T @ (y / norm))
    return float((W.T @ y).norm() / y.norm())


def mutation(init: str, W0: torch.Tensor, kind: str, r: int, scale: float,
             where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """M = B_M A_M (both float64, (out, in) layout) with W_res = W_0 − M, for an ``EXACT`` init.

    ``where`` names the adapter and module in errors.
    """
    W = W0.to(torch.float64)
    m, n = W.shape
    if init == "pissa":
        if r >= min(m, n):  # every triplet moves into the adapter: M = W_0, W_res = 0
            return torch.eye(m, dtype=W.dtype, device=W.device), W
        svd = left_basis(W)
        S = svd.S
        gap = float(S[r - 1] - S[r])
        top = float(S[0])
        if top > 0 and float(S[r - 1]) / top * min(1.0, _FLOAT32_EPS * top / max(gap, 1e-300)) > _AMBIGUITY:
            raise InputError(
                f"{where}: PiSSA's base weight W_res = W_0 − (best rank-{r} approximation of W_0) is not "
                f"determined by W_0: σ_{r} = {float(S[r - 1]):.6g} and σ_{r + 1} = {float(S[r]):.6g} (nearly) tie, so "
                "the SVD PEFT ran could have kept either; pass the residual model you saved after the init "
                "(residual_base / --residual-base)"
            )
        U = svd.U[:, :r].to(torch.float64)
        return U, U.T @ W
    if init == "olora":
        if kind not in ("linear", "conv1d"):
            raise InputError(f"{where}: PEFT applies OLoRA only to Linear and Conv1D layers, not {kind}")
        Ws = unorient(W, kind)  # PEFT's olora_init factors the weight as stored
        if r > min(Ws.shape):
            raise InputError(f"{where}: OLoRA rank {r} exceeds the rank bound {min(Ws.shape)} of the weight")
        Q, R = torch.linalg.qr(Ws[:, :r])
        d = R.diagonal().abs()
        # relative to those r columns' own norm (an m × r SVD): the full W's ‖·‖₂ was a float64 SVD of
        # the whole matrix per module, seconds each at 7B
        if float(d.min()) <= 1e-6 * float(torch.linalg.matrix_norm(Ws[:, :r], 2)):
            raise InputError(
                f"{where}: OLoRA's base weight W_res = W_0 − s·Q_r R_r is not determined by W_0: its first {r} "
                "columns are (nearly) linearly dependent; pass the residual model you saved after the init "
                "(residual_base / --residual-base)"
            )
        Ms_B, Ms_A = scale * Q, Q.T @ Ws  # M_stored = s·Q_r Q_rᵀ W
        if kind == "linear":
            return Ms_B, Ms_A
        return Ms_A.T, Ms_B.T  # (M_stored)ᵀ in the (out, in) layout
    raise AssertionError(init)


def residual_delta(residual_stored: torch.Tensor, W0: torch.Tensor, kind: str) -> torch.Tensor:
    """W_res − W_0 in the (out, in) layout, float64, from the residual model's stored weight."""
    Wr = orient(residual_stored, kind).to(W0.device, torch.float64)
    return Wr - W0.to(torch.float64)
