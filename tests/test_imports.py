"""The package's modules form layers: each imports only modules below it.

Every ``import`` statement counts, those inside functions included (a function-level import
hides a cycle from Python but not from a reader: both modules then have to be understood
together). The package's ``__init__`` is the top and may name any module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import neusub

PACKAGE_DIR = Path(neusub.__file__).parent


def _module_names() -> dict[str, Path]:
    """``{"neusub.layers": path, "neusub.cli": path/__init__.py, ...}``."""
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(module: str, path: Path, modules: dict[str, Path], source: str | None = None) -> set[str]:
    """The package's modules that ``module`` (at ``path``) imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from . import fusion` imports the module neusub.fusion, `from .x import f` neusub.x
            found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
    return {name for name in found if name in modules and name != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_scanner_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    modules = _module_names()
    hidden = "import torch\n\ndef f():\n    from .deploy import deploy\n    from . import fusion\n"
    imported = _imported("neusub.x", PACKAGE_DIR / "x.py", modules, source=hidden)
    assert imported == {"neusub.deploy", "neusub.fusion"}
    assert _imported("neusub.cli.x", PACKAGE_DIR / "cli" / "x.py", modules, "from ..layers import R") == {
        "neusub.layers"
    }


def test_the_package_has_no_import_cycle():
    modules = _module_names()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 20 and graph["neusub.convert"]  # the scan saw the package
    assert _cycles(graph) == []
