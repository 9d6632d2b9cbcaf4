"""Thin command-line interface over lorascope's public API."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lorascope.errors import LorascopeError
from lorascope.scanning.options import default as scan_default

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """lorascope: show, measure and undo how fine-tuning changes a pretrained model."""


@app.command()
def scan(
    base: str = typer.Argument(..., help="Base model: HF folder, weight file or hub id."),
    tuned: str = typer.Argument(..., help="Fine-tuned model (folder, file, hub id), PEFT adapter folder, kohya "
                                "LoRA file or `lorascope train` run folder."),
    k: int = typer.Option(scan_default("k"), help="Top-k singular vectors of the tuned matrix to test."),
    epsilon: float = typer.Option(scan_default("epsilon"), help="Intruder threshold on max |cos| (paper: 0.5)."),
    side: str = typer.Option(scan_default("side"), help="left (paper), right or both singular vectors."),
    modules: str | None = typer.Option(scan_default("modules"), help="Regex on tensor names to restrict the scan."),
    embeddings: bool = typer.Option(scan_default("embeddings"), help="Also scan embedding matrices."),
    device: str = typer.Option(scan_default("device"), help="auto, cpu or cuda."),
    dtype: str = typer.Option(scan_default("dtype"), help="float32 or float64 for the tuned decomposition."),
    out: Path | None = typer.Option(None, help="Write OUT/scan.json (and other formats) here."),
    format: str = typer.Option("json", help="Comma-separated: json,csv,parquet."),
    cache_dir: Path | None = typer.Option(scan_default("cache_dir"), help="Keep base decompositions here for "
                                          "later scans."),
    cache_budget: str = typer.Option(scan_default("cache_budget"), help="Size limit of --cache-dir (least "
                                     "recently used go)."),
    streams: int = typer.Option(scan_default("streams"), help="Matrices analysed at once (default: 8 on a GPU if "
                                "memory allows, 1 on the CPU)."),
    residual_base: str | None = typer.Option(None, help="For a PEFT adapter from a base-changing init (PiSSA, "
                                             "OLoRA, CorDA, LoRA-GA, LoftQ): the model saved right after the init."),
) -> None:
    """Find intruder dimensions (paper Alg. 1) in every weight matrix a fine-tune or adapter changed.
    Under `torchrun --nproc-per-node N -m lorascope scan ...` the matrices are split over N ranks."""
    from lorascope.scanning.options import ScanOptions
    from lorascope.schema import check_formats

    formats = check_formats(format)  # before the scan, not after it
    options = ScanOptions(k=k, epsilon=epsilon, side=side, modules=modules, embeddings=embeddings, device=device,
                          dtype=dtype, cache_dir=str(cache_dir) if cache_dir else None, cache_budget=cache_budget,
                          streams=streams)
    from lorascope.scanning import distributed
    from lorascope.scanning.api import scan as run_scan

    result = run_scan(base, tuned, options, progress=distributed.is_main(), residual_base=residual_base)
    if not distributed.is_main():
        return  # every rank holds the gathered result; rank 0 reports and writes it
    print_scan_summary(result)
    if out is not None:
        written = result.save(out, formats)
        console.print("wrote " + ", ".join(str(w) for w in written))


def print_scan_summary(result) -> None:
    """Totals per side and the worst matrices, as a rich table."""
    summary = result.summary()
    for side, s in summary["sides"].items():
        console.print(
            f"[bold]{side} singular vectors[/]: {s['n_intruders']} intruder dimensions in "
            f"{s['matrices_with_intruders']} of {s['n_matrices']} matrices "
            f"(ε={summary['epsilon']}, k={summary['k']}); mean effective rank of ΔW "
            f"{s['mean_delta_effective_rank']:.2f}"
        )
        if s["worst"]:
            table = Table("intruders", "min max|cos|", "chance max|cos|", "matrix")
            by_name = {r.name: r for r in result.matrices if r.side == side}
            for w in s["worst"]:
                r = by_name[w["name"]]
                table.add_row(str(w["n_intruders"]), f"{min(r.max_cos):.3f}", f"{r.null_max_cos:.3f}", w["name"])
            console.print(table)
    console.print(f"scanned {result.timing.get('n_matrices')} matrices in {result.timing.get('seconds')} s")


@app.command()
def mitigate(
    base: str = typer.Argument(..., help="Base model: HF folder, weight file or hub id."),
    tuned: str = typer.Argument(..., help="PEFT adapter folder, kohya LoRA file or fully fine-tuned model."),
    out: Path = typer.Option(..., help="Output folder (adapter or model), with mitigation.json."),
    lam: float = typer.Option(0.75, help="λ in [0, 2]: each chosen σ becomes λσ (0 removes, 1 keeps)."),
    epsilon: float = typer.Option(scan_default("epsilon"), help="Intruder threshold on max |cos| (paper: 0.5)."),
    k: int = typer.Option(scan_default("k"), help="Top-k singular vectors of the tuned matrix to test."),
    which: str = typer.Option("top1", help="top1: the highest-ranked intruder per matrix (paper §5); all."),
    control: str | None = typer.Option(None, help="neighbour: scale the best-matching base direction."),
    format: str = typer.Option("auto", help="adapter (the input's adapter format, exact), merged (safetensors "
                               "model) or auto."),
    compress: int | None = typer.Option(None, help="Re-factorise changed LoRA modules to this rank."),
    modules: str | None = typer.Option(scan_default("modules"), help="Regex on tensor names to restrict the change."),
    embeddings: bool = typer.Option(scan_default("embeddings"), help="Also mitigate embedding matrices."),
    device: str = typer.Option(scan_default("device"), help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
    residual_base: str | None = typer.Option(None, help="For a PEFT adapter from a base-changing init (PiSSA, "
                                             "OLoRA, CorDA, LoRA-GA, LoftQ): the model saved right after the init."),
) -> None:
    """Scale intruder dimensions by λ (paper §5) and write a working adapter or model."""
    from lorascope.mitigation.api import mitigate as run_mitigate
    from lorascope.scanning.options import ScanOptions

    options = ScanOptions(k=k, epsilon=epsilon, modules=modules, embeddings=embeddings, device=device)
    result = run_mitigate(base, tuned, out, lam=lam, which=which, control=control, format=format,
                          compress=compress, overwrite=overwrite, progress=True, options=options,
                          residual_base=residual_base)
    s = result.summary()
    console.print(f"scaled {s['n_directions']} direction(s) in {s['n_changed']} of {s['n_matrices']} matrices "
                  f"(λ={lam}, which={which}, control={result.settings['control'] or 'none'}); "
                  f"largest relative error of the written weights {s['max_rel_error']:.2e}")
    changed = [m for m in result.matrices if m.directions]
    if changed:
        table = Table("σ before", "σ after", "max|cos|", "direction", "matrix")
        for m in changed[:20]:
            for d in m.directions:
                table.add_row(f"{d.sigma_before:.4g}", f"{d.sigma_after:.4g}", f"{d.intruder_max_cos:.3f}",
                              f"{d.target} {d.intruder_index if d.target == 'intruder' else d.base_index}",
                              m.name)
        console.print(table)
    console.print(f"wrote {result.output['format']} to {out} in {result.timing['seconds']} s")


@app.command()
def demo(
    out: Path = typer.Option(Path("lorascope-demo"), help="Folder for runs, scans and report.html."),
    quick: bool = typer.Option(False, help="A smaller run (under 2 minutes on 2 CPU cores)."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on BBC News with LoRA and full FT, scan both, measure forgetting, report."""
    from lorascope.demo import run_demo

    summary = run_demo(out, quick=quick, device=device, overwrite=overwrite, console=console)
    table = Table("method", "accuracy", "intruders", "erank ΔW", "retrieval Δ%", "drift",
                  *(["STS-B Δ%"] if "sts_spearman" in summary["base"] else []),
                  caption="intruders: ε=0.5, k=10, in matrices with any; retrieval: headline→article recall@1 on "
                          "held-out topics; drift: 1 − CKA")
    for label, m in summary["methods"].items():
        row = [label, f"{m['accuracy']:.3f}", f"{m['n_intruders']} ({m['matrices_with_intruders']}/{m['n_matrices']})",
               f"{m['delta_effective_rank']:.1f}", f"{m['forgetting_recall_at_1_pct']:+.1f}", f"{m['drift']:.3f}"]
        if "sts_spearman" in summary["base"]:
            row.append(f"{m['forgetting_sts_spearman_pct']:+.1f}")
        table.add_row(*row)
    Console().print(table)
    Console().print(f"base retrieval recall@1 {summary['base']['recall_at_1']:.3f}; report: {summary['report']}")


