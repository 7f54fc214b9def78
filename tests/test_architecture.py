"""The package's shape: the import-layer contracts of pyproject.toml hold, no import cycles, modules stay small."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("nbhelpers", "data_prep")


def import_cycles(*packages: str) -> list[list[str]]:
    """Groups of modules that import each other in a ring, function-level imports included
    (Tarjan's strongly connected components over grimp's import graph)."""
    graph = grimp.build_graph(*packages, exclude_type_checking_imports=True)
    edges = {m: graph.find_modules_directly_imported_by(m) & graph.modules for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            ring = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                ring.append(n)
                if n == m:
                    break
            if len(ring) > 1:
                out.append(sorted(ring))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(edges):
        if m not in index:
            visit(m)
    return out


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def lint(config: Path, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"})


def test_the_layer_contracts_hold():
    result = lint(ROOT / "pyproject.toml", ROOT, ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_the_layer_contract_fails_on_an_upward_import(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "", "pkg/top/__init__.py": "", "pkg/top/a.py": "X = 1\n",
        "pkg/bottom/__init__.py": "",
        "pkg/bottom/b.py": "def f():\n    from pkg.top.a import X  # a function-level upward import\n    return X\n",
    })
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""\
        [tool.importlinter]
        root_packages = ["pkg"]
        [[tool.importlinter.contracts]]
        name = "layers"
        type = "layers"
        layers = ["pkg.top", "pkg.bottom"]
    """))
    result = lint(config, tmp_path, tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout


def test_no_import_cycles():
    assert import_cycles(*PACKAGES) == []


def test_the_cycle_check_finds_a_ring(tmp_path, monkeypatch):
    write_package(tmp_path, {
        "ringpkg/__init__.py": "",
        "ringpkg/a.py": "from ringpkg import b\n",
        "ringpkg/b.py": "def f():\n    from ringpkg import c\n",
        "ringpkg/c.py": "import ringpkg.a\n",
        "ringpkg/d.py": "from ringpkg import a\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("ringpkg") == [["ringpkg.a", "ringpkg.b", "ringpkg.c"]]


#: Longest module allowed (the aim is ~400 lines: one job per module).
MAX_MODULE_LINES = 450


def long_modules(root: Path, packages: tuple[str, ...] = PACKAGES, limit: int = MAX_MODULE_LINES) -> list[str]:
    """Modules of ``packages`` under ``root`` longer than ``limit`` lines, with their length."""
    return [f"{path.relative_to(root)}: {n} lines" for package in packages for path in sorted((root / package).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > limit]


def test_no_module_is_longer_than_the_limit():
    assert long_modules(ROOT) == []


def test_the_size_check_finds_a_long_module(tmp_path):
    write_package(tmp_path, {"nbhelpers/short.py": "x = 1\n", "nbhelpers/long.py": "x = 1\n" * (MAX_MODULE_LINES + 1)})
    assert long_modules(tmp_path, ("nbhelpers",)) == [f"nbhelpers/long.py: {MAX_MODULE_LINES + 1} lines"]
