"""Thin command-line interface over lorascope's public API."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorascope.errors import InputError, LorascopeError
from lorascope.merging.options import default as merge_default
from lorascope.risk import DEFAULT_FAIL_ON
from lorascope.scanning.options import default as scan_default
from lorascope.train.config import VARIANTS, TrainConfig, defaults, help_texts, variant


class _Group(typer.core.TyperGroup):
    """Flags take no value, so their help shows no type: typer 0.29's rich help prints ``<bool>`` for
    them (an option's metavar, when set, is printed instead of its type)."""

    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None and not isinstance(command, _Group):
            _no_flag_types(command.get_params(ctx))
        return command


def _no_flag_types(params: list) -> list:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help=__doc__,
                  pretty_exceptions_enable=False)
console = Console(stderr=True)

# `lorascope train` takes every default and help text from TrainConfig (torch-free to import).
_TRAIN_DEFAULTS = defaults()
_TRAIN_HELP = help_texts()


def _train_help(name: str) -> str:
    return escape(_TRAIN_HELP[name])  # "[default: 2r]" is text, not rich markup


def _train_option(name: str):
    """A ``lorascope train`` option for the TrainConfig field ``name``, with its default and help."""
    return typer.Option(_TRAIN_DEFAULTS[name], help=_train_help(name))


@app.callback()
def _root() -> None:
    """lorascope: show, measure and undo how fine-tuning changes a pretrained model."""


