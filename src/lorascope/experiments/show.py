"""``lorascope experiment status``: a store's progress and headline numbers as rich tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = (("accuracy", "acc"), ("n_intruders", "intruders"), ("effective_rank", "eff. rank ΔW"),
           ("forgetting", "forgetting"))
STATE_STYLE = {"done": "green", "running": "yellow", "partial": "red", "pending": "dim", "stale": "magenta"}


def wide_console() -> Console:
    """Standard output; when it is not a terminal (a pipe, a log file), wide enough for every column."""
    console = Console()
    return console if console.is_terminal else Console(width=220)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def status_tables(status: dict[str, Any]) -> list[Any]:
    """The units table (one row per unit: state, settings that vary, main metrics) and, for sweeps,
    the Spearman correlations."""
    rows = status["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r["unit"]))
    varying = [k for k in keys if len({repr(r["unit"].get(k)) for r in rows}) > 1] or keys[:3]
    extra = [m for m in ("task_score", "sts_change_pct", "drift", "pseudo-loss", "lm-loss")
             if any(m in r["metrics"] for r in rows)]
    extra += list(dict.fromkeys(k for r in rows for k in r["metrics"] if k.startswith("accuracy/")))
    title = f"{status['kind']} study '{status['name']}': {status['done']}/{status['total']} units done"
    table = Table(title=title + (f" (running, pid {status['running_pid']})" if status["running_pid"] else ""))
    for col in ["state", "key", *varying, *(name for _, name in COLUMNS), *extra, "s"]:
        table.add_column(col, justify="left" if col in ("state", "key") else "right")
    for r in rows:
        m = r["metrics"]
        table.add_row(f"[{STATE_STYLE[r['state']]}]{r['state']}[/]", r["key"][:8],
                      *(_fmt(r["unit"].get(k)) for k in varying), *(_fmt(m.get(key)) for key, _ in COLUMNS),
                      *(_fmt(m.get(key)) for key in extra), _fmt(r["seconds"] and round(r["seconds"])))
    out: list[Any] = [table]
    steps = time_table(rows)
    if steps is not None:
        out.append(steps)
    corr = status["derived"].get("spearman")
    if corr:
        t = Table(title="Spearman ρ(intruders, forgetting)")
        for col in ("arm", "along", "fixed", "n", "ρ"):
            t.add_column(col)
        for c in corr:
            arm = " ".join(f"{k}={_fmt(v)}" for k, v in c["arm"].items() if k != "task" and v is not None)
            fixed = next((f"{k}={_fmt(c[k])}" for k in ("lr", "n_examples") if k in c), "")
            t.add_row(arm, c["axis"], fixed, str(c["n"]), _fmt(c["spearman_intruders_forgetting"]))
        out.append(t)
    lam = status["derived"].get("lambda")
    if lam:
        t = Table(title="λ intervention: % change against λ = 1 (paper Tables 3-4)")
        for col in ("fine-tune", "control", "λ", "acc", "Δacc %", "forgetting", "Δforgetting %", "intruders"):
            t.add_column(col, justify="left" if col in ("fine-tune", "control") else "right")
        for row in lam:
            arm = " ".join(f"{k}={_fmt(v)}" for k, v in row["arm"].items()
                           if k in ("method", "rank", "alpha", "task"))
            cells = [row[k] for k in ("lam", "accuracy", "accuracy_change_pct", "forgetting",
                                      "forgetting_change_pct", "n_intruders")]
            t.add_row(arm, str(row["arm"].get("control")), *(_fmt(c) for c in cells))
        out.append(t)
    return out


def time_table(rows: list[dict[str, Any]]) -> Table | None:
    """Where the finished units' time went: per action, the mean wall seconds of each step
    (records' ``phase_seconds``) and of the whole unit."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["state"] == "done" and r.get("phase_seconds"):
            steps = per.setdefault(r["action"], {"unit": []})
            steps["unit"].append(r["seconds"])
            for name, t in r["phase_seconds"].items():
                steps.setdefault(name, []).append(t)
    if not per:
        return None
    names = list(dict.fromkeys(n for steps in per.values() for n in steps if n != "unit"))
    table = Table(title="Time per unit, mean seconds")
    for col in ("action", "units", *names, "whole unit"):
        table.add_column(col, justify="left" if col == "action" else "right")
    for action, steps in per.items():
        table.add_row(action, str(len(steps["unit"])),
                      *(_fmt(round(sum(steps[n]) / len(steps[n]), 1)) if n in steps else "–" for n in names),
                      _fmt(round(sum(steps["unit"]) / len(steps["unit"]), 1)))
    return table

