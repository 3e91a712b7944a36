"""NVTX ranges for Nsight (``nsys profile``, ``ncu --nvtx --nvtx-include``).

Uses the ``nvtx`` package when it is installed and a CUDA device is present; a no-op otherwise,
so the kernels and the model can always call it.
"""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=1)
def _nvtx():
    if not torch.cuda.is_available():
        return None
    try:
        import nvtx  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return nvtx


_NOTHING = contextlib.nullcontext()  # stateless: one instance serves every range (host time per call)


def nvtx_range(name: str, color: str = "green"):
    """Context manager: a named NVTX range (domain "videobooth"), or nothing without nvtx/CUDA."""
    mod = _nvtx()
    if mod is None:
        return _NOTHING
    return mod.annotate(name, color=color, domain="videobooth")