@app.command()
def scan(
    base: str = typer.Argument(..., help="Base model: HF folder, weight file or hub id."),
    tuned: list[str] = typer.Argument(..., help="Fine-tuned model (folder, file, hub id), PEFT adapter folder, "
                                      "kohya, diffusers or LyCORIS file, or `lorascope train` run folder; several, a "
                                      "folder of adapters or a quoted glob scan each against one read of the base."),
    k: int = typer.Option(scan_default("k"), help="Top-k singular vectors of the tuned matrix to test."),
    epsilon: float = typer.Option(scan_default("epsilon"), help="Intruder threshold on max |cos| (paper: 0.5)."),
    side: str = typer.Option(scan_default("side"), help="left (paper), right or both singular vectors."),
    modules: str | None = typer.Option(scan_default("modules"), help="Regex on tensor names to restrict the scan."),
    embeddings: bool = typer.Option(scan_default("embeddings"), help="Also scan embedding matrices."),
    device: str = typer.Option(scan_default("device"), help="auto, cpu or cuda."),
    dtype: str = typer.Option(scan_default("dtype"), help="float32 or float64 for the tuned decomposition."),
    out: Path | None = typer.Option(None, help="Write OUT/scan.json (and other formats) here; with several "
                                    "inputs OUT/NAME/scan.json for each."),
    format: str = typer.Option("json", help="Comma-separated: json,csv,parquet."),
    cache_dir: Path | None = typer.Option(scan_default("cache_dir"), help="Keep base decompositions here for "
                                          "later scans."),
    cache_budget: str = typer.Option(scan_default("cache_budget"), help="Size limit of --cache-dir (least "
                                     "recently used go)."),
    streams: int = typer.Option(scan_default("streams"), help="Matrices analysed at once (default: 8 on a GPU if "
                                "memory allows; on the CPU one per thread for small matrices, else 1)."),
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
    from lorascope.io.tuned import expand_specs
    from lorascope.io.writers import guard_output
    from lorascope.scanning import distributed
    from lorascope.scanning.api import scan_many

    specs = expand_specs(tuned)
    from lorascope.io.writers import folder_labels

    labels = folder_labels(specs, fallback="tuned")
    if out is not None:
        inputs = {f"tuned ({label})": spec for label, spec in zip(labels, specs, strict=True)}
        guard_output(out, {"base": base, **inputs})
    from lorascope.progress import Progress

    shown = Progress(distributed.is_main(), console)
    results = scan_many(base, specs, options, progress=shown, residual_base=residual_base)
    if not distributed.is_main():
        return  # every rank holds the gathered result; rank 0 reports and writes it
    if len(results) == 1:
        print_scan_summary(results[0])
    else:
        print_batch_summary(results, labels)
    if out is not None:
        with shown.stage(f"writing {', '.join(formats)} to {out}"):
            written = [w for label, result in zip(labels, results, strict=True)
                       for w in result.save(out if len(results) == 1 else out / label, formats)]
        console.print("wrote " + ", ".join(str(w) for w in written))


def print_batch_summary(results, labels: list[str]) -> None:
    """One row per input of a batch scan."""
    first = results[0].summary()
    table = Table("input", "intruders", "matrices with", "mean erank ΔW", "risk",
                  title=f"intruder dimensions (ε={first['epsilon']}, k={first['k']}, left side)")
    for label, result in zip(labels, results, strict=True):
        s = result.summary()["sides"]
        s = s.get("left") or next(iter(s.values()))
        table.add_row(label, str(s["n_intruders"]), f"{s['matrices_with_intruders']}/{s['n_matrices']}",
                      f"{s['mean_delta_effective_rank']:.2f}", f"{s['risk']['scores']['risk'] or 0:.3f}")
    console.print(table)
    console.print(f"scanned {len(results)} inputs in {results[0].timing.get('seconds')} s")


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
        risk = s["risk"]["scores"]

        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"  # not computable is said, never shown as 0

        console.print(f"data-free risk {fmt(risk['risk'])} (worst matrix; mean {fmt(risk['risk_mean'])}), "
                      f"strength {fmt(risk['strength'])}; {s['risk'].get('validation', 'not validated')}",
                      highlight=False)
        if s["worst"]:
            table = Table("intruders", "min max|cos|", "chance max|cos|", "matrix")
            by_name = {r.name: r for r in result.matrices if r.side == side}
            for w in s["worst"]:
                r = by_name[w["name"]]
                table.add_row(str(w["n_intruders"]), f"{min(r.max_cos):.3f}", f"{r.null_max_cos:.3f}", w["name"])
            console.print(table)
    console.print(f"scanned {result.timing.get('n_matrices')} matrices in {result.timing.get('seconds')} s")


@app.command()
def check(
    base: str = typer.Argument(..., help="Base model: HF folder, weight file or hub id."),
    adapter: str = typer.Argument(..., help="Adapter or fine-tuned model, as for `scan`."),
    fail_on: str = typer.Option(DEFAULT_FAIL_ON, help="Fail when any holds: NAME OP NUMBER, comma-separated "
                                "(risk>0.3, intruders>20; names in docs/risk.md)."),
    format: str = typer.Option("json", help="With --out, comma-separated: json,sarif,junit."),
    out: Path | None = typer.Option(None, help="Write OUT/check.json (+ scan.json), check.sarif, check.junit.xml."),
    modules: str | None = typer.Option(scan_default("modules"), help="Regex on tensor names to restrict the scan."),
    device: str = typer.Option(scan_default("device"), help="auto, cpu or cuda."),
    residual_base: str | None = typer.Option(None, help="As for `scan` (PiSSA, OLoRA, ... inits)."),
) -> None:
    """Pass or fail an adapter on its data-free risk scores (exit 0 pass, 1 fail, 2 bad input)."""
    from lorascope.check import check_formats, judge, parse_fail_on, write_outputs
    from lorascope.errors import InputError
    from lorascope.risk import MEANING, RISK_EPSILON, RISK_K, matrix_scores

    conditions, formats = parse_fail_on(fail_on), check_formats(format)  # before the scan, not after it
    if out is None and format != "json":
        raise InputError(f"--format {format} writes files: give --out DIR too")
    from lorascope.io.writers import guard_output
    from lorascope.scanning.api import scan as run_scan
    from lorascope.scanning.options import ScanOptions

    if out is not None:
        guard_output(out, {"base": base, "adapter": adapter})
    result = run_scan(base, adapter, ScanOptions(k=RISK_K, epsilon=RISK_EPSILON, modules=modules, device=device),
                      progress=True, residual_base=residual_base)
    v = judge(result, conditions)
    colour = "green" if v.passed else "red"
    console.print(f"[bold {colour}]{'PASS' if v.passed else 'FAIL'}[/] {escape(adapter)} "
                  f"({', '.join(str(c) for c in v.failed) or 'no condition of ' + fail_on + ' holds'})")
    console.print(f"risk {v.scores['risk'] or 0:.3f}: {MEANING['risk']}; intruders {v.scores['intruders']:.0f} "
                  f"(ε={RISK_EPSILON}, k={RISK_K}). Not yet validated against measured forgetting (docs/risk.md).",
                  highlight=False)
    worst = sorted(((m.name, matrix_scores(m)) for m in result.matrices if m.side == v.side),
                   key=lambda t: -(t[1]["risk"] or 0.0))[:10]
    table = Table("risk", "intruders", "strength", "σ1(ΔW)/σk(W0)", "matrix", title="worst matrices")
    for name, s in worst:
        table.add_row(f"{s['risk'] or 0:.3f}", f"{s['intruders']:.0f}", f"{s['strength']:.3f}",
                      "-" if s["sigma_ratio"] is None else f"{s['sigma_ratio']:.3g}", name)
    console.print(table)
    if out is not None:
        written = write_outputs(v, result, out, formats, base, adapter)
        console.print("wrote " + ", ".join(str(w) for w in written))
    if not v.passed:
        raise typer.Exit(1)


@app.command()
def mitigate(
    base: str = typer.Argument(..., help="Base model: HF folder, weight file or hub id."),
    tuned: str = typer.Argument(..., help="PEFT adapter folder, kohya LoRA file or fully fine-tuned model."),
    out: Path = typer.Option(..., help="Output folder (adapter or model), with mitigation.json; with several "
                             "--lam or --eval, OUT/lam_<λ>/ for each λ and OUT/records.jsonl."),
    lam: str = typer.Option("0.75", help="λ in [0, 2]: each chosen σ becomes λσ (0 removes, 1 keeps); "
                            "comma-separated for a sweep (0,0.5,0.75,1)."),
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
    eval_: str | None = typer.Option(None, "--eval", help="Also measure each λ with this metric of "
                                     "`lorascope evaluate` (accuracy, pseudo-loss, lm-loss, sts, drift)."),
    data: str | None = typer.Option(None, help="--eval's data, as in `lorascope evaluate --data`."),
    max_examples: int | None = typer.Option(None, help="--eval on the first N examples / texts."),
) -> None:
    """Scale intruder dimensions by λ (paper §5) and write a working adapter or model; several λ (and
    --eval) make a sweep with a summary table."""
    from lorascope.mitigation.api import mitigate as run_mitigate
    from lorascope.scanning.options import ScanOptions

    lams = _floats(lam, "--lam")
    options = ScanOptions(k=k, epsilon=epsilon, modules=modules, embeddings=embeddings, device=device)
    settings = dict(which=which, control=control, format=format, compress=compress, options=options,
                    residual_base=residual_base)
    if len(lams) > 1 or eval_ is not None:
        _mitigate_sweep(base, tuned, out, lams, settings, eval_, data, max_examples, device, overwrite)
        return
    lam = lams[0]
    result = run_mitigate(base, tuned, out, lam=lam, overwrite=overwrite, progress=True, **settings)
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


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{option}: expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise InputError(f"{option}: no value given")
    return values


def _mitigate_sweep(base, tuned, out, lams, settings, metric, data, max_examples, device, overwrite) -> None:
    """``mitigate`` at every λ into OUT/lam_<λ>/, each measured with ``metric`` when given; a table of all."""
    from lorascope.mitigation.api import mitigate_sweep

    measure = None
    if metric is not None:
        from lorascope.evaluate.measures import METRICS

        if metric not in METRICS:
            raise InputError(f"--eval: unknown metric {metric!r}; choose from {', '.join(METRICS)}")

        def measure(folder: Path) -> dict:
            from lorascope.evaluate import evaluate

            console.print(f"  measuring {metric} of {folder.name}", highlight=False)
            r = evaluate(base, adapter=str(folder), metric=metric, data=data, max_examples=max_examples,
                         device=device, progress=False)
            return {metric: r["tuned"], f"{metric}_base": r["base"], f"{metric}_change_pct": r["change_pct"]}

    records = mitigate_sweep(base, tuned, out, lams, measure=measure, overwrite=overwrite, progress=True,
                             log=lambda line: console.print(line, highlight=False), **settings)
    first = records[0]["unit"]
    table = Table("λ", "directions", "matrices changed", "max rel. error",
                  *([metric, f"{metric} Δ%"] if metric else []), "folder",
                  title=f"intruder mitigation (which={first['which']}, control={first['control']})")
    for r in records:
        m = r["metrics"]
        row = [f"{r['unit']['lam']:g}", str(m["n_directions"]), str(m["n_changed"]), f"{m['max_rel_error']:.1e}"]
        if metric:
            change = m[f"{metric}_change_pct"]
            row += [f"{m[metric]:.4f}", "-" if change is None else f"{change:+.2f}"]
        table.add_row(*row, str(Path(out) / Path(r["mitigation"]).parent))
    Console().print(table)
    console.print(f"wrote {len(records)} λ folders and {Path(out) / 'records.jsonl'} (lorascope report {out} "
                  "draws them)")


@app.command("merge")
def merge_cmd(
    base: str = typer.Argument(..., help="Base model every adapter was trained on: HF folder, weight file or hub id."),
    adapters: list[str] = typer.Argument(..., help="Two or more adapters (PEFT folders, kohya / diffusers / LyCORIS "
                                         "files, run folders) or fine-tunes of BASE."),
    out: Path = typer.Option(..., help="Output folder (adapter or model), with merge.json."),
    method: str = typer.Option(merge_default("method"), help="linear, task_arithmetic, ties, dare_linear, dare_ties, "
                               "knots_ties, knots_dare or emr (docs/merge.md)."),
    weights: str | None = typer.Option(None, help=escape("Comma-separated, one per adapter [default: 1 each].")),
    density: float | None = typer.Option(merge_default("density"), help=escape("Fraction kept by TIES' trim / "
                                                                                  "DARE's drop [default: 0.5].")),
    seed: int = typer.Option(merge_default("seed"), help="Seed of DARE's random masks."),
    format: str = typer.Option(merge_default("format"), help="adapter (PEFT LoRA, ΔW exact) or merged (model)."),
    modules: str | None = typer.Option(merge_default("modules"), help="Regex on tensor names to restrict the merge."),
    embeddings: bool = typer.Option(merge_default("embeddings"), help="Also merge embedding matrices."),
    device: str = typer.Option(merge_default("device"), help="auto, cpu or cuda."),
    scan: bool = typer.Option(False, help="Scan the merge and the inputs; attribute each merged intruder."),
    k: int = typer.Option(scan_default("k"), help="--scan: top-k singular vectors tested."),
    epsilon: float = typer.Option(scan_default("epsilon"), help="--scan: intruder threshold on max |cos|."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
) -> None:
    """Merge adapters of one base (task arithmetic, TIES, DARE, KnOTS, EMR) into an exact adapter or a model."""
    from lorascope.errors import InputError
    from lorascope.merging.api import merge
    from lorascope.merging.options import MergeOptions
    from lorascope.scanning.options import ScanOptions

    ws = None
    if weights is not None:
        try:
            ws = tuple(float(x) for x in weights.split(",") if x.strip())
        except ValueError:
            raise InputError(f"--weights must be comma-separated numbers, got '{weights}'") from None
    options = MergeOptions(method=method, weights=ws, density=density, seed=seed, format=format, modules=modules,
                           embeddings=embeddings, device=device)
    result = merge(base, adapters, out, options, scan=scan, scan_options=ScanOptions(k=k, epsilon=epsilon),
                   overwrite=overwrite, progress=True)
    s, st = result.summary(), result.output["storage"]
    console.print(f"merged {s['n_matrices']} matrices of {len(adapters)} inputs with {method} (mean rank "
                  f"{s['mean_rank_after']:.1f}); largest relative error of the written weights "
                  f"{s['max_rel_error']:.2e}")
    console.print(f"storage: inputs {st['inputs_bytes']:,} B, written {st['written_bytes']:,} B"
                  + (f", EMR compact {st['emr_compact_bytes']:,} B" if "emr_compact_bytes" in st else ""))
    if scan:
        a = result.analysis
        table = Table("", "intruders", title=f"intruder dimensions (ε={a['epsilon']}, k={a['k']}, left side)")
        for label, n in a["intruders"]["inputs"].items():
            table.add_row(f"input {label}", str(n))
        for label, n in a["intruders"]["outputs"].items():
            table.add_row(f"merge {label}" if label != "merge" else "merge", str(n))
        console.print(table)
        console.print("merged intruders closest to: " + ", ".join(f"{k} {v}" for k, v in a["attributed_to"].items())
                      + f"; new directions {a['new_directions']}")
    console.print(f"wrote {result.output['format']} to {out} in {result.timing['seconds']} s")


@app.command()
def demo(
    out: Path = typer.Option(Path("lorascope-demo"), help="Folder for runs, scans and report.html."),
    quick: bool = typer.Option(False, help="A smaller run (under 2 minutes on 2 CPU cores)."),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on BBC News with LoRA and full FT, scan both, measure forgetting, scale the
    LoRA run's intruders down (λ = 0.75, 0) and measure again, report."""
    from lorascope.demo import run_demo

    summary = run_demo(out, quick=quick, device=device, overwrite=overwrite, console=console)
    table = Table("method", "accuracy", "intruders", "erank ΔW", "retrieval Δ%", "drift",
                  *(["STS-B Δ%"] if "sts_spearman" in summary["base"] else []),
                  caption="intruders: ε=0.5, k=10, in matrices with any; retrieval: headline→article recall@1 on "
                          "held-out topics; drift: 1 − CKA; λ: the LoRA run with every intruder scaled by λ"
                          + (f"; STS-B on {summary['settings']['n_sts']} test pairs"
                             if "sts_spearman" in summary["base"] and summary["settings"]["n_sts"] else ""))
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
    path: Path = typer.Argument(..., help="scan.json, mitigation.json, merge.json, records.jsonl, or a folder."),
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
    model: str = typer.Argument(..., help=_train_help("model")),
    task: str = typer.Option(..., help=_train_help("task")),
    out: Path = typer.Option(..., help="Run folder to write (adapter/ or model/, tokenizer/, run.json)."),
    method: str = typer.Option(_TRAIN_DEFAULTS["method"], help=f"{', '.join(VARIANTS)}: full fine-tuning, "
                               "LoRA, or a LoRA variant (rsLoRA, DoRA, PiSSA, OLoRA, LoRA+, B-only LoRA, AdaLoRA, "
                               "VeRA), as in experiment configs."),
    rank: int = _train_option("rank"),
    alpha: float | None = _train_option("alpha"),
    rslora: bool = _train_option("rslora"),
    loraplus_lr_ratio: float | None = typer.Option(None, help=escape(
        _TRAIN_HELP["loraplus_lr_ratio"][:-1] + " [default: 16 with --method loraplus].")),
    target_modules: str | None = _train_option("target_modules"),
    lora_dropout: float = _train_option("lora_dropout"),
    lr: float | None = _train_option("lr"),
    epochs: int = _train_option("epochs"),
    batch_size: int = _train_option("batch_size"),
    max_length: int = _train_option("max_length"),
    warmup: float = _train_option("warmup"),
    weight_decay: float = _train_option("weight_decay"),
    max_grad_norm: float = _train_option("max_grad_norm"),
    seed: int = _train_option("seed"),
    max_examples: int | None = _train_option("max_examples"),
    max_eval_examples: int | None = _train_option("max_eval_examples"),
    objective: str = _train_option("objective"),
    columns: str | None = _train_option("columns"),
    labels: str | None = _train_option("labels"),
    test_file: Path | None = _train_option("test_file"),
    device: str = _train_option("device"),
    precision: str = _train_option("precision"),
    trust_remote_code: bool = _train_option("trust_remote_code"),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
) -> None:
    """Fine-tune with full fine-tuning, LoRA or a LoRA variant (paper recipe by default) and save a run folder."""
    from lorascope.train import train

    targets: list[str] | str | None = target_modules
    if target_modules and "," in target_modules:
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    fields = variant(method)  # e.g. dora: method lora, lora_options {use_dora: true}
    fields["rslora"] = rslora or fields.get("rslora", False)
    if loraplus_lr_ratio is not None:
        fields["loraplus_lr_ratio"] = loraplus_lr_ratio
    cfg = TrainConfig(
        model=model, task=task, **fields, objective=objective, rank=rank, alpha=alpha, extra={"variant": method},
        target_modules=targets, lora_dropout=lora_dropout, lr=lr, epochs=epochs, batch_size=batch_size,
        max_length=max_length, warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
        max_examples=max_examples, max_eval_examples=max_eval_examples, columns=columns,
        labels=[s.strip() for s in labels.split(",")] if labels else None,
        test_file=str(test_file) if test_file else None, device=device, precision=precision,
        trust_remote_code=trust_remote_code,
    )
    record = train(cfg, out, overwrite=overwrite, progress=True)
    table = Table("", "", title=f"{method} fine-tuning of {record['model']}")
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
    max_length: int | None = typer.Option(None, help=escape("Token limit [default: 128; lm-loss: model context].")),
    stride: int | None = typer.Option(None, help=escape("lm-loss sliding-window stride [default: max_length/2].")),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint."),
    out: Path | None = typer.Option(None, help="Write the result as JSON to this file."),
) -> None:
    """Measure a metric on the base and the tuned model, with the relative change (forgetting)."""
    from lorascope.evaluate import evaluate
    from lorascope.io.writers import atomic_write_json, guard_output

    if out is not None:  # before the work: the JSON must never land on a model, adapter or data file
        guard_output(out, {"model": model, "adapter": adapter, "data": data})
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


experiment_app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
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
        from rich.markup import escape

        # soft_wrap: no line breaks inside paths; escape: brackets in a message (lorascope[ray]) are text
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
