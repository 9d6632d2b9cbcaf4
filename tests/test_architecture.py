"""The house rules of docs/architecture.md, checked from the source: imports point one way, and the
light entry points (``import lorascope``, ``lorascope --help``) load neither torch nor transformers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "lorascope"

# Each module's layer (longest matching prefix wins). An import must go to a lower layer, or stay in
# its own package; docs/architecture.md draws the same picture.
LAYERS = {
    "lorascope.errors": 0,
    "lorascope.io.writers": 1, "lorascope.runtime": 1, "lorascope.risk": 1, "lorascope.progress": 1,
    "lorascope.settings": 1,
    "lorascope.schema": 2, "lorascope.scanning.options": 2,
    "lorascope.spectral": 3, "lorascope.report": 3, "lorascope.check": 3,
    "lorascope.io": 4, "lorascope.data": 4,
    "lorascope.scanning": 5, "lorascope.models": 5,
    "lorascope.mitigation": 6, "lorascope.evaluate": 6,
    "lorascope.train": 7, "lorascope.merging": 7,
    "lorascope.experiments": 8,
    "lorascope.demo": 9,
    "lorascope.cli": 10, "lorascope.__main__": 11, "lorascope": 11,
}
REPORT_MAY_IMPORT = ("lorascope.report", "lorascope.schema", "lorascope.errors", "lorascope.io.writers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """lorascope modules imported anywhere in the file (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lorascope"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("lorascope"):
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    out.discard(name)
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def _package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_point_one_way():
    wrong = []
    for a, targets in _graph().items():
        for b in targets:
            if _package(a) == _package(b) or b == "lorascope":
                continue
            if _layer(a) <= _layer(b):
                wrong.append(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_report_reads_only_the_schema():
    for a, targets in _graph().items():
        if a.startswith("lorascope.report"):
            bad = [b for b in targets if not b.startswith(REPORT_MAY_IMPORT)]
            assert not bad, f"{a} imports {bad}"


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The checker itself: two modules that import each other are reported."""
    pkg = tmp_path / "lorascope"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lorascope import b\n")
    (pkg / "b.py").write_text("def f():\n    from lorascope.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    with pytest.raises(pytest.fail.Exception, match="lorascope.a -> lorascope.b -> lorascope.a"):
        test_no_import_cycle()


HEAVY = ("torch", "transformers", "peft", "safetensors")


@pytest.mark.parametrize("argv", [None, ["--help"], ["scan", "--help"], ["mitigate", "--help"], ["train", "--help"],
                                  ["evaluate", "--help"], ["report", "--help"], ["experiment", "run", "--help"],
                                  ["merge", "--help"]])
def test_light_entry_points_import_no_heavy_library(argv):
    code = "import sys, lorascope\n"
    if argv is not None:
        code += (f"from lorascope.cli import main\nsys.argv = ['lorascope', *{argv!r}]\n"
                 "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n")
    code += f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = [line for line in out.stdout.splitlines() if line.startswith("HEAVY:")]
    assert heavy == ["HEAVY:"], f"{argv}: imported {heavy}"


def test_lazy_exports_are_the_functions():
    import lorascope
    from lorascope.mitigation.api import mitigate
    from lorascope.scanning.api import scan

    assert lorascope.scan is scan and lorascope.mitigate is mitigate
    assert callable(lorascope.ScanOptions) and lorascope.ScanResult.__name__ == "ScanResult"
    with pytest.raises(AttributeError):
        lorascope.no_such_name  # noqa: B018
