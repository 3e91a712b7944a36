"""vb_train/'s layout: no module of vb_train/ imports one that imports it back (directly or through
others), counting imports inside functions too; the toy task is a test fixture, not in vb_train/."""
from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "vb_train"


def _imports(path: Path) -> set[str]:
    """vb_train modules that `path` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and (node.module == "vb_train" or node.module.startswith("vb_train.")):
                names = [node.module[len("vb_train."):]] if node.module != "vb_train" else [a.name for a in node.names]
            else:
                continue
            out.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vb_train."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("vb_train."):
            out.add(node.value.split(":")[0].split(".")[1])  # "vb_train.x:factory" strings (importlib)
    return out


def test_no_import_cycles_in_train():
    mods = {p.stem for p in TRAIN.glob("*.py")} - {"__init__"}
    graph = {m: _imports(TRAIN / f"{m}.py") & mods - {m} for m in mods}

    def reach(start):
        seen, stack = set(), [start]
        while stack:
            for n in graph[stack.pop()]:
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        return seen
    cycles = sorted(m for m in mods if m in reach(m))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}
    assert "ema" not in mods  # diffusers' EMAModel instead
    assert graph["ablations"] >= {"evaluation", "experiment"} and "demo" not in graph["ablations"]


def test_toy_task_lives_in_tests():
    assert "ToyVideoTask" not in (TRAIN / "tasks.py").read_text()
    assert (TRAIN.parent / "tests" / "toy_task.py").is_file()
