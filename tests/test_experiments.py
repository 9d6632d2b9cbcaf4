"""lorascope experiment: each study kind on a tiny random BERT, resume after a kill, tracking = post-hoc scan.

Ground truth used here: a rank-r LoRA update has ΔW of rank ≤ r, so its effective rank is ≤ r (= 1 for
r = 1); λ = 1 leaves the weights as they were (same intruders, same scores); with which="top1" one
direction is scaled per matrix with intruders; a stage's own head on its own backbone scores what
training reported; the tracker's last scan and a scan of the saved checkpoint see the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorascope import scan
from lorascope.cli import app
from lorascope.errors import InputError
from lorascope.experiments import (
    IntruderTracker,
    experiment_status,
    load_config,
    parse_config,
    plan,
    run_experiment,
    studies,
)
from lorascope.experiments.arms import parse_alpha
from lorascope.experiments.store import Store
from lorascope.experiments.tiny import write_tiny_assets
from lorascope.report.loader import load as load_report
from lorascope.report.tables import continual_groups, lam_groups, lam_rows
from lorascope.schema import ScanResult
from lorascope.train import TrainConfig, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "experiments"
QUIET = {"log": lambda line: None}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    write_tiny_assets(root)
    return root


def tiny(assets: Path, kind: str, grid: dict, **top) -> dict:
    """A small config dict over the tiny assets (faster than the example files)."""
    raw = {
        "kind": kind, "name": f"t_{kind}", "model": "tiny/bert", "tasks": ["tiny/sentiment"],
        "train": {"epochs": 2, "max_length": 16, "lr": 2e-2, "device": "cpu"},
        "scan": {"k": 4}, "forgetting": {"data": "tiny/corpus.txt", "max_examples": 6}, "grid": grid,
    }
    raw.update(top)
    return raw


def config(assets: Path, kind: str, grid: dict, **top):
    return parse_config(tiny(assets, kind, grid, **top), assets)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------ config


def test_alpha_rules():
    assert parse_alpha("2r", 8) == (16.0, False)
    assert parse_alpha(8, 64) == (8.0, False)
    assert parse_alpha("rslora", 4) == (8.0, True)
    assert parse_alpha("rs:8", 64) == (8.0, True)
    assert parse_alpha("0.5r", 4) == (2.0, False)
    for bad in ("two", -1, True, "rs:x"):
        with pytest.raises(InputError):
            parse_alpha(bad, 4)


def test_plans_and_keys(assets):
    cfg = config(assets, "methods", {"ranks": [1, 8], "alphas": ["2r", 8, "rslora"],
                                     "variants": ["dora", "pissa", "loraplus", "lora-a-frozen"],
                                     "variant_ranks": [8]}, seeds=[0, 1])
    units = plan(cfg)
    assert len(units) == 2 * (1 + 2 * 3 + 4)  # seeds × (full + ranks × alphas + variants)
    assert len({u.key for u in units}) == len(units)
    assert [u.key for u in plan(cfg)] == [u.key for u in units]  # deterministic
    r8 = [u for u in units if (u.labels["method"], u.labels.get("rank"), u.labels["seed"]) == ("lora", 8, 0)]
    assert sorted((u.labels["alpha"], u.labels.get("rslora", False)) for u in r8) == \
        [(8.0, False), (16.0, False), (16.0, True)]
    assert {u.labels["lr"] for u in r8 if not u.labels.get("rslora")} == {2e-2}  # [train] lr wins

    inter = plan(config(assets, "intervention", {"lams": [0, 0.5, 1], "controls": ["intruder", "neighbour"]}))
    tuned = [u for u in inter if u.action == "train"]
    assert len(tuned) == 1 and len(inter) == 1 + 3 * 2
    assert all(u.deps == (tuned[0].key,) for u in inter if u.action == "mitigate")

    cont = plan(config(assets, "continual", {"methods": [{"method": "lora", "rank": 4}]},
                       tasks=["tiny/sentiment", "tiny/topics"]))
    assert [u.labels["stage"] for u in cont] == [1, 2] and cont[1].deps == (cont[0].key,)
    assert cont[1].train["model"] is None  # the previous stage's model, found at run time

    sweeps = plan(config(assets, "sweeps", {"lrs": [1e-3, 1e-2], "n_examples": [32, 64]}))
    assert sorted((u.labels["lr"], u.labels["n_examples"]) for u in sweeps) == \
        [(1e-3, None), (1e-2, None), (2e-2, 32), (2e-2, 64)]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(kind="nope"), "kind must be"),
    (lambda r: r.update(colour="red"), "unknown key"),
    (lambda r: r["train"].update(rank=4), "set by the study"),
    (lambda r: r["train"].update(epoch=4), "unknown key"),
    (lambda r: r["grid"].update(ranks=[0]), "positive"),
    (lambda r: r["grid"].update(variants=["qlora"]), "unknown variant"),
    (lambda r: r["grid"].update(alphas=["lots"]), "α rule"),
    (lambda r: r["forgetting"].update(metrics=["bleu"]), "unknown metric"),
    (lambda r: r.update(tasks=[]), "tasks must be"),
])
def test_bad_configs(assets, mutate, message):
    raw = tiny(assets, "methods", {"ranks": [1]})
    mutate(raw)
    with pytest.raises(InputError, match=message):
        parse_config(raw, assets)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["forgetting"].update(metric=["sts"]), r"f\.toml \[forgetting\]: unknown key\(s\) \['metric'\]"),
    (lambda r: r["grid"].update(rank=[1]), r"f\.toml \[grid\] \(methods\): unknown key\(s\) \['rank'\]"),
    (lambda r: r["grid"].update(methods=[{"method": "lora", "rnak": 4}]), r"\[grid\].*unknown key\(s\) \['rnak'\]"),
    (lambda r: r["train"].update(epochs="3"), r"f\.toml \[train\]: epochs: input should be a valid integer"),
    (lambda r: r["forgetting"].update(max_examples=[6]), r"\[forgetting\]: max_examples: "),
    (lambda r: r.update(seeds=["0"]), r"f\.toml: seeds\[0\]: input should be a valid integer"),
    (lambda r: r.update(grid=3), r"f\.toml: grid: input should be a valid dictionary, got 3"),
])
def test_config_errors_name_file_table_and_key(assets, mutate, message):
    raw = tiny(assets, "methods", {"ranks": [1]})
    mutate(raw)
    with pytest.raises(InputError, match=message):
        parse_config(raw, assets, source="f.toml")


def test_bad_config_file_exits_2_without_traceback(assets, tmp_path):
    (tmp_path / "bad.toml").write_text('kind = "methods"\nmodel = "m"\ntasks = ["t"]\n[train]\nepoch = 1\n')
    cmd = [sys.executable, "-c", "from lorascope.cli import main; main()", "experiment", "run",
           str(tmp_path / "bad.toml")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in output
    # (main() prints the message as rich markup, which drops the "[train]"; the InputError has it)
    assert "bad.toml" in output and "unknown key(s) ['epoch']" in output


def test_every_kind_is_one_module_in_the_registry():
    from lorascope.experiments import config as config_module
    from lorascope.experiments.kinds import KINDS

    assert config_module.KINDS == tuple(KINDS) == ("methods", "sweeps", "intervention", "continual", "tracking",
                                                             "merge", "mitigations")
    for name, kind in KINDS.items():
        assert kind.__name__ == f"lorascope.experiments.kinds.{name}"
        assert callable(kind.plan) and issubclass(kind.Grid, config_module.Table)
    assert set(studies.actions()) == {"train", "mitigate", "continual", "merge", "edit"}


def test_example_configs_parse(assets, tmp_path):
    for f in sorted(EXAMPLES.glob("**/*.toml")):  # the paper's configs (examples/experiments/paper) too
        shutil.copy(f, assets / f.name)
        cfg = load_config(assets / f.name)
        assert plan(cfg), f.name
    decoder = load_config(EXAMPLES / "paper" / "decoder_methods.toml")
    assert decoder.tasks == ["arithmetic"] and len(plan(decoder)) == 7  # full + r in {1, 8, 64} × 2 alphas
    dora = config(assets, "intervention", {"methods": [{"method": "dora", "rank": 4}]})
    with pytest.raises(InputError, match="cannot be written back exactly"):
        plan(dora)


# ------------------------------------------------------------------------------------------ studies


@pytest.fixture(scope="module")
def methods_store(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("methods") / "store"
    variants = ["dora", "pissa", "loraplus", "lora-a-frozen"]
    cfg = config(assets, "methods", {"ranks": [1, 4], "variants": variants, "variant_ranks": [2]})
    report = run_experiment(cfg, out, **QUIET)
    assert report.remaining == 0 and len(report.computed) == 7
    return out


def test_methods_records_are_well_formed(methods_store):
    records = lines(methods_store / "records.jsonl")
    assert len(records) == 7 and len({r["key"] for r in records}) == 7
    assert {r["unit"]["method"] for r in records} == {"full", "lora", "dora", "pissa", "loraplus",
                                                      "lora-a-frozen"}
    for r in records:
        m = r["metrics"]
        for key in ("accuracy", "n_intruders", "effective_rank", "forgetting", "pseudo-loss",
                    "pseudo-loss_base", "trainable_params"):
            assert m[key] is not None, (r["unit"], key)
        assert 0 <= m["accuracy"] <= 1
        assert m["forgetting"] == m["pseudo-loss"] and m["forgetting_metric"] == "pseudo-loss"
        scan_file = methods_store / r["scan"]
        result = ScanResult.load(scan_file)
        assert result.summary() == r["scan_summary"]
        left = r["scan_summary"]["sides"]["left"]
        assert m["n_intruders"] == left["n_intruders"] == sum(x.n_intruders for x in result.matrices)
        eps_curve = left["epsilon_curve"]["n_intruders"]
        assert eps_curve == sorted(eps_curve)  # more intruders as ε grows
        assert left["k_curve"]["n_intruders"][-1] == m["n_intruders"]  # k = 4 is the scan's k
        assert (methods_store / r["paths"]["run"] / "run.json").is_file()
        assert json.loads((methods_store / "units" / r["key"] / "record.json").read_text()) == r
        rank = r["unit"].get("rank")
        if r["unit"]["method"] in ("lora", "loraplus", "lora-a-frozen"):
            # ΔW = s B A has rank ≤ r: its effective rank is ≤ r, exactly 1 for r = 1
            assert all(x.delta_effective_rank <= rank + 1e-3 for x in result.matrices)
            if rank == 1:
                assert all(abs(x.delta_effective_rank - 1) < 1e-3 for x in result.matrices)
        if r["unit"]["method"] == "pissa":  # stored as a plain LoRA of rank 2r on the unchanged base
            config_file = methods_store / r["paths"]["run"] / "adapter" / "adapter_config.json"
            adapter = json.loads(config_file.read_text())
            assert adapter["r"] == 2 * rank and adapter["init_lora_weights"] is True
    by_method = {r["unit"]["method"]: r["metrics"] for r in records if r["unit"].get("rank") in (None, 2)}
    # A frozen: the same rank-2 adapter minus the A factors (r × in per module) among the trainable parameters
    assert by_method["lora-a-frozen"]["trainable_params"] < by_method["loraplus"]["trainable_params"]
    assert by_method["full"]["trainable_params"] > by_method["loraplus"]["trainable_params"]


def test_methods_store_feeds_report_and_status(methods_store):
    data = load_report(methods_store)
    assert len(data.records) == 7 and len(data.runs) == 7
    assert all(r.run is not None and r.run.result is not None for r in data.records)
    status = experiment_status(methods_store)
    assert status["done"] == status["total"] == 7 and status["running_pid"] is None
    assert {row["state"] for row in status["rows"]} == {"done"}


def test_intervention_study(assets, tmp_path, monkeypatch):
    import lorascope.evaluate as evaluate_module

    arms = [{"method": "lora", "rank": 4}, {"method": "full", "lr": 1e-2}]
    cfg = config(assets, "intervention", {"methods": arms, "lams": [0, 1]})
    scored_base = []  # (metric, score_base) of every evaluate call
    real = evaluate_module.evaluate

    def spy(*a, **k):
        scored_base.append((k.get("metric"), k.get("score_base", True)))
        return real(*a, **k)

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    run_experiment(cfg, tmp_path / "store", **QUIET)
    records = lines(tmp_path / "store" / "records.jsonl")
    assert len(records) == 2 * (1 + 2 * 2)
    # the base is measured once per fine-tune; its 4 edits reuse the numbers and score only themselves
    forgetting = cfg.forgetting.metrics
    assert sum(base for m, base in scored_base if m in forgetting) == 2 * len(forgetting)
    assert not any(base for m, base in scored_base if m == "accuracy")
    for r in records:
        tuned = next(t for t in records if t["action"] == "train" and t["unit"]["method"] == r["unit"]["method"])
        for m in forgetting:
            assert r["metrics"][f"{m}_base"] == tuned["metrics"][f"{m}_base"]
        # where a unit's time went: its steps, each timed once, within the unit's own wall time
        want = {"train", "scan", "forgetting"} if r["action"] == "train" else {"edit", "task", "scan", "forgetting"}
        assert set(r["phase_seconds"]) == want and sum(r["phase_seconds"].values()) <= r["seconds"] + 1e-3
    for method in ("lora", "full"):
        mine = [r for r in records if r["unit"]["method"] == method]
        tuned = next(r for r in mine if r["action"] == "train")["metrics"]
        lam = {(r["unit"]["lam"], r["unit"]["control"]): r["metrics"]
               for r in mine if r["action"] == "mitigate"}
        assert len(lam) == 4
        assert tuned["n_intruders"] > 0  # a large lr on the random model makes intruders
        for control in ("intruder", "neighbour"):
            one = lam[(1.0, control)]
            assert one["n_intruders"] == tuned["n_intruders"]  # λ = 1 is the identity
            assert one["accuracy"] == pytest.approx(tuned["accuracy"], abs=1e-9)
            # which = top1: one direction per matrix with intruders
            assert one["n_directions"] == lam[(0.0, control)]["n_directions"]
            assert one["n_directions"] == tuned["matrices_with_intruders"]
            assert lam[(0.0, control)]["max_rel_error"] < 1e-5
    groups = lam_groups(load_report(tmp_path / "store").records)
    assert len(groups) == 2
    for group in groups:
        rows, ref = lam_rows(group)
        assert ref is not None and [row["lam"] for row in rows] == [0.0, 1.0]
        assert rows[1]["intruder_dacc"] == 0.0 and rows[1]["neighbour_dacc"] == 0.0
    table = json.loads((tmp_path / "store" / "summary.json").read_text())["lambda"]
    assert len(table) == 8 and all(r["accuracy_change_pct"] == 0.0 for r in table if r["lam"] == 1.0)
    assert {(r["arm"]["method"], r["arm"]["control"]) for r in table} == \
        {(m, c) for m in ("lora", "full") for c in ("intruder", "neighbour")}


def test_continual_study(assets, tmp_path):
    cfg = config(assets, "continual", {"methods": [{"method": "lora", "rank": 4}]},
                 tasks=["tiny/sentiment", "tiny/topics"])
    run_experiment(cfg, tmp_path / "store", **QUIET)
    first, second = lines(tmp_path / "store" / "records.jsonl")
    assert (first["unit"]["stage"], second["unit"]["stage"]) == (1, 2)
    # stage 1: the task's own head on its own (merged) backbone scores what training reported
    own = first["metrics"]["test_accuracy"]
    assert first["metrics"]["accuracy/sentiment"] == pytest.approx(own, abs=1e-9)
    assert set(second["metrics"]) >= {"accuracy/sentiment", "accuracy/topics", "forgetting", "n_intruders"}
    assert second["metrics"]["accuracy"] == second["metrics"]["accuracy/topics"]
    store = Store(tmp_path / "store")
    for rec in (first, second):
        assert (store.unit_dir(rec["key"]) / "merged" / "model").is_dir()
        assert ScanResult.load(tmp_path / "store" / rec["scan"]).settings["base"] == cfg.model
    stage2 = json.loads((store.unit_dir(second["key"]) / "run" / "run.json").read_text())
    assert stage2["model"] == str((store.unit_dir(first["key"]) / "merged").resolve())
    assert len(continual_groups(load_report(tmp_path / "store").records)) == 1


def test_sweeps_spearman(assets, tmp_path):
    scipy_stats = pytest.importorskip("scipy.stats")
    grid = {"methods": [{"method": "lora", "rank": 2}], "lrs": [2e-3, 1e-2, 4e-2, 8e-2]}
    cfg = config(assets, "sweeps", grid, train={"epochs": 1, "max_length": 16, "device": "cpu"})
    run_experiment(cfg, tmp_path / "store", **QUIET)
    records = lines(tmp_path / "store" / "records.jsonl")
    summary = json.loads((tmp_path / "store" / "summary.json").read_text())
    row = next(r for r in summary["spearman"] if r["axis"] == "all")
    x = [r["metrics"]["n_intruders"] for r in records]
    y = [r["metrics"]["forgetting"] for r in records]
    expected = scipy_stats.spearmanr(x, y).statistic
    if len(set(x)) < 2:
        assert row["spearman_intruders_forgetting"] is None
    else:
        assert row["spearman_intruders_forgetting"] == pytest.approx(expected, abs=1e-12)
    assert row["n"] == 4


# ------------------------------------------------------------------------------------------ resume


def test_resume_recomputes_nothing(assets, tmp_path, monkeypatch):
    out = tmp_path / "store"
    cfg = config(assets, "sweeps", {"methods": [{"method": "lora", "rank": 2}], "lrs": [1e-3, 1e-2, 3e-2]},
                 train={"epochs": 1, "max_length": 16, "device": "cpu"})
    first = run_experiment(cfg, out, max_units=1, **QUIET)
    assert len(first.computed) == 1 and first.remaining == 2
    done_file = out / "units" / first.computed[0] / "record.json"
    stamp = done_file.stat().st_mtime_ns

    with pytest.raises(InputError, match="--resume"):
        run_experiment(cfg, out, **QUIET)

    # the next unit fails: the run stops, what finished stays finished
    real, calls = studies._run_train, []

    def flaky(u, folder, store):
        calls.append(u.key)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(u, folder, store)

    monkeypatch.setattr(studies, "_run_train", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(cfg, out, resume=True, **QUIET)
    assert first.computed[0] not in calls and len(calls) == 2
    assert len(lines(out / "records.jsonl")) == 2
    partial = out / "units" / calls[1]
    assert partial.is_dir() and not (partial / "record.json").exists()
    assert experiment_status(out)["done"] == 2
    assert {r["state"] for r in experiment_status(out)["rows"]} == {"done", "partial"}
    monkeypatch.setattr(studies, "_run_train", real)

    # a torn last line (killed mid-write) and a record.json whose line never made it
    records = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text(records[0] + "\n" + records[1][:25])
    resumed = run_experiment(cfg, out, resume=True, **QUIET)
    assert resumed.recovered == 1 and resumed.computed == [calls[1]] and resumed.remaining == 0
    assert done_file.stat().st_mtime_ns == stamp
    final = lines(out / "records.jsonl")
    assert sorted(r["key"] for r in final) == sorted(u.key for u in plan(cfg))
    again = run_experiment(cfg, out, resume=True, **QUIET)
    assert again.computed == [] and again.already_done == 3

    # the shared settings may not change under a store; the grid may grow
    changed = config(assets, "sweeps", {"methods": [{"method": "lora", "rank": 2}], "lrs": [1e-3]},
                     train={"epochs": 2, "max_length": 16, "device": "cpu"})
    with pytest.raises(InputError, match="different shared settings"):
        run_experiment(changed, out, resume=True, **QUIET)


_HOLD = """
import sys, time
from lorascope.experiments.store import Store
with Store(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(60)
"""


def test_store_lock(assets, tmp_path):
    """A second run on a store is refused, naming the lock file; a lock file left by a dead process, or
    naming a live process that does not hold the lock, blocks nothing (only a held lock counts)."""
    cfg = config(assets, "sweeps", {"methods": [{"method": "lora", "rank": 2}], "lrs": [1e-3]})
    root = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert Store(root).running_pid() == holder.pid
        with pytest.raises(InputError, match=rf"another run \(pid {holder.pid}, holding the lock .*\.lock\)"):
            run_experiment(cfg, root, **QUIET)
        with pytest.raises(InputError, match=r"\.lock"), Store(root).lock():
            pass
    finally:
        holder.kill()
        holder.wait()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for stale in (dead.stdout.strip(), str(os.getppid()), "1"):  # a dead pid, then live ones that hold nothing
        (root / ".lock").write_text(stale)
        assert Store(root).running_pid() is None
        with Store(root).lock():
            assert Store(root).running_pid() == os.getpid()
        assert Store(root).running_pid() is None


def test_cli_run_and_status(assets, tmp_path):
    shutil.copy(EXAMPLES / "tiny_sweeps.toml", assets / "cli_sweeps.toml")
    out = tmp_path / "store"
    runner = CliRunner()
    args = ["experiment", "run", str(assets / "cli_sweeps.toml"), "--out", str(out), "--max-units", "1",
            "--set", "train.epochs=1", "--set", "grid.n_examples=[32]", "--set", "grid.lrs=[1e-3]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(lines(out / "records.jsonl")) == 1
    result = runner.invoke(app, ["experiment", "status", str(out)])
    assert result.exit_code == 0 and "1/2 units done" in result.output
    assert "Time per unit, mean seconds" in result.output  # where the finished unit's time went
    from lorascope.experiments.show import time_table

    row = experiment_status(out)["rows"]
    table = time_table(row)
    assert [c.header for c in table.columns] == ["action", "units", "train", "scan", "forgetting", "whole unit"]


@pytest.mark.slow
def test_kill_and_resume_subprocess(assets, tmp_path):
    """A real SIGKILL mid-run; --resume keeps every unit whose record was written."""
    shutil.copy(EXAMPLES / "tiny_sweeps.toml", assets / "kill_sweeps.toml")
    out = tmp_path / "store"
    cmd = [sys.executable, "-c", "from lorascope.cli import main; main()", "experiment", "run",
           str(assets / "kill_sweeps.toml"), "--out", str(out), "--set", "train.epochs=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not (out / "records.jsonl").is_file()
                                      or len(lines(out / "records.jsonl")) < 2):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r["key"]: r for r in lines(out / "records.jsonl")}
    assert len(before) >= 2
    cfg = load_config(assets / "kill_sweeps.toml", ["train.epochs=1"])
    report = run_experiment(cfg, out, resume=True, **QUIET)
    assert not set(report.computed) & set(before)
    after = {r["key"]: r for r in lines(out / "records.jsonl")}
    assert set(after) == {u.key for u in plan(cfg)}
    assert all(after[k] == before[k] for k in before)


@pytest.mark.slow
def test_process_pool_matches_inline(assets, tmp_path):
    cfg = config(assets, "sweeps", {"methods": [{"method": "lora", "rank": 2}], "lrs": [1e-3, 1e-2]},
                 train={"epochs": 1, "max_length": 16, "device": "cpu"})
    run_experiment(cfg, tmp_path / "inline", **QUIET)
    run_experiment(cfg, tmp_path / "pool", workers=2, **QUIET)
    inline = {r["key"]: r["metrics"] for r in lines(tmp_path / "inline" / "records.jsonl")}
    pool = {r["key"]: r["metrics"] for r in lines(tmp_path / "pool" / "records.jsonl")}
    assert inline.keys() == pool.keys()
    for key in inline:  # deterministic on CPU: same seed, same numbers
        assert pool[key]["n_intruders"] == inline[key]["n_intruders"]
        assert pool[key]["accuracy"] == pytest.approx(inline[key]["accuracy"])


@pytest.mark.slow
def test_ray_backend(assets, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        cfg = config(assets, "sweeps", {"methods": [{"method": "lora", "rank": 2}], "lrs": [1e-3, 1e-2]},
                     train={"epochs": 1, "max_length": 16, "device": "cpu"})
        report = run_experiment(cfg, tmp_path / "store", backend="ray", workers=2, **QUIET)
        assert report.remaining == 0 and len(lines(tmp_path / "store" / "records.jsonl")) == 2
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------- tracking


class SaveAt:
    """Saves the adapter or model at given steps, in the same loop the tracker watches."""

    def __init__(self, folder: Path, steps: set[int]):
        self.folder, self.steps = folder, steps

    def on_step(self, model, step):
        if step in self.steps:
            model.save_pretrained(self.folder / f"step{step}")


@pytest.mark.parametrize("method, lr", [("lora", 2e-2), ("full", 1e-2)])
def test_tracker_counts_equal_posthoc_scan(assets, tmp_path, method, lr):
    base = str(assets / "tiny" / "bert")
    tracker = IntruderTracker(base, every=4, k=4, epsilon=0.5, modules=r"\.\d+\.", device="cpu",
                              log=tmp_path / "tracking.jsonl", unit={"method": method})
    saver = SaveAt(tmp_path / "ckpt", {4, 8})
    cfg = TrainConfig(model=base, task=str(assets / "tiny" / "sentiment"), method=method, rank=4, lr=lr,
                      epochs=2, max_length=16, device="cpu")
    train(cfg, tmp_path / "run", progress=False, callbacks=[saver, tracker])
    steps = [s for s, _ in tracker.history]
    assert steps == [0, 4, 8, 12]  # 96 examples / 16 = 6 steps per epoch, 12 in all
    logged = lines(tmp_path / "tracking.jsonl")
    assert [x["step"] for x in logged] == steps and logged[0]["metrics"]["n_intruders"] == 0
    final = tmp_path / "run" / ("adapter" if method == "lora" else "model")
    checkpoints = {4: tmp_path / "ckpt" / "step4", 8: tmp_path / "ckpt" / "step8", 12: final}
    for step, summary in tracker.history[1:]:
        post = scan(base, str(checkpoints[step]), k=4, epsilon=0.5, modules=r"\.\d+\.", device="cpu")
        assert summary == post.summary(), step
    post = scan(base, str(final), k=4, epsilon=0.5, modules=r"\.\d+\.", device="cpu")
    assert [(m.name, m.max_cos, m.n_intruders) for m in tracker.last] == \
        [(m.name, m.max_cos, m.n_intruders) for m in post.matrices]
    assert sum(m.n_intruders for m in post.matrices) > 0
    assert len(tracker._bases) == len(post.matrices)  # each base decomposed once, reused at every step


def test_tracking_study(assets, tmp_path):
    cfg = config(assets, "tracking", {"methods": [{"method": "lora", "rank": 4}], "every": 5})
    run_experiment(cfg, tmp_path / "store", **QUIET)
    (record,) = lines(tmp_path / "store" / "records.jsonl")
    assert record["metrics"]["tracking_matches_scan"] is True
    track = lines(tmp_path / "store" / record["paths"]["tracking"])
    assert [x["step"] for x in track] == [0, 5, 10, 12]
    assert track[-1]["metrics"]["n_intruders"] == record["metrics"]["n_intruders"]
    data = load_report(tmp_path / "store")
    assert [r.step for r in data.tracking] == [0, 5, 10, 12]


def test_tracker_as_trainer_callback(assets, tmp_path):
    """The same tracker inside transformers.Trainer (on_train_begin / on_step_end / on_train_end)."""
    pytest.importorskip("accelerate")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    base = str(assets / "tiny" / "bert")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))
    rows = (assets / "tiny" / "sentiment" / "train.tsv").read_text().splitlines()[1:33]
    texts = [line.split("\t") for line in rows]
    enc = [dict(tok(t, truncation=True, max_length=16), labels=int(lbl == "positive")) for t, lbl in texts]
    tracker = IntruderTracker(base, every=2, k=4, modules=r"\.\d+\.", device="cpu")
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8,
                             num_train_epochs=1, learning_rate=5e-2, report_to=[], save_strategy="no",
                             use_cpu=True, logging_strategy="no", disable_tqdm=True)
    from transformers import DataCollatorWithPadding

    Trainer(model=model, args=args, train_dataset=enc, data_collator=DataCollatorWithPadding(tok),
            callbacks=[tracker]).train()
    assert [s for s, _ in tracker.history] == [0, 2, 4]
    model.save_pretrained(tmp_path / "adapter")
    post = scan(base, str(tmp_path / "adapter"), k=4, modules=r"\.\d+\.", device="cpu")
    assert tracker.history[-1][1] == post.summary()
