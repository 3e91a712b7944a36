"""vb_train/'s layout: the core never imports the toy experiments (vb_train/toy/); the toy task
is a test fixture, not in vb_train/. (Import cycles: tests/test_imports.py, every package.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "vb_train"


def _graph() -> dict:
    """tests/test_imports.py's reader (every import, function-level ones and importlib
    "package.module:name" strings too), over vb_train."""
    spec = importlib.util.spec_from_file_location("_test_imports", Path(__file__).with_name("test_imports.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.import_graph(ROOT, ("vb_train",), strings=True)


def test_the_core_never_imports_the_toy_experiments():
    """The core (vb_train/*.py) reads like a training example: no import of vb_train.toy, not
    even inside a function or as an importlib path; the toy experiments build on the core."""
    core = {p.stem for p in TRAIN.glob("*.py")} - {"__init__"}
    toy = {p.stem for p in (TRAIN / "toy").glob("*.py")} - {"__init__"}
    assert {"trainer", "config", "tasks", "registry", "videobooth_task", "checkpoint", "data", "metrics"} <= core
    assert {"synthetic", "experiment", "evaluation", "demo", "ablations", "ip_adapter", "probe"} <= toy
    assert not core & toy
    graph = _graph()
    for m in core:
        assert not {d for d in graph[f"vb_train.{m}"] if d.startswith("vb_train.toy")}, m
    assert "vb_train.toy.demo" not in graph["vb_train.toy.ablations"]
    # the reader sees an importlib path string (the study names the toy's swap by one)
    assert "vb_train.toy.synthetic" in graph["vb_train.toy.study"]
    assert "ema" not in core  # diffusers' EMAModel instead


def test_toy_task_lives_in_tests():
    assert "ToyVideoTask" not in (TRAIN / "tasks.py").read_text()
    assert (TRAIN.parent / "tests" / "toy_task.py").is_file()
