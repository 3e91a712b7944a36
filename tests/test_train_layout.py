"""vb_train/'s layout: the core never imports the toy experiments (vb_train/toy/); the toy task
is a test fixture, not in vb_train/. (Import cycles: tests/test_imports.py, every package.)"""
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


def test_the_core_never_imports_the_toy_experiments():
    """The core (vb_train/*.py) reads like a training example: no import of vb_train.toy, not
    even inside a function or as an importlib path; the toy experiments build on the core."""
    core = {p.stem for p in TRAIN.glob("*.py")} - {"__init__"}
    toy = {p.stem for p in (TRAIN / "toy").glob("*.py")} - {"__init__"}
    assert {"trainer", "config", "tasks", "registry", "videobooth_task", "checkpoint", "data", "metrics"} <= core
    assert {"synthetic", "experiment", "evaluation", "demo", "ablations", "ip_adapter", "probe"} <= toy
    assert not core & toy
    for m in core:
        assert "toy" not in _imports(TRAIN / f"{m}.py"), m
    toy_imports = {m: _imports(TRAIN / "toy" / f"{m}.py") for m in toy}
    assert "demo" not in toy_imports["ablations"]
    assert "ema" not in core  # diffusers' EMAModel instead


def test_toy_task_lives_in_tests():
    assert "ToyVideoTask" not in (TRAIN / "tasks.py").read_text()
    assert (TRAIN.parent / "tests" / "toy_task.py").is_file()
