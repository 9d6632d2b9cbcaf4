"""``merge --scan``: the merge's intruders against the base, beside each input's, and where they come from.

Attribution of one merged intruder u_j (a top-k left singular vector of W_0 + ΔW_merge with
max_i |cos(u_j, x_i)| < ε over the base's left singular vectors x_i, paper Alg. 1): for each input t,
max_l |cos(u_j, u_l^(t))| over the top-k left singular vectors u_l^(t) of W_0 + ΔW_t. A value near 1
says the intruder is input t's own; low values for every input say the merge made a new direction.
All in float64 by the exact route (``spectral.exact_top_k``, ``spectral.left_basis``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorascope.scanning.options import ScanOptions
from lorascope.spectral import exact_top_k, left_basis, max_abs_cos


class Attribution:
    def __init__(self, k: int, epsilon: float):
        self.k, self.epsilon = k, epsilon

    def matrix(self, W0: torch.Tensor, deltas: torch.Tensor, merged: torch.Tensor) -> list[dict[str, Any]]:
        """The intruders of each output W_0 + merged[o], with their max |cos| against each input."""
        k = min(self.k, *W0.shape)
        base = left_basis(W0).U
        inputs = [exact_top_k(W0 + d, k).U for d in deltas]
        found = []
        for o, d in enumerate(merged):
            U = exact_top_k(W0 + d, k).U
            cos, _ = max_abs_cos(U, base)
            for j in range(k):
                if cos[j] < self.epsilon:
                    found.append(dict(output=o, index=j, max_cos=float(cos[j]),
                                      input_max_cos=[float(max_abs_cos(U[:, j:j + 1], V)[0][0]) for V in inputs]))
        return found


def scan_outputs(base: str, outputs: list[tuple[str, Path, str]], inputs: list[tuple[str, str]], tmp: Path,
                 options: ScanOptions, matrices: list) -> dict[str, Any]:
    """Run the existing scan on every output (label, folder, final path) and input (label, path) in one
    pass over the base, save each to tmp/scans/<output|input>-<label>/scan.json, and sum up."""
    from lorascope.scanning.api import scan_many

    results = scan_many(base, [str(f) for _, f, _ in outputs] + [spec for _, spec in inputs], options)
    counts: dict[str, dict[str, int]] = {"outputs": {}, "inputs": {}}
    scans = {}
    for (label, _, final), r in zip(outputs, results, strict=False):
        r.settings["tuned"] = final  # the path it will have, not the temporary one
        counts["outputs"][label] = _left(r)
        scans[f"output-{label}"] = str(r.save(tmp / "scans" / f"output-{label}")[0].relative_to(tmp))
    for (label, _), r in zip(inputs, results[len(outputs):], strict=True):
        counts["inputs"][label] = _left(r)
        scans[f"input-{label}"] = str(r.save(tmp / "scans" / f"input-{label}")[0].relative_to(tmp))
    closest = {label: 0 for label, _ in inputs}
    new = 0
    for m in matrices:
        for x in m.intruders:
            best = max(range(len(inputs)), key=lambda t: x.input_max_cos[t])
            if x.input_max_cos[best] < options.epsilon:
                new += 1
            else:
                closest[inputs[best][0]] += 1
    return {"k": options.k, "epsilon": options.epsilon, "side": "left", "intruders": counts,
            "attributed_to": closest, "new_directions": new, "scans": scans}


def _left(result) -> int:
    sides = result.summary()["sides"]
    return int((sides.get("left") or next(iter(sides.values())))["n_intruders"])
