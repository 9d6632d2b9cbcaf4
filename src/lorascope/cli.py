"""Thin command-line interface over lorascope's public API."""

from __future__ import annotations

import sys

import typer

from lorascope.errors import LorascopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def main() -> None:
    try:
        app()
    except LorascopeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
