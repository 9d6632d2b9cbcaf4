"""Peak resident memory of ``lorascope scan`` on the CPU while it scans a model pair of ≥ 8 GB.

Writes a base and a fully fine-tuned checkpoint (LLaMA-style, hidden 2048, MLP 5632, tied
embeddings, float32, sharded safetensors; ``scan_bench.build_model``) of 4.1 GB each into a
temporary folder, then runs ``lorascope scan BASE TUNED --device cpu`` in a child process and
reports its peak RSS: VmHWM of the child (the kernel's high-water mark of its address space) and
the largest value psutil saw while polling. File-backed pages of memory-mapped weights count in RSS,
which is why the scan reads without mmap; ``--compare-mmap`` also measures the plain streaming path
(the same scan through safetensors' memory-mapped reader) on the first layers for contrast.

    python benchmarks/cpu_memory_bench.py --threads 2 [--layers 20] [--compare-mmap 4] [--out rss.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
import scan_bench  # noqa: E402

SHAPE = dict(hidden=2048, intermediate=5632, layers=20, heads=16, kv_heads=16)
MMAP_SCRIPT = """
import sys
from safetensors import safe_open
from lorascope.io import checkpoint
checkpoint.open_safetensors = lambda f: safe_open(str(f), framework="pt")  # the memory-mapped reader
from lorascope import scan
scan(sys.argv[1], sys.argv[2], modules=sys.argv[3], device="cpu")
"""


# The child reports its own high-water mark at exit: VmHWM of /proc/self/status belongs to the
# process's address space alone. (ru_maxrss is not used: Linux carries it across exec, so a child
# forked from this process, which held the model while writing it, would report this one's peak.)
PEAK = ("import atexit, sys\n"
        "def _hwm():\n"
        "    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "    print('MAXRSS_KB', kb[0], file=sys.stderr, flush=True)\n"
        "atexit.register(_hwm)\n")


def run_child(code: str, argv: list[str], env: dict) -> dict:
    """Run ``code`` in a child Python with ``argv``; return wall seconds, the child's own peak RSS
    (VmHWM, printed at exit) and the largest RSS seen by polling it every 0.2 s."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK + code, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ps, polled = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            polled = max(polled, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{out[-3000:]}")
    maxrss = [int(line.split()[1]) for line in out.splitlines() if line.startswith("MAXRSS_KB")]
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_MB": round(maxrss[-1] / 1024, 1),
            "polled_rss_MB": round(polled / 2**20, 1), "tail": out[-400:]}


CLI_SCRIPT = "import runpy; sys.argv[0] = 'lorascope'; runpy.run_module('lorascope', run_name='__main__')"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=SHAPE["layers"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the child (the 2-core target)")
    ap.add_argument("--compare-mmap", type=int, default=0, help="also scan this many layers via mmap reads")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir, removed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lorascope-rss-", dir=os.environ.get("TMPDIR")))
    report: dict = {"shape": SHAPE | {"layers": args.layers}, "threads": args.threads}
    try:
        if not (root / "full" / "config.json").exists():
            t = time.perf_counter()
            scan_bench.build_model(root, SHAPE, args.layers, torch.device("cpu"), full_ft=True,
                                   dtype=torch.float32)
            report["build_seconds"] = round(time.perf_counter() - t, 1)
        sizes = {k: sum(f.stat().st_size for f in (root / k).glob("*.safetensors")) for k in ("base", "full")}
        report["gb_on_disk"] = {k: round(v / 1e9, 2) for k, v in sizes.items()} | {
            "pair": round(sum(sizes.values()) / 1e9, 2)}
        print(f"pair on disk: {report['gb_on_disk']}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        argv = ["scan", str(root / "base"), str(root / "full"), "--device", "cpu", "--out", str(root / "scan")]
        report["lorascope_scan"] = run_child(CLI_SCRIPT, argv, env)
        print(f"lorascope scan: {json.dumps(report['lorascope_scan'])}", flush=True)
        if args.compare_mmap:
            pattern = r"layers\.(" + "|".join(str(i) for i in range(args.compare_mmap)) + r")\."
            mm = run_child(MMAP_SCRIPT, [str(root / "base"), str(root / "full"), pattern], env)
            report["mmap_streaming_first_layers"] = mm | {"layers": args.compare_mmap}
            print(f"mmap streaming path, {args.compare_mmap} layers: {json.dumps(mm)}", flush=True)
        peak = report["lorascope_scan"]["peak_rss_MB"]
        print(f"\npeak RSS {peak:.0f} MB while scanning a {report['gb_on_disk']['pair']} GB pair "
              f"({'met' if peak < 1536 else 'MISSED'}: target < 1536 MB)")
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
