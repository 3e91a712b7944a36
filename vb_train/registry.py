"""Tasks by name: ``build_task(cfg)`` builds ``cfg.task``, a registered name (``videobooth``: the
real model, ``vb``, on the VideoBooth data layout, ``vb_train.data``) or any
``"package.module:factory"`` (the tests train a small VideoBooth-shaped toy task,
``tests.toy_task:ToyVideoTask``, that way). Its own module, so that the task base classes
(:mod:`vb_train.tasks`) never import a task that imports them."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Union

from .config import TrainConfig
from .tasks import TrainTask

# Names -> "module:factory": imported when used (the VideoBooth task pulls in vb and diffusers' models).
TASKS: Dict[str, Union[str, Callable[[TrainConfig], TrainTask]]] = {
    "videobooth": "vb_train.videobooth_task:VideoBoothTask"}


# The project's packages before they were renamed (PyPI's `train` and `kernels` own those names).
RENAMED = {"train": "vb_train", "kernels": "vb_kernels"}


def register_task(name: str, factory: Union[str, Callable[[TrainConfig], TrainTask]]) -> None:
    """Register a task factory (or its ``"package.module:factory"`` path) under ``name``."""
    TASKS[name] = factory


def import_object(spec: str, what: str):
    """``"package.module:name"`` -> the object; errors name the setting ``what``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"{what}: expected 'package.module:name', got {spec!r}")
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        hint = ""
        if mod.split(".")[0] in RENAMED:  # a config written before the packages were renamed
            hint = f"; the package is now {RENAMED[mod.split('.')[0]]!r}"
        raise ValueError(f"{what}: cannot import {spec!r} ({e}){hint}") from e


def _import_factory(spec: str):
    return import_object(spec, "task")


def build_task(cfg: TrainConfig) -> TrainTask:
    """The task ``cfg.task`` names: a registered name or ``"package.module:factory"``."""
    name = cfg.task
    if name in TASKS:
        factory = TASKS[name]
        factory = _import_factory(factory) if isinstance(factory, str) else factory
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise ValueError(f"task: expected one of {sorted(TASKS)} or 'package.module:factory', got {name!r}")
    task = factory(cfg)
    if not isinstance(task, TrainTask):
        raise TypeError(f"task: {name!r} built a {type(task).__name__}, expected a vb_train.tasks.TrainTask")
    return task
