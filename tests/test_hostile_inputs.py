"""Hostile and careless inputs through the CLI (docs/reliability.md): each gets exit code 2 and a
message naming the culprit, no input file changes (sha256 before and after), and no output or
temporary folder is left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lorascope.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["lorascope", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, " ".join(capsys.readouterr().err.split())


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def pair(tmp_path, llama_lora):
    base, adapter, _ = llama_lora()
    base2, _, _ = llama_lora(merged=False)  # the same files again: the fixture is seeded
    (tmp_path / "scan").mkdir()
    return base, adapter, tmp_path


CASES = {
    "bad --modules regex": (lambda b, a, t: ["scan", str(b), str(a), "--modules", "(["], "--modules '(['"),
    "bad --modules regex (mitigate)": (lambda b, a, t: ["mitigate", str(b), str(a), "--modules", "([", "--out",
                                                        str(t / "m")], "--modules '(['"),
    "--format xml, refused before the scan": (lambda b, a, t: ["scan", str(b), str(a), "--format", "xml",
                                                               "--out", str(t / "o")], "unknown output format 'xml'"),
    "--out is an existing file": (lambda b, a, t: ["scan", str(b), str(a), "--out", str(b / "config.json")],
                                  "config.json"),
    "--out inside the adapter (scan)": (lambda b, a, t: ["scan", str(b), str(a), "--out", str(a / "x")],
                                        "lies inside the tuned"),
    "--out inside the adapter (mitigate)": (lambda b, a, t: ["mitigate", str(b), str(a), "--out", str(a / "x")],
                                            "lies inside the tuned"),
    "--out is the adapter, --overwrite (mitigate)": (lambda b, a, t: ["mitigate", str(b), str(a), "--out", str(a),
                                                                      "--overwrite"], "is the tuned input"),
    "--out is the base model (mitigate)": (lambda b, a, t: ["mitigate", str(b), str(a), "--out", str(b),
                                                            "--overwrite"], "is the base input"),
    "--out of train is the base model": (lambda b, a, t: ["train", str(b), "--task", "sst2", "--out", str(b),
                                                          "--overwrite"], "is the model input"),
    "missing tuned path": (lambda b, a, t: ["scan", str(b), str(t / "nope")], "nope: no such file or folder"),
    "lambda out of range": (lambda b, a, t: ["mitigate", str(b), str(a), "--out", str(t / "m"), "--lam", "3"],
                            "lambda must lie in [0, 2]"),
    "k of zero": (lambda b, a, t: ["scan", str(b), str(a), "--k", "0"], "k must be"),
    "epsilon above one": (lambda b, a, t: ["scan", str(b), str(a), "--epsilon", "1.5"], "epsilon must lie in (0, 1]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_with_exit_2_and_touches_nothing(pair, capsys, case):
    base, adapter, tmp = pair
    argv, message = CASES[case][0](base, adapter, tmp), CASES[case][1]
    before = {"base": digests(base), "adapter": digests(adapter)}
    code, err = run_cli(argv, capsys)
    assert code == 2, (case, err)
    assert message in err and "Traceback" not in err, (case, err)
    assert {"base": digests(base), "adapter": digests(adapter)} == before
    leftovers = [p.name for p in tmp.rglob(".*tmp-*")] + [n for n in ("o", "m") if (tmp / n).exists()]
    assert not leftovers, leftovers


def test_report_never_replaces_the_scan_it_reads(pair, capsys):
    base, adapter, tmp = pair
    assert run_cli(["scan", str(base), str(adapter), "--out", str(tmp / "scan")], capsys)[0] == 0
    scan_json = tmp / "scan" / "scan.json"
    before = scan_json.read_bytes()
    for out in (scan_json, tmp / "scan"):
        code, err = run_cli(["report", str(scan_json), "--out", str(out)], capsys)
        assert code == 2 and "scan.json" in err, err
    code, err = run_cli(["report", str(tmp / "scan"), "--out", str(scan_json)], capsys)
    assert code == 2 and "one of the result files the report reads" in err, err
    assert scan_json.read_bytes() == before
    assert run_cli(["report", str(tmp / "scan"), "--out", str(tmp / "scan" / "report.html")], capsys)[0] == 0


def test_evaluate_output_never_replaces_weights(pair, capsys):
    base, adapter, tmp = pair
    weights = base / "model.safetensors"
    before = weights.read_bytes()
    code, err = run_cli(["evaluate", str(base), "--adapter", str(adapter), "--metric", "drift",
                         "--out", str(weights)], capsys)
    assert code == 2 and "model.safetensors" in err, err
    assert weights.read_bytes() == before


def _adapter_without(adapter: Path, broken: Path, drop) -> None:
    """A copy of the adapter folder without the tensors ``drop(name)`` selects."""
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if not drop(k)}, str(broken / "adapter_model.safetensors"))


def test_a_lora_without_its_b_factor_is_an_error(pair, capsys):
    base, adapter, tmp = pair
    broken = tmp / "broken"
    _adapter_without(adapter, broken, lambda k: "lora_B" in k)
    code, err = run_cli(["scan", str(base), str(broken)], capsys)
    assert code == 2 and "lora_B" in err and "adapter_model.safetensors" in err, err
    code, err = run_cli(["mitigate", str(base), str(broken), "--out", str(tmp / "m")], capsys)
    assert code == 2 and not (tmp / "m").exists(), err


def test_a_lora_missing_one_modules_b_factor_is_an_error(pair, capsys):
    base, adapter, tmp = pair
    broken = tmp / "one"
    gone = sorted(k for k in load_file(str(adapter / "adapter_model.safetensors")) if "lora_B" in k)[0]
    _adapter_without(adapter, broken, lambda k: k == gone)
    code, err = run_cli(["scan", str(base), str(broken)], capsys)
    assert code == 2 and gone.removeprefix("base_model.model.").rsplit(".lora_B", 1)[0] in err and "lora_B" in err, err


def test_an_adapter_folder_without_its_config_is_an_error(pair, capsys):
    base, adapter, tmp = pair
    bare = tmp / "bare"
    bare.mkdir()
    (bare / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    code, err = run_cli(["scan", str(base), str(bare)], capsys)
    assert code == 2 and "adapter_config.json" in err and "Traceback" not in err, err


def test_a_report_of_a_tampered_scan_names_the_field(pair, capsys):
    base, adapter, tmp = pair
    assert run_cli(["scan", str(base), str(adapter), "--out", str(tmp / "scan")], capsys)[0] == 0
    d = json.loads((tmp / "scan" / "scan.json").read_text())
    d["matrices"][0]["max_cos"] = "0.3"
    (tmp / "scan" / "scan.json").write_text(json.dumps(d))
    code, err = run_cli(["report", str(tmp / "scan"), "--out", str(tmp / "r.html")], capsys)
    assert code == 2 and "scan.json" in err and "max_cos" in err and "Traceback" not in err, err
    assert not (tmp / "r.html").exists()


def test_a_read_only_output_folder_is_an_error(pair, capsys, read_only):
    base, adapter, tmp = pair
    ro = tmp / "ro"
    ro.mkdir()
    read_only(ro)  # tests/conftest.py: permissions, or a read-only bind mount for root
    code, err = run_cli(["scan", str(base), str(adapter), "--out", str(ro / "o")], capsys)
    assert code == 2 and "ro/o" in err and "Traceback" not in err, err


def test_a_full_disk_is_an_error_and_leaves_nothing(pair, capsys, full_disk):
    base, adapter, tmp = pair
    for argv in (["scan", str(base), str(adapter), "--out", str(full_disk / "o"), "--format", "json,csv"],
                 ["mitigate", str(base), str(adapter), "--out", str(full_disk / "m"), "--format", "merged"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and "No space left on device" in err and "Traceback" not in err, (argv, err)
        assert sorted(p.name for p in full_disk.iterdir()) == ["filler"], list(full_disk.iterdir())


def test_malformed_adapter_configs_are_errors(pair, capsys):
    base, adapter, tmp = pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for name, text in {"not json": "{", "a list": "[1]", "alpha a string": json.dumps({**cfg, "lora_alpha": "8"}),
                       "unknown type": json.dumps({**cfg, "peft_type": "NOPE"})}.items():
        bad = tmp / name.replace(" ", "_")
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(text)
        code, err = run_cli(["scan", str(base), str(bad)], capsys)
        assert code == 2 and "adapter_config.json" in err and "Traceback" not in err, (name, err)


# ------------------------------------------------------------------ experiment stores and runs


SWEEP = ["--set", "train.epochs=1", "--set", "grid.n_examples=[32]", "--set", "grid.lrs=[1e-3]"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny sweeps config and a store with one finished unit, built once for the tests below."""
    from lorascope.experiments.tiny import write_tiny_assets

    root = tmp_path_factory.mktemp("sweep")
    write_tiny_assets(root)
    cfg = root / "sweeps.toml"
    cfg.write_text((Path(__file__).resolve().parents[1] / "examples/experiments/tiny_sweeps.toml").read_text())
    store = root / "store"
    code = subprocess.run([sys.executable, "-m", "lorascope", "experiment", "run", str(cfg), "--out", str(store),
                           "--max-units", "1", *SWEEP], capture_output=True, env=_one_thread()).returncode
    assert code == 0 and (store / "records.jsonl").is_file()
    return cfg, store


