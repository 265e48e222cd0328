"""The package's shape: no import cycles, and low-level modules never import the commands.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too:
a lazy import is still a dependency. The layers (docs/architecture.md):

- commands: ``train, evaluate, predict, export, inspection, report, cv, lrfind, template, cli`` and
  the façades ``api``, ``__main__`` and the package itself (``semodel/__init__.py``), which reach
  the commands;
- everything else is low level (files, runtime, preprocess, data, models, checkpoint, ...) and may
  import only other low-level modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "semodel"
COMMANDS = {
    "train",
    "evaluate",
    "predict",
    "export",
    "inspection",
    "report",
    "cv",
    "lrfind",
    "template",
    "cli",
    "api",
    "__main__",
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)  # `from pkg import x` runs pkg/__init__.py, whatever x is
            found |= {f"{base}.{alias.name}" for alias in node.names}  # x may be a module
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_names(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_command(module: str, package: str) -> bool:
    return module == package or module.removeprefix(f"{package}.") in COMMANDS


def layer_violations(graph: dict[str, set[str]], package: str) -> list[str]:
    """``low -> command`` edges: a low-level module importing a command (or the package façade)."""
    return sorted(
        f"{m} imports {d}"
        for m, deps in graph.items()
        if not is_command(m, package)
        for d in deps
        if is_command(d, package)
    )


def test_no_import_cycles():
    assert cycles(import_graph(PACKAGE)) == []


def test_low_level_modules_do_not_import_commands():
    graph = import_graph(PACKAGE)
    assert layer_violations(graph, "semodel") == []
    # The check sees the package: the commands exist and import the low-level modules.
    assert {"semodel.checkpoint", "semodel.runtime"} <= graph["semodel.train"]
    assert "semodel.preprocess" in graph["semodel.predict"]


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "def f():\n    from pkg.a import x\n"},
            [["pkg.a", "pkg.b"]],
        ),
        (
            {
                "__init__.py": "",
                "a.py": "import pkg.sub.c\n",
                "sub/__init__.py": "",
                "sub/c.py": "from ..a import y\n",
            },
            [["pkg.a", "pkg.sub.c"]],
        ),
        ({"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "import os\n"}, []),
    ],
)
def test_the_cycle_check_finds_cycles(tmp_path, files, expected):
    """The checker itself: a cycle through a lazy import or a relative one is found; none is invented."""
    assert cycles(import_graph(write_package(tmp_path, files))) == expected


def test_the_layer_check_finds_a_low_level_module_importing_a_command(tmp_path):
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "files.py": "def f():\n    from pkg.train import fit\n",
            "train.py": "import pkg.files\n",
        },
    )
    assert layer_violations(import_graph(package), "pkg") == ["pkg.files imports pkg.train"]
