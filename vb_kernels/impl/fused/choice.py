"""Which backward build a call takes: ``split`` (a Q-major dQ pass and a KV-major dK/dV pass, 7
matmuls: the build that has run on a GPU with its gradients checked) or ``fused`` (one KV-major
pass that also adds dQ, 5 matmuls), and ``auto``, the rule between them.

The choice is made per call, in this order: the ``bwd_build=`` keyword of
:func:`vb_kernels.videobooth_attention`, the innermost :func:`backward_build` block (as
``torch.nn.attention.sdpa_kernel`` selects SDPA backends), the ``VB_BWD`` environment variable,
else ``auto``. It is read when the forward runs and kept for that call's backward, which autograd
usually runs outside the block. No torch or triton import here: the public API reads it.
"""
from __future__ import annotations

import contextlib
import functools
import os

BWD_BUILDS = ("auto", "split", "fused")

# ``auto`` takes the fused build only where a committed GPU result shows it correct and faster:
# device class (a substring of torch.cuda.get_device_name) -> (widest head dim, as chunks, the
# result holds for; the file). Empty: no GPU has run the fused build yet, so ``auto`` is the split
# pair everywhere. `python -m bench.gpu_run` writes bench/results/<device>/bwd_builds.md.
FUSED_VERIFIED: dict = {}

_scoped: list = []  # the active backward_build() blocks' builds, innermost last (a plain module
# global, not a ContextVar: torch.compile reads it while tracing)


def check_build(build, name: str) -> str:
    """``build`` if it names a build, else a ValueError naming ``name`` and the choices."""
    if build not in BWD_BUILDS:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, BWD_BUILDS))}, got {build!r}")
    return build


@contextlib.contextmanager
def backward_build(build: str):
    """Within the block, calls of the fused op whose ``bwd_build`` is not given take ``build``
    (one of ``"auto"``, ``"split"``, ``"fused"``) for their backward, whenever that runs::

        with vb_kernels.backward_build("fused"):
            loss = model(x).sum()   # the attention calls made here
        loss.backward()             # run the fused backward
    """
    _scoped.append(check_build(build, "backward_build"))
    try:
        yield
    finally:
        _scoped.pop()


def requested_build(bwd_build: str | None = None) -> str:
    """The build a call asks for: the keyword, the innermost block, ``VB_BWD``, else ``auto``."""
    if bwd_build is not None:
        return check_build(bwd_build, "bwd_build")
    if _scoped:
        return _scoped[-1]
    return check_build(os.environ.get("VB_BWD", "auto"), "VB_BWD")


def fused_verified(width: int, arch: int | None, device_name: str | None) -> str | None:
    """The committed result that lets ``auto`` take the fused build for a head dim whose chunks
    are ``width`` wide on this device (compute capability x10 ``arch``, ``device_name`` as CUDA
    gives it; None: the interpreter or a planned target), or None: then ``auto`` is split."""
    if arch is None or arch < 90 or device_name is None:
        return None
    for cls, (widest, evidence) in FUSED_VERIFIED.items():
        if cls in device_name and width <= widest:
            return evidence
    return None


@functools.lru_cache(maxsize=16)
def device_name(device) -> str | None:
    """torch.cuda.get_device_name of a CUDA device, None elsewhere."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(device)
