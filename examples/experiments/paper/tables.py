"""Print the markdown tables of docs/results from experiment stores (nothing is recomputed).

    python examples/experiments/paper/tables.py methods RUNS/encoder_methods
    python examples/experiments/paper/tables.py intervention RUNS/encoder_intervention
    python examples/experiments/paper/tables.py sweeps RUNS/encoder_lr_sweep
    python examples/experiments/paper/tables.py continual RUNS/encoder_continual
    python examples/experiments/paper/tables.py decoder RUNS/decoder_methods RUNS/decoder_lr_sweep
    python examples/experiments/paper/tables.py decoder-intervention RUNS/decoder_intervention
    python examples/experiments/paper/tables.py inits RUNS/encoder_inits
    python examples/experiments/paper/tables.py inits-matched RUNS/encoder_inits_matched   # or decoder_inits
    python examples/experiments/paper/tables.py mitigations RUNS/encoder_mitigations
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from lorascope.schema import ScanResult

TASKS = ["sst2", "agnews", "rte", "subj", "trec"]


def records(store: str) -> list[dict]:
    return [json.loads(line) for line in (Path(store) / "records.jsonl").read_text().splitlines() if line]


def label(u: dict) -> str:
    if u["method"] == "full":
        return "full FT"
    name = "LoRA" if u["method"] == "lora" else u["method"]  # an init or variant (decoder_inits) by its name
    return f"{name} r={u['rank']} α={u['alpha']:g}"


def order(u: dict) -> tuple:
    return (u["method"] != "full", u.get("alpha") != 2 * u.get("rank", 0), u.get("rank", 0))


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def methods(store: str) -> None:
    recs = records(store)
    by = {}
    for r in recs:
        by.setdefault(label(r["unit"]), {"u": r["unit"]})[r["unit"]["task"]] = r
    keys = sorted(by, key=lambda k: order(by[k]["u"]))
    print("### Accuracy (Table 2 shape)\n")
    print(table(["method", *TASKS, "mean"], [[k, *(f"{by[k][t]['metrics']['accuracy']:.3f}" for t in TASKS),
                                            f"{sum(by[k][t]['metrics']['accuracy'] for t in TASKS) / 5:.3f}"]
                                           for k in keys]))
    for eps in (0.3, 0.5, 0.7):
        print(f"\n### Intruder dimensions at ε = {eps}, k = 10 (36 block matrices)\n")
        rows = []
        for k in keys:
            counts = []
            for t in TASKS:
                scan = ScanResult.load(Path(store) / by[k][t]["scan"])
                counts.append(scan.summary(epsilon=eps)["sides"]["left"]["n_intruders"])
            rows.append([k, *counts, sum(counts)])
        print(table(["method", *TASKS, "total"], rows))
    print("\n### Effective rank of ΔW (mean over the 36 matrices)\n")
    print(table(["method", *TASKS], [[k, *(f"{by[k][t]['metrics']['effective_rank']:.2f}" for t in TASKS)]
                                     for k in keys]))
    print("\n### Forgetting: % change in STS-B Spearman (test, 1,379 pairs)\n")
    base = recs[0]["metrics"]["sts_base"]
    print(f"Base all-MiniLM-L6-v2: Spearman {base:.4f}.\n")
    print(table(["method", *TASKS, "mean"], [[k, *(f"{by[k][t]['metrics']['sts_change_pct']:+.1f}" for t in TASKS),
                                            f"{sum(by[k][t]['metrics']['sts_change_pct'] for t in TASKS) / 5:+.1f}"]
                                           for k in keys]))
    print("\n### Representation drift, 1 − CKA on WikiText-2 test paragraphs\n")
    print(table(["method", *TASKS], [[k, *(f"{by[k][t]['metrics']['drift']:.3f}" for t in TASKS)] for k in keys]))


def intervention(store: str) -> None:
    summary = json.loads((Path(store) / "summary.json").read_text())
    arms: dict = {}
    for row in summary["lambda"]:
        arm = row["arm"]
        arms.setdefault((arm["rank"], arm["alpha"]), {}).setdefault(row["lam"], {})[arm["control"]] = row
    for (rank, alpha), lams in sorted(arms.items()):
        ref = lams[1.0]["intruder"]
        print(f"\n### LoRA r={rank} α={alpha:g} on SST-2: accuracy {ref['accuracy']:.3f}, "
              f"STS-B forgetting {ref['forgetting']:.1f}% at λ = 1\n")
        rows = []
        for lam in sorted(lams):
            i, n = lams[lam]["intruder"], lams[lam]["neighbour"]
            rows.append([f"{lam:g}", f"{i['accuracy_change_pct']:+.2f}", f"{i['forgetting_change_pct']:+.1f}",
                         i["n_intruders"], f"{n['accuracy_change_pct']:+.2f}", f"{n['forgetting_change_pct']:+.1f}"])
        print(table(["λ", "intruder: Δ acc %", "intruder: Δ forgetting %", "intruders left",
                     "neighbour: Δ acc %", "neighbour: Δ forgetting %"], rows))


def sweeps(store: str) -> None:
    recs = sorted(records(store), key=lambda r: (r["unit"]["n_examples"], r["unit"]["lr"]))
    print(table(["lr", "n_examples", "accuracy", "intruders (ε=0.5)", "STS-B Δ %", "drift"],
                [[f"{r['unit']['lr']:g}", r["unit"]["n_examples"], f"{r['metrics']['accuracy']:.3f}",
                  r["metrics"]["n_intruders"], f"{r['metrics']['sts_change_pct']:+.1f}", f"{r['metrics']['drift']:.3f}"]
                 for r in recs]))
    summary = json.loads((Path(store) / "summary.json").read_text())
    print("\n" + json.dumps(summary.get("spearman", summary.get("rho", {})), indent=1))


def continual(store: str) -> None:
    recs = records(store)
    arms: dict = {}
    for r in recs:
        arms.setdefault(label(r["unit"]), []).append(r)
    for name, rs in sorted(arms.items(), key=lambda kv: order(kv[1][0]["unit"])):
        rs.sort(key=lambda r: r["unit"]["stage"])
        print(f"\n### {name}\n")
        rows = []
        for r in rs:
            m = r["metrics"]
            rows.append([r["unit"]["stage"], r["unit"]["task"],
                         *(f"{m[f'accuracy/{t}']:.3f}" if f"accuracy/{t}" in m else "" for t in TASKS),
                         f"{m['sts_change_pct']:+.1f}", m["n_intruders"]])
        print(table(["stage", "trained on", *TASKS, "STS-B Δ %", "intruders"], rows))


def decoder(*stores: str) -> None:
    """Decoder units of any number of stores (methods, sweeps), one row each, ordered by method and lr."""
    recs = sorted((r | {"store": s} for s in stores for r in records(s)),
                  key=lambda r: (order(r["unit"]), INITS.index(r["unit"]["method"]) if r["unit"]["method"] in INITS
                                 else -1, r["unit"]["lr"]))
    base = recs[0]["metrics"]["lm-loss_base"]
    model = json.loads((Path(stores[0]) / "experiment.json").read_text())["config"]["model"]
    print(f"Base {Path(model).name} on WikiText-2 test: loss {base:.4f}, perplexity {math.exp(base):.2f}.\n")
    rows = []
    for r in recs:
        m, scan = r["metrics"], ScanResult.load(Path(r["store"]) / r["scan"])
        counts = [scan.summary(epsilon=e)["sides"]["left"]["n_intruders"] for e in (0.3, 0.5, 0.7, 0.9)]
        # how large the update is against the base spectrum: no intruder can appear while ΔW's top
        # singular value stays well under the base's 10th
        ratio = [x.delta_singular_values[0] / x.base_singular_values[9] for x in scan.matrices]
        ppl = math.exp(m["lm-loss"])
        rows.append([label(r["unit"]), f"{r['unit']['lr']:g}", f"{m['accuracy']:.3f}", *counts,
                     m["matrices_with_intruders"], f"{statistics.median(ratio):.3f} / {max(ratio):.2f}",
                     f"{m['effective_rank']:.1f}", f"{m['lm-loss']:.3f}", f"{ppl:.2f}",
                     f"{100 * (ppl / math.exp(base) - 1):+.1f}"])
    print(table(["method", "lr", "exact match", "intruders ε=0.3", "ε=0.5", "ε=0.7", "ε=0.9",
                 "matrices with intruders (ε=0.5)", "σ1(ΔW)/σ10(W0) median / max", "eff. rank ΔW",
                 "WikiText-2 loss", "perplexity", "Δ perplexity %"], rows))
    hot = [r for r in recs if r["metrics"]["n_intruders"]]
    for r in hot:
        s = ScanResult.load(Path(r["store"]) / r["scan"]).summary()["sides"]["left"]
        print(f"\n{label(r['unit'])}, lr {r['unit']['lr']:g}: intruders per module type (ε=0.5) "
              + json.dumps(s["per_module_type"]) + "; per layer " + json.dumps(s["per_layer"]))


INITS = ["lora", "pissa", "olora", "milora", "corda", "lora-ga", "mica", "dora", "loraplus", "lora-a-frozen"]


def inits(store: str) -> None:
    """One row per (init or variant, task): accuracy, intruders at three ε, update size, forgetting."""
    recs = sorted(records(store), key=lambda r: (r["unit"]["task"], INITS.index(r["unit"]["method"])))
    rows = []
    for r in recs:
        m, scan = r["metrics"], ScanResult.load(Path(store) / r["scan"])
        counts = [scan.summary(epsilon=e)["sides"]["left"]["n_intruders"] for e in (0.3, 0.5, 0.7)]
        ratio = [x.delta_singular_values[0] / x.base_singular_values[9] for x in scan.matrices]
        rows.append([r["unit"]["task"], r["unit"]["method"], f"{m['accuracy']:.3f}", *counts,
                     m["matrices_with_intruders"], f"{statistics.median(ratio):.3f} / {max(ratio):.2f}",
                     f"{m['effective_rank']:.2f}", f"{m['sts_change_pct']:+.1f}", f"{m['drift']:.3f}",
                     m["trainable_params"]])
    print(table(["task", "init / variant", "accuracy", "intruders ε=0.3", "ε=0.5", "ε=0.7",
                 "matrices with intruders (ε=0.5)", "σ1(ΔW)/σ10(W0) median / max", "eff. rank ΔW",
                 "STS-B Δ %", "drift", "trainable"], rows))


def decoder_intervention(store: str) -> None:
    """The λ edits of a decoder fine-tune from its records (a partial store too: every finished unit, the
    fine-tune as λ = 1): exact match, intruders left, WikiText-2 loss and perplexity change."""
    recs = records(store)
    tuned = next(r for r in recs if r["action"] == "train")
    base, t = tuned["metrics"]["lm-loss_base"], tuned["metrics"]
    print(f"Fine-tune: exact match {t['accuracy']:.3f}, {t['n_intruders']} intruders (ε = 0.5), WikiText-2 loss "
          f"{t['lm-loss']:.3f} (base {base:.3f}: perplexity {math.exp(base):.2f} -> {math.exp(t['lm-loss']):.2f}).\n")
    rows = []
    for r in sorted((r for r in recs if r["action"] != "train"),
                    key=lambda r: (r["unit"]["which"], r["unit"]["control"], r["unit"]["lam"])):
        m, u = r["metrics"], r["unit"]
        rows.append([u["which"], u["control"], f"{u['lam']:g}", m["n_changed"], f"{m['accuracy']:.3f}",
                     m["n_intruders"], f"{m['lm-loss']:.3f}", f"{math.exp(m['lm-loss']):.2f}",
                     f"{100 * (math.exp(m['lm-loss'] - t['lm-loss']) - 1):+.1f}"])
    print(table(["which", "control", "λ", "directions scaled", "exact match", "intruders left", "WikiText-2 loss",
                 "perplexity", "Δ perplexity % vs the fine-tune"], rows))


def task_score(m: dict) -> float:
    return m["accuracy"] if "accuracy" in m else m["test_exact_match"]


def matched(recs: list[dict], slack: float = 0.01) -> tuple[float, dict[str, dict]]:
    """Matched task accuracy over the units of one task: the target is the lowest of the arms' best scores,
    less ``slack``; each arm is taken at its lowest learning rate that reaches it."""
    arms: dict[str, list[dict]] = {}
    for r in recs:
        arms.setdefault(r["unit"]["method"], []).append(r)
    target = min(max(task_score(r["metrics"]) for r in rs) for rs in arms.values()) - slack
    return target, {a: min((r for r in rs if task_score(r["metrics"]) >= target), key=lambda r: r["unit"]["lr"])
                    for a, rs in arms.items()}


def inits_matched(store: str) -> None:
    """Per task, every init / variant at matched task score (:func:`matched`): intruders at three ε,
    update size and forgetting; then the counts summed over tasks, and every unit. A task on which some
    arm never learns (its best within 0.05 of the worst unit's score) cannot be matched and is left out."""
    recs = records(store)
    tasks = sorted({r["unit"]["task"] for r in recs}, key=lambda t: TASKS.index(t) if t in TASKS else 99)
    decoder = "lm-loss" in recs[0]["metrics"]
    forget = ["WikiText-2 loss", "Δ perplexity %"] if decoder else ["STS-B Δ %", "drift"]

    def forgetting(m: dict) -> list[str]:
        if decoder:
            return [f"{m['lm-loss']:.3f}", f"{100 * (math.exp(m['lm-loss'] - m['lm-loss_base']) - 1):+.1f}"]
        return [f"{m['sts_change_pct']:+.1f}", f"{m['drift']:.3f}"]

    def counts(r: dict) -> list[int]:
        scan = ScanResult.load(Path(store) / r["scan"])
        return [scan.summary(epsilon=e)["sides"]["left"]["n_intruders"] for e in (0.3, 0.5, 0.7)]

    totals: dict[str, list] = {}
    rows = []
    for t in tasks:
        units = [r for r in recs if r["unit"]["task"] == t]
        target, chosen = matched(units)
        floor = min(task_score(r["metrics"]) for r in units)  # an arm that learned nothing (lowest rates)
        if target < floor + 0.05:
            print(f"{t}: not matched - the lowest of the arms' best scores ({target + 0.01:.3f}) is within 0.05 of "
                  f"the untrained score ({floor:.3f}): some arm learned nothing at any rate; left out.\n")
            continue
        for a in sorted(chosen, key=INITS.index):
            r = chosen[a]
            c = counts(r)
            tot = totals.setdefault(a, [0, 0, 0, 0, 0.0, 0.0, 0.0])
            tot[:3] = [x + y for x, y in zip(tot[:3], c, strict=True)]
            tot[3] += 1
            tot[4] += task_score(r["metrics"])
            tot[5:] = [x + float(y) for x, y in zip(tot[5:], forgetting(r["metrics"]), strict=True)]
            rows.append([t, f"{target:.3f}", a, f"{r['unit']['lr']:g}", f"{task_score(r['metrics']):.3f}", *c,
                         r["metrics"]["matrices_with_intruders"], *forgetting(r["metrics"])])
    print(table(["task", "target", "init / variant", "lr", "score", "intruders ε=0.3", "ε=0.5", "ε=0.7",
                 "matrices with intruders (ε=0.5)", *forget], rows))
    print("\n" + table(["init / variant", "tasks", "mean score", "intruders ε=0.3", "ε=0.5", "ε=0.7",
                        *(f"mean {f}" for f in forget)],
                       [[a, v[3], f"{v[4] / v[3]:.3f}", *v[:3], f"{v[5] / v[3]:+.1f}" if not decoder else
                         f"{v[5] / v[3]:.3f}", f"{v[6] / v[3]:.3f}" if not decoder else f"{v[6] / v[3]:+.1f}"]
                        for a, v in sorted(totals.items(), key=lambda kv: INITS.index(kv[0]))]))
    if not decoder:  # intruders against forgetting over every run of the matched tasks, and per arm
        from lorascope.evaluate.metrics import spearman

        learned = [r for r in recs if r["unit"]["task"] in {row[0] for row in rows}]
        pairs = {a: [(r["metrics"]["n_intruders"], -r["metrics"]["sts_change_pct"]) for r in learned
                     if a is None or r["unit"]["method"] == a] for a in [None, *totals]}
        rho = {a or "all": (f"{spearman(*zip(*p, strict=True)):.2f}" if len({x for x, _ in p}) > 1 else "constant")
               for a, p in pairs.items()}
        print(f"\nSpearman ρ(intruders at ε = 0.5, STS-B drop) over {len(learned)} runs: " + json.dumps(rho))
    print("\nEvery unit:\n")
    every = sorted(recs, key=lambda r: (tasks.index(r["unit"]["task"]), INITS.index(r["unit"]["method"]),
                                        r["unit"]["lr"]))
    print(table(["task", "init / variant", "lr", "score", "intruders ε=0.3", "ε=0.5", "ε=0.7", *forget],
                [[r["unit"]["task"], r["unit"]["method"], f"{r['unit']['lr']:g}", f"{task_score(r['metrics']):.3f}",
                  *counts(r), *forgetting(r["metrics"])] for r in every]))


def mitigations(store: str) -> None:
    """The fine-tune and its three λ edits: task, forgetting, intruders left, distance from the exact edit."""
    recs = records(store)
    tuned = next(r for r in recs if r["action"] == "train")
    edits = {r["unit"]["edit"]: r for r in recs if r["action"] == "edit"}
    names = {"exact": "ours `--which all` (exact, rank r + \\|I\\|)", "compress": "ours `--which all --compress 1`",
             "peft": "PEFT `reduce_intruder_dimension`"}

    def counts(r: dict) -> str:
        scan = ScanResult.load(Path(store) / r["scan"])
        return " / ".join(str(scan.summary(epsilon=e)["sides"]["left"]["n_intruders"]) for e in (0.3, 0.5, 0.7))

    t = tuned["metrics"]
    decoder = "sts_change_pct" not in t  # a causal LM: exact match and WikiText-2 loss / perplexity

    def forgetting(m: dict) -> list[str]:
        if decoder:
            return [f"{m['lm-loss']:.3f}", f"{math.exp(m['lm-loss']):.2f}"]
        return [f"{m['sts_change_pct']:+.1f}", f"{m['drift']:.3f}"]

    rows = [["fine-tune (λ = 1)", "", f"{t['accuracy']:.3f}", *forgetting(t), counts(tuned), "", ""]]
    for name in ("exact", "compress", "peft"):
        m = edits[name]["metrics"]
        dist = f"{m['rel_distance']:.2e} / {m['max_rel_distance']:.2e}" if "rel_distance" in m else "0"
        rows.append([names[name], f"{edits[name]['unit']['lam']:g}", f"{m['accuracy']:.3f}", *forgetting(m),
                     counts(edits[name]), dist,
                     f"{m['task_score_peft_head']:.3f}" if "task_score_peft_head" in m else ""])
    score, forget = (["exact match"], ["WikiText-2 loss", "perplexity"]) if decoder else \
        (["SST-2 accuracy"], ["STS-B Δ %", "drift"])
    print(table(["model", "λ", *score, *forget, "intruders ε=0.3 / 0.5 / 0.7",
                 "‖ΔW'−ΔW'_exact‖/‖ΔW'_exact‖ all / worst matrix", "accuracy with PEFT's head"], rows))


if __name__ == "__main__":
    {"methods": methods, "intervention": intervention, "sweeps": sweeps, "continual": continual,
     "decoder": decoder, "decoder-intervention": decoder_intervention, "inits": inits, "inits-matched": inits_matched,
     "mitigations": mitigations}[sys.argv[1]](*sys.argv[2:])
