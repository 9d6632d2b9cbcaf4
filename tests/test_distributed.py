"""Splitting a scan over torchrun ranks: the share is balanced and the gathered result is unchanged."""

import json
import os
import subprocess
import sys

from lorascope.scanning.distributed import matrix_cost, split


def test_split_is_a_balanced_partition():
    costs = [matrix_cost(s) for s in [(64, 64)] * 4 + [(172, 64)] * 3 + [(64, 172)] * 3 + [(8, 64)]]
    shares = split(costs, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)  # LPT: no rank exceeds another by more than one job
    assert split(costs, 3) == shares and split(costs, 1) == [list(range(len(costs)))]


def _cli(args: list[str], cwd, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *launcher, "-m", "lorascope", "scan", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_torchrun_two_ranks_gloo_equals_one_process(tmp_path, llama_lora):
    llama_lora(hidden=40, intermediate=72, alpha=16, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    common = [str(tmp_path / "base"), str(tmp_path / "adapter"), "--device", "cpu", "--side", "both"]
    one = _cli([*common, "--out", str(tmp_path / "one")], tmp_path, [])
    assert one.returncode == 0, one.stderr
    two = _cli([*common, "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache")], tmp_path,
               ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("scanned 8 matrices") == 1  # only rank 0 reports
    a = json.loads((tmp_path / "one" / "scan.json").read_text())
    b = json.loads((tmp_path / "two" / "scan.json").read_text())
    assert a["matrices"] == b["matrices"]  # same records, same order, same bits
    assert a["summary"] == b["summary"] and b["timing"]["n_matrices"] == 8
    # both ranks wrote their share of the (shared) cache: one entry per matrix and side
    assert len(list((tmp_path / "cache" / "bases").rglob("*.safetensors"))) == 16
