"""Does a data-free score predict forgetting? Spearman ρ of every score of docs/risk.md with measured
forgetting, over the runs of experiment stores.

    python scripts/risk_validation.py STORE [STORE ...] --out docs/results/risk/ [--seed 0]

Each store (``lorascope experiment run``'s folder) is one study. For every finished unit with a
scan and a forgetting measure (STS-B drop = −sts_change_pct, drift = 1 − CKA, lm-loss and
pseudo-loss % change), the scores are recomputed from its scan.json by ``lorascope.risk`` and
correlated with each measure:

- within each study (Spearman ρ over its runs);
- pooled over studies, with per-model normalisation: scores and forgetting are replaced by their
  percentile rank within their model's runs (so a model's scale never dominates), then ρ over all;
- held out: a third of the runs, chosen by ``random.Random(seed)``, is set aside; the score with
  the highest pooled ρ on the other two thirds is chosen, and its ρ on the held-out third reported.

With ``--weightwatcher`` (``pip install weightwatcher``; needs each unit's run folder), two more
baselines: ``ww_alpha``, WeightWatcher's mean power-law α of the tuned model's block matrices, and
``ww_alpha_delta``, its α of ΔW (its peft mode for a LoRA run, its base-model deltas for a full one).

Writes OUT/risk_validation.md (tables) and OUT/risk_validation.json (every number).
"""

from __future__ import annotations

import argparse
import math
import random
import re
from pathlib import Path
from typing import Any

from scipy.stats import rankdata, spearmanr

from lorascope.errors import InputError
from lorascope.experiments.store import Store
from lorascope.io.writers import atomic_write_json, atomic_write_text
from lorascope.risk import BASELINES, CANDIDATES, model_scores
from lorascope.schema import ScanResult

PAPER_RHO = 0.971  # paper Fig. 7: intruders vs forgetting over learning rates, RoBERTa r = 8, MNLI
MEASURES = {  # name -> (metric key, sign): higher always means more forgetting
    "sts_drop": ("sts_change_pct", -1.0),
    "drift": ("drift", 1.0),
    "lm_loss_change": ("lm-loss_change_pct", 1.0),
    "pseudo_loss_change": ("pseudo-loss_change_pct", 1.0),
}
WW_SCORES = ("ww_alpha", "ww_alpha_delta")
SCORES = CANDIDATES + BASELINES + WW_SCORES
BLOCK = re.compile(r"\.\d+\.")  # the study's scanned matrices: inside the numbered blocks


def ww_alphas(run: Path, **analyze: Any) -> dict[str, float | None]:
    """WeightWatcher's mean α over the block matrices: of W_t, and of ΔW (peft mode / base deltas);
    None where it fits none (it skips matrices with fewer than ``min_evals`` = 50 eigenvalues)."""
    import weightwatcher as ww

    from lorascope.models import load_base_for_run, load_trained, merged, read_run

    def mean_alpha(details) -> float | None:
        if "longname" not in details:
            return None
        rows = details[[bool(BLOCK.search(n)) for n in details["longname"]]]
        alphas = [float(a) for a in rows["alpha"] if math.isfinite(float(a)) and a > 0]
        return sum(alphas) / len(alphas) if alphas else None

    model, _ = load_trained(run)
    tuned = merged(model)
    out = {"ww_alpha": mean_alpha(ww.WeightWatcher(model=tuned).analyze(**analyze))}
    record = read_run(run)
    if record["method"] == "lora":
        delta = ww.WeightWatcher(model=model).analyze(peft=True, **analyze)
    else:
        delta = ww.WeightWatcher(model=tuned).analyze(base_model=load_base_for_run(record), **analyze)
    out["ww_alpha_delta"] = mean_alpha(delta)
    return out


def runs_of(root: Path, weightwatcher: bool = False) -> list[dict[str, Any]]:
    """One row per finished unit with a scan: study, model, key, scores and forgetting measures."""
    store = Store(root)
    if not store.exists:
        raise InputError(f"{root}: not an experiment store (no experiment.json)")
    experiment = store.read_json("experiment.json") or {}
    config = experiment.get("config", experiment)
    study, model = config.get("name") or root.name, str(config.get("model", "?"))
    rows = []
    for rec in store.read_records():
        forgetting = {name: sign * rec["metrics"][key] for name, (key, sign) in MEASURES.items()
                      if isinstance(rec["metrics"].get(key), int | float)}
        if not rec.get("scan") or not forgetting:
            continue
        scan = ScanResult.load(root / rec["scan"])
        side = [m for m in scan.matrices if m.side == "left"] or scan.matrices
        scores = {**model_scores(side)["scores"], **dict.fromkeys(WW_SCORES)}
        run = root / rec.get("paths", {}).get("run", "-")
        if weightwatcher and (run / "run.json").is_file():
            scores.update(ww_alphas(run))
        rows.append({"study": study, "model": model, "key": rec["key"], "unit": rec["unit"],
                     "scores": scores, "forgetting": forgetting})
    return rows