def _one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _copy(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


def test_a_bad_set_value_names_the_option(sweep, tmp_path, capsys):
    cfg, _ = sweep
    code, err = run_cli(["experiment", "run", str(cfg), "--out", str(tmp_path / "s"), "--set", "train.epochs=["],
                        capsys)
    assert code == 2 and "epochs" in err and "'['" in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_non_utf8_bytes_in_a_store_are_an_error_naming_the_line(sweep, tmp_path, capsys):
    cfg, store = sweep
    bad = _copy(store, tmp_path / "bad")
    with open(bad / "records.jsonl", "ab") as f:
        f.write(b"\xff\xfe not text\n")
    before = digests(bad)
    for argv in (["experiment", "status", str(bad)], ["report", str(bad), "--out", str(tmp_path / "r.html")],
                 ["experiment", "run", str(cfg), "--out", str(bad), "--resume", *SWEEP]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and "records.jsonl" in err and "Traceback" not in err, (argv, err)
    after = digests(bad)
    after.pop(".lock"), before.pop(".lock")  # the lock file holds the pid of the last run: lorascope's own
    assert after == before and not (tmp_path / "r.html").exists()


def test_an_empty_records_file_says_so(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "records.jsonl").write_text("")
    code, err = run_cli(["report", str(tmp_path / "store"), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 2 and "records.jsonl: holds no finished units yet" in err, err


def test_a_stale_lock_naming_a_live_unrelated_pid_does_not_block(sweep, tmp_path, capsys):
    """A killed run leaves .lock behind; its pid may now be any live process (here: this test). Only
    a lock actually held by a process counts."""
    cfg, store = sweep
    st = _copy(store, tmp_path / "st")
    (st / ".lock").write_text(str(os.getpid()))
    code, out = run_cli(["experiment", "status", str(st)], capsys)
    assert code == 0
    code, err = run_cli(["experiment", "run", str(cfg), "--out", str(st), "--resume", *SWEEP], capsys)
    assert code == 0, err


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
def test_workers_end_with_a_killed_parent(sweep, tmp_path):
    """SIGKILL of `experiment run --workers 2` must not leave its workers training for minutes."""
    cfg, _ = sweep
    proc = subprocess.Popen([sys.executable, "-m", "lorascope", "experiment", "run", str(cfg), "--out",
                             str(tmp_path / "s"), "--workers", "2", "--set", "train.epochs=20000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_one_thread())
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and len(workers) < 2:  # the pool's spawn workers (plus its tracker)
        time.sleep(0.3)
        workers = [k for k in _children(proc.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]
    assert len(workers) >= 2, "the pool never started"
    time.sleep(3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A worker still starting up (importing torch: seconds on a busy machine) ends once it is up; one
    # inside a unit of 20,000 epochs would otherwise train on for many minutes.
    deadline = time.time() + 90
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"