@app.command()
def report(
    path: Path = typer.Argument(..., help="scan.json, mitigation.json, records.jsonl, or a folder of them."),
    out: Path = typer.Option(Path("report.html"), help="The HTML file to write (self-contained)."),
    png_dir: Path | None = typer.Option(None, help="Also save every figure here as PNG and SVG."),
    matrices: str | None = typer.Option(None, help="Regex on matrix names for the similarity maps."),
    n_maps: int = typer.Option(3, help="Similarity maps per scan (the matrices with the most intruders)."),
) -> None:
    """The paper's figures and one self-contained HTML report from stored results (nothing recomputed)."""
    from lorascope.report import build_report

    console.print(f"wrote {build_report(path, out, png_dir, matrices=matrices, n_maps=n_maps)}")


@app.command("train")
def train_cmd(
    model: str = typer.Argument(..., help="Base model: HF folder, hub id, .gguf file, or a full / merged run."),
    task: str = typer.Option(..., help="Built-in task (sst2 agnews rte subj trec rt-polarity stsb bbc wikitext2 "
                             "state-union arithmetic), a .tsv/.csv/.jsonl/.txt file or folder, or hf:NAME[:CONFIG]."),
    out: Path = typer.Option(..., help="Run folder to write (adapter/ or model/, tokenizer/, run.json)."),
    method: str = typer.Option("lora", help="lora or full."),
    rank: int = typer.Option(8, help="LoRA rank r."),
    alpha: float | None = typer.Option(None, help="LoRA alpha [default: 2r]."),
    rslora: bool = typer.Option(False, help="Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r."),
    target_modules: str | None = typer.Option(
        None, help="Comma-separated module names, a peft regex or all-linear [default: every linear layer "
        "of the transformer blocks]."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA branch."),
    lr: float | None = typer.Option(None, help="Learning rate [default: 2.4e-3/alpha for LoRA, 1e-5 full]."),
    epochs: int = typer.Option(3, help="Training epochs."),
    batch_size: int = typer.Option(16, help="Batch size."),
    max_length: int = typer.Option(128, help="Truncate (classification) or block (LM) length in tokens."),
    warmup: float = typer.Option(0.06, help="Warm-up fraction of the steps (linear schedule)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0: off)."),
    seed: int = typer.Option(0, help="Seed for initialisation, dropout and data order."),
    max_examples: int | None = typer.Option(None, help="Train on a seeded subset of this many examples."),
    max_eval_examples: int | None = typer.Option(None, help="Score on at most this many test examples."),
    objective: str = typer.Option("auto", help="auto, classify (sequence classification) or lm (causal LM)."),
    columns: str | None = typer.Option(None, help="Column mapping for files, e.g. text=review,label=stars "
                                       "(roles: text, text_pair, label, prompt, response)."),
    labels: str | None = typer.Option(None, help="Comma-separated label set, in order [default: sorted]."),
    test_file: Path | None = typer.Option(None, help="Test file for a file task [default: seeded 10% split]."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast + tf32 on CUDA, fp32 on CPU), fp32, bf16."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
) -> None:
    """Fine-tune with LoRA or full fine-tuning (paper recipe by default) and save a run folder."""
    from lorascope.train import TrainConfig, train

    targets: list[str] | str | None = target_modules
    if target_modules and "," in target_modules:
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = TrainConfig(
        model=model, task=task, method=method, objective=objective, rank=rank, alpha=alpha, rslora=rslora,
        target_modules=targets, lora_dropout=lora_dropout, lr=lr, epochs=epochs, batch_size=batch_size,
        max_length=max_length, warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
        max_examples=max_examples, max_eval_examples=max_eval_examples, columns=columns,
        labels=[s.strip() for s in labels.split(",")] if labels else None,
        test_file=str(test_file) if test_file else None, device=device, precision=precision,
        trust_remote_code=trust_remote_code,
    )
    record = train(cfg, out, overwrite=overwrite, progress=True)
    table = Table("", "", title=f"{record['method']} fine-tuning of {record['model']}")
    rows = [("task", f"{record['task']['name']} ({record['task']['kind']}, {record['task']['n_train_used']} "
                     "examples)"),
            ("objective", record["objective"]), ("lr", f"{record['config']['lr']:.3g}"),
            ("trainable parameters", f"{record['parameters']['trainable']:,} of {record['parameters']['total']:,}"),
            ("epoch loss", ", ".join(f"{x:.4f}" for x in record["history"]["epoch_loss"])),
            ("epoch seconds", ", ".join(f"{x:.1f}" for x in record["history"]["epoch_seconds"]))]
    rows += [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in record["metrics"].items()]
    rows += [("device", f"{record['device']} ({record['precision']})"), ("wall time", f"{record['wall_time_s']:.1f} s"),
             ("run folder", str(out))]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument(..., help="A run folder, or the base model when --adapter is given."),
    adapter: str | None = typer.Option(None, help="Tuned side: a run folder (LoRA or full) or PEFT adapter."),
    metric: str = typer.Option("accuracy", help="accuracy, pseudo-loss, lm-loss, sts or drift."),
    data: str | None = typer.Option(None, help="Task (accuracy), corpus (pseudo-loss, lm-loss, drift: "
                                    "wikitext2, state-union or a file) or stsb / a pair file (sts)."),
    max_examples: int | None = typer.Option(None, help="Use the first N examples / texts."),
    batch_size: int = typer.Option(32, help="Batch size."),
    max_length: int | None = typer.Option(None, help="Token limit [default: 128; lm-loss: model context]."),
    stride: int | None = typer.Option(None, help="lm-loss sliding-window stride [default: max_length/2]."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint."),
    out: Path | None = typer.Option(None, help="Write the result as JSON to this file."),
) -> None:
    """Measure a metric on the base and the tuned model, with the relative change (forgetting)."""
    from lorascope.evaluate import evaluate
    from lorascope.io.writers import atomic_write_json

    r = evaluate(model, adapter, metric, data, max_examples=max_examples, batch_size=batch_size,
                 max_length=max_length, stride=stride, device=device, trust_remote_code=trust_remote_code)

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    table = Table("metric", "data", "n", "base", "tuned", "change", "change %",
                  title=f"{'higher' if r['higher_is_better'] else 'lower'} is better")
    table.add_row(metric, r["data"], str(r["n"]), fmt(r["base"]), fmt(r["tuned"]), fmt(r["change"]),
                  "-" if r["change_pct"] is None else f"{r['change_pct']:+.2f}%")
    Console().print(table)
    if out is not None:
        atomic_write_json(out, r)
        console.print(f"wrote {out}")


experiment_app = typer.Typer(add_completion=False, no_args_is_help=True,
                             help="The paper's studies as resumable runs (docs/experiments.md).")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("run")
def experiment_run(
    config: Path = typer.Argument(..., help="Experiment config (TOML)."),
    out: Path | None = typer.Option(None, help="Experiment folder (default: the config's out, else "
                                    "experiments/NAME)."),
    resume: bool = typer.Option(False, help="Continue an experiment folder; finished units are never rerun."),
    workers: int = typer.Option(1, help="Units at once: a process pool (local) or Ray tasks."),
    backend: str = typer.Option("local", help="local, or ray (the optional ray extra)."),
    max_units: int | None = typer.Option(None, help="Start at most this many units, then stop."),
    threads: int | None = typer.Option(None, help="Torch threads per unit (1: fastest on a busy machine)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: train.epochs=1 (repeatable)."),
) -> None:
    """Run a study (methods, sweeps, intervention, continual, tracking); one record per finished unit."""
    from lorascope.experiments import experiment_status, load_config, run_experiment
    from lorascope.experiments.show import status_tables, wide_console

    cfg = load_config(config, set_)
    report = run_experiment(cfg, out, resume=resume, workers=workers, backend=backend, max_units=max_units,
                            threads=threads, log=lambda line: console.print(line, highlight=False))
    for table in status_tables(experiment_status(report.root)):
        wide_console().print(table)
    console.print(f"{len(report.computed)} unit(s) run, {report.already_done} kept, {report.remaining} left, "
                  f"in {report.seconds:.0f} s -> {report.root}")


@experiment_app.command("status")
def experiment_status_cmd(folder: Path = typer.Argument(..., help="Experiment folder.")) -> None:
    """Progress of an experiment folder and its main numbers, from its files alone."""
    from lorascope.experiments import experiment_status
    from lorascope.experiments.show import status_tables, wide_console

    for table in status_tables(experiment_status(folder)):
        wide_console().print(table)


def main() -> None:
    try:
        app()
    except LorascopeError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
