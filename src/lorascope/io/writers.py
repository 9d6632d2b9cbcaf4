"""Atomic writers: nothing the user had is overwritten or left half-written.

Everything is written into a temporary sibling path and renamed into place at the end, so an
interrupted run leaves the destination untouched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorascope.errors import InputError


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    An existing ``out`` is refused unless ``overwrite`` is set. On error the temporary folder is
    removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a folder; choose another --out")
    with _os_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out)
        # the pid in the name lets a later run tell an abandoned folder from one being written
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        with _os_errors(out):
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)  # the user's folder goes back where it was
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def retarget_paths(tmp: Path, out: str | os.PathLike, names: tuple[str, ...] = ("scan.json", "mitigation.json",
                                                                              "run.json")) -> None:
    """Result files written inside ``atomic_dir``'s temporary folder name their inputs and outputs
    where they will be: ``tmp``'s path (as given and resolved) becomes ``out``'s in every ``names`` file."""
    pairs = [(str(tmp.resolve()), str(Path(out).resolve())), (str(tmp), str(out))]
    for name in names:
        for f in sorted(tmp.rglob(name)):
            text = f.read_text(encoding="utf-8")
            new = text
            for old, final in pairs:
                new = new.replace(json.dumps(old)[1:-1], json.dumps(final)[1:-1])
            if new != text:
                atomic_write_text(f, new)


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """A failed write (read-only folder, full disk, a file in the way) is the user's to fix: an
    InputError naming the path and the reason, not a traceback."""
    try:
        yield
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from e


def _remove_abandoned(out: Path) -> None:
    """Delete the temporary siblings (``.OUT.tmp-PID-…``, ``.OUT.old-PID``) that an interrupted run of
    a process no longer alive left behind; those of a live process are being written and stay."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        rest = p.name[len(out.name) + 2:]
        kind, _, tail = rest.partition("-")
        pid = tail.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True



def guard_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], inside_ok: bool = False) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs (``inputs``:
    what the user calls it → path), so that writing or ``--overwrite`` can never touch the user's data.
    ``inside_ok``: a new file may go inside an input folder (a report beside the results it draws)."""
    o = Path(out).expanduser().resolve()
    for role, p in inputs.items():
        if p is None or str(p).startswith("<") or not Path(p).expanduser().exists():
            continue  # in-memory sources, hub ids and built-in task names are not the user's files
        p = Path(p).expanduser().resolve()
        if o == p or o in p.parents or (p in o.parents and not inside_ok):
            where = "is" if o == p else "contains" if o in p.parents else "lies inside"
            raise InputError(f"--out {out} {where} the {role} input {p}; choose a folder outside the inputs")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename, so that readers never
    see half a file and an interrupted write leaves ``path`` as it was."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file; choose another output path")
    with _os_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_files(folder: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Write several files into ``folder`` together: each is staged as a temporary sibling first, and
    only when all are on disk are they renamed into place, so a full disk or a kill leaves either the
    old files or the new ones (renames need no space). A folder made here is removed on failure."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder; choose another --out")
    made = not folder.exists()
    staged: list[tuple[str, Path]] = []
    try:
        with _os_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
                staged.append((tmp, folder / name))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o666 & ~_umask())
            for tmp, dest in staged:
                os.replace(tmp, dest)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return [dest for _, dest in staged]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def folder_labels(specs: list[str], fallback: str = "input") -> list[str]:
    """A unique output folder name per input path: its own name, or its run's when it is a run's
    ``adapter/`` or ``model/``; repeats get ``-2``, ``-3``, …"""
    labels: list[str] = []
    for spec in specs:
        p = Path(str(spec).rstrip("/"))
        name = p.parent.name if p.name in ("adapter", "model") and p.parent.name else p.stem or fallback
        label, n = name, 2
        while label in labels:
            label, n = f"{name}-{n}", n + 1
        labels.append(label)
    return labels
