"""What a user waits for before any work starts: `lorascope --help` and `import lorascope`, each in a
new process, wall clock, median of N; optionally beside another checkout's source (e.g. an older commit).

    python benchmarks/startup_bench.py [--repeat 5] [--baseline-src /path/to/old/checkout/src] [--out startup.json]

`--baseline-src` runs the same commands with that folder first on PYTHONPATH, interleaved with the
current code's runs so that both see the same machine load, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "lorascope --help": [sys.executable, "-m", "lorascope", "--help"],
    "lorascope scan --help": [sys.executable, "-m", "lorascope", "scan", "--help"],
    "import lorascope": [sys.executable, "-c", "import lorascope"],
}


def once(cmd: list[str], src: str | None) -> float:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline-src", help="another checkout's src/ folder, timed beside this one")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    sides = {"current": here} | ({"baseline": args.baseline_src} if args.baseline_src else {})
    rows = {}
    for name, cmd in CASES.items():
        times: dict[str, list[float]] = {s: [] for s in sides}
        for src in sides.values():
            once(cmd, src)  # warm the page cache and .pyc files: what a second call sees
        for _ in range(args.repeat):
            for s, src in sides.items():  # interleaved: both sides see the same load
                times[s].append(once(cmd, src))
        rows[name] = {s: round(statistics.median(v), 3) for s, v in times.items()}
        line = f"{name:24s} current {rows[name]['current']:.2f} s"
        if "baseline" in rows[name]:
            rows[name]["ratio"] = round(rows[name]["baseline"] / rows[name]["current"], 2)
            line += f"   baseline {rows[name]['baseline']:.2f} s   baseline/current {rows[name]['ratio']:.1f}x"
        print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                        "repeat": args.repeat, "median_seconds": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
