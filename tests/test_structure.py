"""The house's shape, checked on the source itself: no function past 120 lines, no module reaching for
another's private name, no import circle (function-local imports included), every command resolvable.

Each check is an AST walk over src/llm_neo; a planted violation below proves each one can fail."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "llm_neo"
MAX_FUNCTION_LINES = 120


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve_from(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a `from X import ...` names, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    # A package's own relative imports start from the package; a module's from its parent.
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, tree: ast.Module, is_package: bool) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import anywhere in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, node, is_package)
            for alias in node.names:
                yield target, alias.name, node.lineno


def long_functions(modules: dict[str, ast.Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{name}.{node.name}: {lines} lines")
    return found


def private_imports(modules: dict[str, ast.Module], packages: set[str]) -> list[str]:
    """`from llm_neo.x import _name` where _name is private to x: a module may use its own privates and
    a package may re-export its submodules' (its __init__ is part of it), nobody else may."""
    found = []
    for name, tree in modules.items():
        for target, imported, line in _imports(name, tree, name in packages):
            if not target.startswith("llm_neo") or imported is None:
                continue
            if imported.startswith("_") and not imported.startswith("__") and target != name:
                if f"{target}.{imported}" in modules:  # a private submodule imported as a module
                    continue
                if name in packages and target.startswith(name + "."):
                    continue
                found.append(f"{name}:{line} imports {target}.{imported}")
    return found


def import_graph(modules: dict[str, ast.Module], packages: set[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for target, imported, _ in _imports(name, tree, name in packages):
            if imported is not None and f"{target}.{imported}" in modules:
                target = f"{target}.{imported}"  # `from pkg import submodule`
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]], packages: set[str]) -> list[list[str]]:
    """Circles between modules. A package's __init__ importing its own submodules (and them importing
    siblings through it) is how Python packages are built, not a circle between rooms, so edges into a
    package from inside it and out of a package into its own members are left out."""

    def edges(node: str) -> set[str]:
        return {
            t
            for t in graph[node]
            if not (t in packages and node.startswith(t + "."))
            and not (node in packages and t.startswith(node + "."))
        }

    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            strongconnect(node)
    return cycles


def _packages() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("__init__.py")}


def test_no_function_is_longer_than_120_lines():
    assert long_functions(_modules()) == []


def test_no_module_imports_another_modules_private_name():
    assert private_imports(_modules(), _packages()) == []


def test_no_import_circle_even_through_function_local_imports():
    assert import_cycles(import_graph(_modules(), _packages()), _packages()) == []


def test_every_command_resolves_to_its_config_and_its_runner():
    from llm_neo.cli import COMMANDS

    for name, spec in COMMANDS.items():
        for target in (spec.config, spec.run):
            module, _, attr = target.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), f"{name}: {target}"


# The checks above pass on the tree; these prove each one would catch what it is for.


def test_the_checks_catch_planted_violations():
    planted = {
        "llm_neo.a": ast.parse(
            "from llm_neo.b import _secret\ndef f():\n" + "    x = 1\n" * 130 + "    from llm_neo import c\n"
        ),
        "llm_neo.b": ast.parse("_secret = 1\nimport llm_neo.c\n"),
        "llm_neo.c": ast.parse("def g():\n    from llm_neo.a import f\n"),
        "llm_neo": ast.parse(""),
    }
    assert long_functions(planted) == ["llm_neo.a.f: 132 lines"]
    assert private_imports(planted, {"llm_neo"}) == ["llm_neo.a:1 imports llm_neo.b._secret"]
    assert import_cycles(import_graph(planted, {"llm_neo"}), {"llm_neo"}) == [
        ["llm_neo.a", "llm_neo.b", "llm_neo.c"]
    ]


@pytest.mark.parametrize(
    "relative", [("from . import x", "llm_neo.pkg.x"), ("from .. import y", "llm_neo.y")]
)
def test_relative_imports_resolve_from_the_module(relative):
    source, expected = relative
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ImportFrom)
    target = _resolve_from("llm_neo.pkg.mod", node, is_package=False)
    assert f"{target}.{node.names[0].name}" == expected
