"""The command line as a new user meets it: every command's --help, and the CLI-only options."""

from __future__ import annotations

import json
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from lorascope.cli import app
from lorascope.errors import InputError

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ---------------------------------------------------------------------------------- mitigate --lam sweep


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny BERT and a LoRA run of it on the toy sentiment task (a run folder with its head)."""
    from lorascope.train import TrainConfig, train
    from lorascope.train.tiny import save_tiny_model, write_toy_sentiment

    root = tmp_path_factory.mktemp("cli")
    base = str(save_tiny_model(root / "bert", "bert"))
    toy = str(write_toy_sentiment(root / "toy.tsv", n=160))
    train(TrainConfig(model=base, task=toy, rank=4, epochs=2, lr=5e-3, max_length=16, device="cpu"),
          root / "run", progress=False)
    return {"base": base, "toy": toy, "run": str(root / "run")}


def test_mitigate_lambda_sweep(tiny_run, tmp_path):
    """--lam 0,0.5,1 writes one run folder per λ, each what a single mitigate at that λ writes, measured
    with --eval, and a records.jsonl the report reads."""
    from safetensors.torch import load_file

    from lorascope.evaluate import evaluate
    from lorascope.mitigation.api import mitigate
    from lorascope.report.loader import load

    out = tmp_path / "sweep"
    r = runner.invoke(app, ["mitigate", tiny_run["base"], tiny_run["run"], "--lam", "0,0.5,1", "--which", "all",
                            "--epsilon", "0.9", "--device", "cpu", "--out", str(out), "--eval", "accuracy",
                            "--data", tiny_run["toy"]], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["lam_0", "lam_0.5", "lam_1", "records.jsonl"]
    assert "matrices changed" in r.output and "accuracy" in r.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [rec["unit"]["lam"] for rec in records] == [0.0, 0.5, 1.0]
    assert all(rec["unit"]["which"] == "all" and rec["unit"]["control"] == "intruder" for rec in records)
    assert records[0]["metrics"]["n_directions"] > 0
    single = mitigate(tiny_run["base"], tiny_run["run"], tmp_path / "single", lam=0.5, which="all", epsilon=0.9,
                      device="cpu")
    assert single.summary()["n_directions"] == records[1]["metrics"]["n_directions"]
    a = load_file(str(out / "lam_0.5" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rec, lam in zip(records, ("0", "0.5", "1"), strict=True):  # each folder is a run: it evaluates alone
        acc = evaluate(tiny_run["base"], adapter=str(out / f"lam_{lam}"), metric="accuracy", data=tiny_run["toy"],
                       device="cpu", progress=False)
        assert rec["metrics"]["accuracy"] == pytest.approx(acc["tuned"])
    own = evaluate(tiny_run["base"], adapter=tiny_run["run"], metric="accuracy", data=tiny_run["toy"],
                   device="cpu", progress=False)
    assert records[2]["metrics"]["accuracy"] == pytest.approx(own["tuned"])  # λ = 1 changes nothing
    data = load(out)
    assert len(data.records) == 3 and len(data.mitigations) == 3
    # results name the folders they ended up in, not the temporary one the sweep was written into
    from lorascope.schema import MitigationResult

    assert MitigationResult.load(out / "lam_0.5" / "adapter").output["path"] == str(out / "lam_0.5" / "adapter")
    assert not [f for f in out.rglob("*.json") if ".tmp-" in f.read_text()]


def test_mitigate_sweep_bad_input_leaves_nothing(tiny_run, tmp_path):
    out = tmp_path / "sweep"
    for extra in (["--lam", "0,x"], ["--lam", "0,3"], ["--lam", "0,0"], ["--lam", "0,1", "--eval", "bleu"]):
        r = runner.invoke(app, ["mitigate", tiny_run["base"], tiny_run["run"], "--out", str(out), *extra])
        assert isinstance(r.exception, InputError), (extra, r.output)
        assert not out.exists() and list(tmp_path.iterdir()) == []
    # a metric that fails after the first λ was written: still nothing at --out
    r = runner.invoke(app, ["mitigate", tiny_run["base"], tiny_run["run"], "--out", str(out), "--lam", "0,1",
                            "--eval", "accuracy", "--data", str(tmp_path / "missing.tsv"), "--device", "cpu"])
    assert r.exception is not None and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


# ------------------------------------------------------------------------------------------ --backend ray

TOML = """kind = "methods"
name = "t"
model = "tiny/bert"
tasks = ["tiny/sentiment"]
[train]
epochs = 1
max_length = 16
device = "cpu"
[grid]
ranks = [1]
full = false
"""


def test_ray_backend_without_ray_leaves_no_experiment(tmp_path, monkeypatch, capsys):
    """The hint names the extra (rich markup would eat "[ray]"), and no half-made store is left: the
    same folder then runs locally without --resume."""
    import importlib.util

    from lorascope.cli import main
    from lorascope.experiments.tiny import write_tiny_assets

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed")
    write_tiny_assets(tmp_path)
    (tmp_path / "c.toml").write_text(TOML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    cmd = ["lorascope", "experiment", "run", "c.toml", "--out", "exp"]
    monkeypatch.setattr("sys.argv", [*cmd, "--backend", "ray"])
    with pytest.raises(SystemExit) as e:
        main()  # as the console script runs it: errors become a message and exit code 2
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'lorascope[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "exp").exists()
    r = runner.invoke(app, [*cmd[1:], "--max-units", "0"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "exp" / "experiment.json").is_file()


# ------------------------------------------------------------------------------------------- progress


def test_scan_progress_on_a_pipe_is_log_lines(tiny_run, tmp_path, monkeypatch):
    """Not a terminal: a line per stage, and a count line every LOG_EVERY_S seconds (here every matrix)."""
    monkeypatch.setattr("lorascope.progress.LOG_EVERY_S", 0.0)
    r = runner.invoke(app, ["scan", tiny_run["base"], tiny_run["run"], "--device", "cpu", "--out", str(tmp_path / "s")],
                      env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any(line.startswith("loading ") and line.endswith(" ...") for line in lines)
    assert any(line.startswith("loading ") and ": done in " in line for line in lines)
    counts = [line for line in lines if line.startswith("reading and decomposing matrices: ")]
    assert counts[0].endswith(": 0/12") and len(counts) == 13 and "12/12 (100%)" in counts[-1]
    assert any(line.startswith("writing json to ") for line in lines) and (tmp_path / "s" / "scan.json").is_file()


def test_progress_on_a_terminal_shows_the_stage():
    import io

    from rich.console import Console

    from lorascope.progress import Progress

    buf = io.StringIO()
    shown = Progress(console=Console(file=buf, force_terminal=True, width=100))
    assert shown.live
    with shown.stage("loading the base"):
        pass
    assert list(shown.track(iter(range(3)), 3, "decomposing")) == [0, 1, 2]
    text = buf.getvalue()
    assert "loading the base" in text and "decomposing" in text and " ...\n" not in text
    quiet = Progress(enabled=False)
    with quiet.stage("x"):
        assert list(quiet.track([1], 1, "y")) == [1]
