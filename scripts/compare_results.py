"""Compare the result files (scan.json, mitigation.json, tracking.jsonl) of two test-suite runs.

    python -m pytest -m "not slow" --basetemp=/tmp/before    # on the old commit
    python -m pytest -m "not slow" --basetemp=/tmp/after     # on the new one
    python scripts/compare_results.py /tmp/before /tmp/after [ROOT_THE_FIRST_RUN_WAS_WRITTEN_UNDER]

Files are paired by their path under the base folder (pytest names it after the test). Fields that
record when, how fast or by which command a result was made (created, timing, command, versions,
scan_seconds) are left out, and each run's base folder is replaced by a placeholder in the paths
that results quote. Run both suites with the same --basetemp path (move the first run's folder aside
before the second): experiment unit ids hash the model path. Everything else must be equal, number
for number. Exit 1 on any difference.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

VOLATILE = {"created", "timing", "command", "versions", "scan_seconds", "seconds", "wall_time_s"}
NAMES = ("scan.json", "mitigation.json", "tracking.jsonl")


_TMP = re.compile(r"\.([\w.-]+)\.tmp-[\w]+")  # atomic_dir's temporary sibling names are random


def normalise(obj, root: str):
    if isinstance(obj, dict):
        return {k: normalise(v, root) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [normalise(v, root) for v in obj]
    if isinstance(obj, str):
        return _TMP.sub(r".\1.tmp-<random>", obj.replace(root, "<base>"))
    return obj


def read(path: Path, root: str):
    if path.suffix == ".jsonl":
        return [normalise(json.loads(line), root) for line in path.read_text().splitlines() if line.strip()]
    return normalise(json.loads(path.read_text()), root)


def first_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: only in {'after' if k not in a else 'before'}"
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def main(before: str, after: str, before_root: str | None = None) -> int:
    """``before_root``: where the first run's files were written, when they have been moved since."""
    b, a = Path(before), Path(after)
    files = lambda root: {p.relative_to(root) for n in NAMES for p in root.rglob(n)}  # noqa: E731
    fb, fa = files(b), files(a)
    same, differ = 0, []
    for rel in sorted(fb & fa):
        d = first_difference(read(b / rel, before_root or str(b.resolve())), read(a / rel, str(a.resolve())))
        if d:
            differ.append(f"{rel}{d}")
        else:
            same += 1
    print(f"{len(fb & fa)} result files in both runs: {same} identical, {len(differ)} different")
    for line in differ:
        print("  DIFFERENT", line)
    for rel in sorted(fb - fa):
        print("  only before:", rel)
    for rel in sorted(fa - fb):
        print("  only after:", rel)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
