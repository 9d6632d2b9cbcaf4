"""Split a file into parts that fit one GPU call's carry (64 MiB in all), and join them back, checked.

    python scripts/carry_split.py split FILE DIR [--mib 60]   # DIR/NAME.partNN + DIR/NAME.manifest.json
    python scripts/carry_split.py join DIR/NAME.manifest.json OUT_FILE

The manifest holds the sha256 and size of the whole file and of each part. ``join`` checks every
part before it writes anything and the joined bytes before the output appears (written atomically),
so a missing, partial or damaged part is an error naming it, never a wrong model. Carry one part per
call (e.g. ``carry=[".carry/parts/NAME.part00", ".carry/parts/NAME.manifest.json"]``, then part01,
...): files carried earlier stay on a warm machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from lorascope.errors import InputError
from lorascope.io.writers import atomic_write_bytes, atomic_write_json

MIB = 1 << 20


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(file: Path, out: Path, mib: int = 60) -> Path:
    """Write ``out/NAME.partNN`` of at most ``mib`` MiB each and ``out/NAME.manifest.json``."""
    if not file.is_file():
        raise InputError(f"{file}: no such file")
    if not 0 < mib <= 60:
        raise InputError(f"--mib must be in 1..60 (one call carries 64 MiB in all), got {mib}")
    whole, parts = hashlib.sha256(), []
    with open(file, "rb") as f:
        while block := f.read(mib * MIB):
            whole.update(block)
            name = f"{file.name}.part{len(parts):02d}"
            atomic_write_bytes(out / name, block)
            parts.append({"file": name, "size": len(block), "sha256": _sha256(block)})
    manifest = out / f"{file.name}.manifest.json"
    atomic_write_json(manifest, {"name": file.name, "size": sum(p["size"] for p in parts),
                                 "sha256": whole.hexdigest(), "parts": parts})
    return manifest


def join(manifest: Path, out: Path) -> Path:
    """Check every part against the manifest, then write their concatenation to ``out``, checked."""
    try:
        m = json.loads(manifest.read_text())
        parts, size, sha = m["parts"], m["size"], m["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{manifest}: not a carry_split manifest ({e})") from e
    blocks = []
    for p in parts:
        path = manifest.parent / p["file"]
        if not path.is_file():
            raise InputError(f"{path}: part missing (carry it first)")
        data = path.read_bytes()
        if len(data) != p["size"] or _sha256(data) != p["sha256"]:
            raise InputError(f"{path}: {len(data)} bytes, sha256 {_sha256(data)}; the manifest says "
                             f"{p['size']} bytes, {p['sha256']} (a partial or damaged part)")
        blocks.append(data)
    data = b"".join(blocks)
    if len(data) != size or _sha256(data) != sha:
        raise InputError(f"{manifest}: the joined parts do not give sha256 {sha}")
    atomic_write_bytes(out, data)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("file", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--mib", type=int, default=60)
    j = sub.add_parser("join")
    j.add_argument("manifest", type=Path)
    j.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    try:
        print(split(a.file, a.out, a.mib) if a.cmd == "split" else join(a.manifest, a.out))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