def rho(x: list[float], y: list[float]) -> float | None:
    """Spearman ρ, None when undefined (fewer than 3 points, or a constant side)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    r = float(spearmanr(x, y).statistic)
    return r if math.isfinite(r) else None


def pairs(rows: list[dict[str, Any]], score: str, measure: str) -> tuple[list[float], list[float]]:
    pts = [(r["scores"][score], r["forgetting"][measure]) for r in rows
           if r["scores"].get(score) is not None and measure in r["forgetting"]]
    return [p[0] for p in pts], [p[1] for p in pts]


def normalised(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each score and measure replaced by its percentile rank (0 … 1) among its model's runs."""
    out = [{**r, "scores": dict(r["scores"]), "forgetting": dict(r["forgetting"])} for r in rows]
    for model in {r["model"] for r in rows}:
        mine = [r for r in out if r["model"] == model]
        for field, names in (("scores", SCORES), ("forgetting", MEASURES)):
            for name in names:
                have = [r for r in mine if r[field].get(name) is not None]
                if not have:
                    continue
                ranks = rankdata([r[field][name] for r in have])
                for r, rank in zip(have, ranks, strict=True):
                    r[field][name] = float((rank - 1) / max(len(have) - 1, 1))
    return out


def table(rows: list[dict[str, Any]], measure: str) -> dict[str, float | None]:
    return {s: rho(*pairs(rows, s, measure)) for s in SCORES}


def validate(rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    measures = [m for m in MEASURES if any(m in r["forgetting"] for r in rows)]
    studies = sorted({r["study"] for r in rows})
    pooled = normalised(rows)
    order = list(range(len(pooled)))
    random.Random(seed).shuffle(order)
    held = set(order[: len(order) // 3])
    train = [r for i, r in enumerate(pooled) if i not in held]
    test = [r for i, r in enumerate(pooled) if i in held]
    out: dict[str, Any] = {"seed": seed, "n_runs": len(rows), "n_held_out": len(test), "paper_rho": PAPER_RHO,
                           "studies": {s: sum(1 for r in rows if r["study"] == s) for s in studies},
                           "measures": {}}
    for m in measures:
        train_rho = table(train, m)
        defined = {s: v for s, v in train_rho.items() if v is not None}
        chosen = max(defined, key=defined.get) if defined else None
        out["measures"][m] = {
            "within": {s: table([r for r in rows if r["study"] == s], m) for s in studies},
            "pooled": table(pooled, m),
            "chosen": chosen, "chosen_train_rho": defined.get(chosen) if chosen else None,
            "held_out_rho": rho(*pairs(test, chosen, m)) if chosen else None,
        }
    return out


def markdown(v: dict[str, Any], sources: list[str]) -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.3f}"

    lines = ["# Data-free scores against measured forgetting (Spearman ρ)", "",
             f"{v['n_runs']} runs from {len(v['studies'])} studies "
             f"({', '.join(f'{s}: {n}' for s, n in v['studies'].items())}); higher forgetting = more damage. "
             f"Paper: ρ = {PAPER_RHO} (intruders vs forgetting over learning rates, RoBERTa r = 8, MNLI). "
             "Pooled: percentile ranks within each model. n/a: undefined (constant, or < 3 runs).", "",
             "Reproduce: `python scripts/risk_validation.py " + " ".join(sources) + f" --seed {v['seed']}"
             + (" --weightwatcher" if v.get("weightwatcher") else "") + "`", ""]
    for m, res in v["measures"].items():
        studies = list(res["within"])
        lines += [f"## {m}", "", "| score | " + " | ".join(studies) + " | pooled |",
                  "|---|" + "---|" * (len(studies) + 1)]
        for s in SCORES:
            if s in WW_SCORES and all(res["pooled"][s] is None for res in v["measures"].values()):
                continue  # not computed (no --weightwatcher)
            label = f"{s} (baseline)" if s in BASELINES + WW_SCORES else s
            lines.append(f"| {label} | " + " | ".join(f(res["within"][st][s]) for st in studies)
                         + f" | {f(res['pooled'][s])} |")
        lines += ["", f"Chosen on two thirds of the runs: **{res['chosen']}** (ρ {f(res['chosen_train_rho'])}); "
                      f"held-out third ({v['n_held_out']} runs, seed {v['seed']}): ρ = {f(res['held_out_rho'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/results/risk"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weightwatcher", action="store_true", help="also WeightWatcher's α (pip install weightwatcher)")
    a = p.parse_args(argv)
    rows = [r for s in a.stores for r in runs_of(s, a.weightwatcher)]
    if not rows:
        raise SystemExit("no run with a scan and a forgetting measure in " + ", ".join(map(str, a.stores)))
    v = {**validate(rows, a.seed), "weightwatcher": a.weightwatcher}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "risk_validation.json", {**v, "stores": [str(s) for s in a.stores], "runs": rows})
    atomic_write_text(a.out / "risk_validation.md", markdown(v, [str(s) for s in a.stores]))
    print(markdown(v, [str(s) for s in a.stores]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
