"""Names of runs as people say them: "LoRA r=1 (α=2, η=1e-2)", "full fine-tuning (η=5e-5)".

One place for the wording, used by the report's legends, tables and headline (and by anything else
that names a run). Torch-free: it reads plain unit dictionaries (``records.jsonl``'s ``unit``).
"""

from __future__ import annotations

import json
from typing import Any

METHOD_NAMES = {
    "lora": "LoRA", "full": "full fine-tuning", "dora": "DoRA", "pissa": "PiSSA", "olora": "OLoRA",
    "loraplus": "LoRA+", "lora-a-frozen": "LoRA (A frozen)", "rslora": "rsLoRA", "adalora": "AdaLoRA",
    "vera": "VeRA", "milora": "MiLoRA", "mica": "MiCA",
}
METHOD_KEYS = ("method", "rank", "alpha", "lr", "rslora", "loraplus_lr_ratio")
# lorascope merge --method (merging/options.py: METHOD_NAMES), as the papers write them
MERGE_NAMES = {
    "linear": "linear", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare_linear": "DARE",
    "dare_ties": "DARE-TIES", "knots_ties": "KnOTS-TIES", "knots_dare": "KnOTS-DARE", "emr": "EMR",
}


def sci(x: float) -> str:
    """A learning rate as written in papers: 0.01 -> '1e-2', 0.0024 -> '2.4e-3', 0.5 -> '0.5'."""
    if x == 0 or 0.1 <= abs(x) < 1000:
        return f"{x:g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def method_name(unit: dict[str, Any]) -> str:
    """'LoRA r=8 (α=16, η=1e-4)', 'rsLoRA r=8 (...)', 'full fine-tuning (η=5e-5)'; '' without a method."""
    method = unit.get("method")
    if method is None:
        return ""
    name = METHOD_NAMES.get(str(method), str(method))
    if unit.get("rslora") and method == "lora":
        name = "rsLoRA"
    if unit.get("rank") is not None:
        name += f" r={unit['rank']}"
    inside = []
    if isinstance(unit.get("alpha"), (int, float)):
        inside.append(f"α={unit['alpha']:g}")
    if isinstance(unit.get("lr"), (int, float)):
        inside.append(f"η={sci(unit['lr'])}")
    if isinstance(unit.get("loraplus_lr_ratio"), (int, float)):
        inside.append(f"η_B/η_A={unit['loraplus_lr_ratio']:g}")
    return f"{name} ({', '.join(inside)})" if inside else name


def merge_name(method: str, lam: Any = None) -> str:
    """'TIES', 'KnOTS-TIES, λ = 0.5' (each input's intruders scaled by λ before the merge)."""
    name = MERGE_NAMES.get(str(method), str(method))
    return f"{name}, {_phrase('lam', lam)}" if lam is not None else name


def _phrase(key: str, value: Any) -> str:
    if key == "merge":
        return f"{merge_name(value)} merge"
    if key == "lam":
        return f"λ = {value:g}" if isinstance(value, (int, float)) else f"λ = {value}"
    if key == "control":
        return "neighbour control" if str(value).lower() in ("neighbour", "neighbor") else "intruders scaled"
    if key == "n_examples":
        return f"n = {value}"
    if key in ("seed", "stage"):
        return f"{key} {value}"
    return f"{key} = {value}"


def unit_name(unit: dict[str, Any], varying: list[str] | None = None) -> str:
    """A unit named by its method (always, when it has one) and the other settings in ``varying``
    (every setting when None): 'LoRA r=4 (α=8, η=2e-2) on sst2, λ = 0.5, neighbour control'."""
    keys = list(unit) if varying is None else varying
    head = method_name(unit)
    if "task" in keys and unit.get("task") is not None:
        head = f"{head} on {unit['task']}".strip()
    rest = [_phrase(k, unit[k]) for k in keys if k not in (*METHOD_KEYS, "task") and unit.get(k) is not None]
    return ", ".join(p for p in [head, *rest] if p)


def varying_keys(units: list[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every unit, in first-seen order."""
    keys = list(dict.fromkeys(k for u in units for k in u))
    return [k for k in keys if len({json.dumps(u.get(k), sort_keys=True, default=str) for u in units}) > 1]
