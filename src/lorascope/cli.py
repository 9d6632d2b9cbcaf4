"""Thin command-line interface over lorascope's public API."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lorascope.errors import LorascopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """lorascope: show, measure and undo how fine-tuning changes a pretrained model."""


@app.command()
def scan(
    base: str = typer.Argument(..., help="Base model: HF folder, weight file or hub id."),
    tuned: str = typer.Argument(..., help="Fine-tuned model (folder, file, hub id) or PEFT adapter folder."),
    k: int = typer.Option(10, help="Top-k singular vectors of the tuned matrix to test."),
    epsilon: float = typer.Option(0.5, help="Intruder threshold on max |cos| (paper: 0.5)."),
    side: str = typer.Option("left", help="left (paper), right or both singular vectors."),
    modules: str | None = typer.Option(None, help="Regex on tensor names to restrict the scan."),
    embeddings: bool = typer.Option(False, help="Also scan embedding matrices."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32 or float64 for the tuned decomposition."),
    out: Path | None = typer.Option(None, help="Write OUT/scan.json (and other formats) here."),
    format: str = typer.Option("json", help="Comma-separated: json,csv,parquet."),
) -> None:
    """Find intruder dimensions (paper Alg. 1) in every weight matrix a fine-tune or adapter changed."""
    from lorascope.scan import scan as run_scan

    result = run_scan(base, tuned, k=k, epsilon=epsilon, side=side, modules=modules, embeddings=embeddings,
                      device=device, dtype=dtype, progress=True)
    print_scan_summary(result)
    if out is not None:
        written = result.save(out, tuple(f.strip() for f in format.split(",") if f.strip()))
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


def main() -> None:
    try:
        app()
    except LorascopeError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
