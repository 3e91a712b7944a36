"""No import cycle in the project's packages, read from the files: every import counts, at module
level or inside a function (a function-level import is how a cycle hides), and importing
``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, unless the importer is inside them."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vb", "vb_kernels", "vb_train", "bench")


def import_graph(root: Path, packages, strings: bool = False) -> dict:
    """module -> the project modules its file imports (with the packages that import runs);
    ``strings``: also ``"package.module:name"`` literals (what importlib loads: task and
    ``data.paired_transform`` paths)."""
    mods = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    edges = {m: set() for m in mods}
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.count(":") == 1 and node.value.split(":")[0] in mods:
                names = [node.value.split(":")[0]]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in mods and dep != mod and not mod.startswith(dep + "."):
                        edges[mod].add(dep)
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def test_no_import_cycle_in_the_project():
    edges = import_graph(ROOT, PACKAGES)
    assert len(edges) > 50 and edges["vb.pipeline"], "the graph is empty: the reader is broken"
    assert cycles(edges) == []


def test_the_reader_finds_a_cycle_through_a_function_level_import(tmp_path):
    """Positive control: the cycle vb had (official -> pipeline inside a function, pipeline ->
    official inside a method), and one through a package __init__."""
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("A = 1\ndef f():\n    from .b import B\n")
    (pkg / "b.py").write_text("from . import a\nB = 2\n")
    (pkg / "sub" / "__init__.py").write_text("from .conv import C\n")
    (pkg / "sub" / "conv.py").write_text("from ..c import X\nC = 3\n")
    (pkg / "sub" / "layers.py").write_text("L = 4\n")
    (pkg / "c.py").write_text("from .sub.layers import L\nX = 5\n")
    found = cycles(import_graph(tmp_path, ["p"]))
    assert ["p.a", "p.b"] in found
    assert ["p.c", "p.sub", "p.sub.conv"] in found


@pytest.mark.parametrize("module", ["vb.official.convert", "vb.official.layers", "vb.components"])
def test_each_module_imports_on_its_own(module):
    """Every module of the official wing imports first in a fresh interpreter (no order dependence)."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
