"""The command line as a new user meets it: every command's --help, and the CLI-only options."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from lorascope.cli import app

runner = CliRunner()


def _commands(group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the app, groups included: (), ("scan",), ("experiment", "run"), ...
    (typer 0.29 vendors click: a group is whatever has ``commands``)."""
    out = [path]
    if hasattr(group, "commands"):
        for name, cmd in group.commands.items():
            out += _commands(cmd, (*path, name))
    return out


COMMANDS = _commands(typer.main.get_command(app))


def test_every_command_is_walked():
    assert {("scan",), ("train",), ("mitigate",), ("demo",), ("experiment", "run")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "lorascope")
def test_help_texts(path):
    r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    text = r.output
    assert "<bool>" not in text  # a flag takes no value
    # a stray " ." is what rich leaves of a sentence whose "[default: ...]" it took for markup
    assert not re.search(r"\s\.(\s|$)", text), [line for line in text.splitlines() if re.search(r"\s\.(\s|$)", line)]
    assert "Show this message and exit." in text
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    for p in command.params:  # every option has a help text, and each ends like a sentence
        if p.param_type_name == "option" and p.name != "help":
            assert p.help and p.help.rstrip().endswith((".", ")", "]")), (path, p.name, p.help)
