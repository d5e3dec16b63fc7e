"""The top-level subpackages of lmmrl_megatron import each other without a cycle.

Every module is parsed (ast, nothing is imported) and each of its imports of another subpackage is an edge, wherever
the import sits: at module level or inside a function (a lazy import is still a dependency). Imports under
`if TYPE_CHECKING:` are left out: they never run and only name types for annotations. A cycle fails the test with
the packages in order and the module holding each edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmmrl_megatron"


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(tree: ast.AST, module: str) -> list[str]:
    """Absolute names of the modules `tree` imports, outside `if TYPE_CHECKING:` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def package_edges(root: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """subpackage -> {imported subpackage: the first module (relative path) that imports it}."""
    edges: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            continue  # lmmrl_megatron/__init__.py and other top-level modules belong to no subpackage
        source = rel.parts[0]
        module = ".".join(("lmmrl_megatron", *rel.with_suffix("").parts))
        for name in _imported_modules(ast.parse(path.read_text(), str(path)), module):
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "lmmrl_megatron" and parts[1] != source and (root / parts[1]).is_dir():
                edges.setdefault(source, {}).setdefault(parts[1], str(rel))
    return edges


def find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", path.append(node)
        for target in sorted(edges.get(node, {})):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_one() -> None:
    assert find_cycle({"a": {"b": "a/x.py"}, "b": {"c": "b/y.py"}, "c": {"a": "c/z.py"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "a/x.py"}, "b": {}, "c": {"a": "c/z.py"}}) is None


def test_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    for package, text in {
        "a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmmrl_megatron.b.m import X\n",
        "b": "def f():\n    from lmmrl_megatron.a import m\n",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text(text)
    assert package_edges(tmp_path) == {"b": {"a": "b/m.py"}}


def test_subpackages_import_each_other_without_a_cycle() -> None:
    edges = package_edges()
    assert {"models", "trainer"} <= set(edges), "the walk found too little: wrong package root?"
    cycle = find_cycle(edges)
    if cycle:
        steps = [f"{a} -> {b} ({edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between subpackages:\n  " + "\n  ".join(steps))
