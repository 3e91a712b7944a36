"""Bench backends: one attention callable per name, and why a row cannot run here.

Every callable has the op's signature, ``fn(q, k, v, k_img, v_img, *, schedule) -> out`` with
BFNHD frames and BMHD image tokens:

- ``reference``, ``sdpa``, ``flex``, ``triton``: :func:`vb_kernels.videobooth_attention` with that
  backend, the same entry the tests call. ``VB_BENCH_DQ=atomic`` makes the ``triton`` rows call it
  with ``deterministic=False`` (atomic dQ adds; it matters only with ``VB_BWD=fused``), so that
  ``bench.gpu_run`` can weigh what the fused backward's ordered adds cost (default: ``ordered``).
- ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``: the ``sdpa`` backend with PyTorch's SDPA
  forced to one kernel (``torch.nn.attention.sdpa_kernel``). The backward runs the kernel the
  forward chose. A kernel that refuses a shape or dtype makes the row skip, with PyTorch's reason.
- ``flash-attn``, ``xformers``: the very same concat-once baseline as ``sdpa`` (vb_kernels/impl/sdpa.py:
  K/V concatenated once per distinct reference set), with its attention primitive swapped for
  ``flash_attn_func`` / ``xformers.ops.memory_efficient_attention``. Only when importable.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from vb_kernels import videobooth_attention

from .shapes import CPU_BACKENDS, Row

Attention = Callable[..., torch.Tensor]


def _op(backend: str) -> Attention:
    return functools.partial(videobooth_attention, backend=backend)


def _triton() -> Attention:
    mode = os.environ.get("VB_BENCH_DQ", "ordered")
    if mode not in ("ordered", "atomic"):
        raise ValueError(f"VB_BENCH_DQ: expected 'ordered' or 'atomic', got {mode!r}")
    return functools.partial(videobooth_attention, backend="triton", deterministic=mode == "ordered")


def _forced_sdpa(kind: str) -> Attention:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]

    def fn(q, k, v, k_img=None, v_img=None, *, schedule=None):
        with sdpa_kernel(kernel):
            return videobooth_attention(q, k, v, k_img, v_img, schedule=schedule, backend="sdpa")
    return fn


def _flash_attn_primitive(q, k, v, scale):
    """vb_kernels.impl.sdpa._sdpa's contract with flash-attn: q (B, G, N, H, D) of G frames sharing
    k/v (B, L, H, D); flash-attn's layout is already (B, S, H, D), so no transpose."""
    from flash_attn import flash_attn_func

    b, g, n, h, d = q.shape
    return flash_attn_func(q.reshape(b, g * n, h, d), k, v, softmax_scale=scale).view(b, g, n, h, d)


def _xformers_primitive(q, k, v, scale):
    """As :func:`_flash_attn_primitive`, with xformers' memory-efficient attention (BMHK layout)."""
    import xformers.ops as xops

    b, g, n, h, d = q.shape
    out = xops.memory_efficient_attention(q.reshape(b, g * n, h, d), k, v, scale=scale)
    return out.view(b, g, n, h, d)


def _swapped_sdpa(primitive) -> Attention:
    # Patch the one function of vb_kernels/impl/sdpa.py that calls SDPA for the duration of the
    # call: the grouping, the phase-1 refresh and the duplicate shortcut stay the code the tests
    # check, so these rows differ from `sdpa` by the attention primitive alone. The autograd
    # graph records the primitive's own backward, so fwd+bwd needs no patch.
    from unittest import mock

    from vb_kernels.impl import sdpa as sdpa_impl

    def fn(q, k, v, k_img=None, v_img=None, *, schedule=None):
        with mock.patch.object(sdpa_impl, "_sdpa", primitive):
            return videobooth_attention(q, k, v, k_img, v_img, schedule=schedule, backend="sdpa")
    return fn


_FACTORIES: dict[str, Callable[[], Attention]] = {
    "reference": lambda: _op("reference"),
    "sdpa": lambda: _op("sdpa"),
    "sdpa-flash": lambda: _forced_sdpa("flash"),
    "sdpa-efficient": lambda: _forced_sdpa("efficient"),
    "sdpa-cudnn": lambda: _forced_sdpa("cudnn"),
    "flex": lambda: _op("flex"),
    "flash-attn": lambda: _swapped_sdpa(_flash_attn_primitive),
    "xformers": lambda: _swapped_sdpa(_xformers_primitive),
    "triton": _triton,
}
_PACKAGES = {"flash-attn": "flash_attn", "xformers": "xformers"}
NAMES = tuple(_FACTORIES)


def attention(name: str) -> Attention:
    """The attention callable of bench backend ``name`` (see the module docstring)."""
    return _FACTORIES[name]()


def skip_reason(row: Row, cuda: bool) -> str | None:
    """Why ``row`` cannot run on this machine (decided at collection), or None."""
    if not cuda:
        if not row.smoke:
            return f"GPU row (shape set {row.case.set}): a CPU machine runs the smoke set only"
        if row.backend not in CPU_BACKENDS:
            return f"{row.backend} needs a CUDA GPU"
        if row.backend == "flex" and row.mode != "fwd":
            return "FlexAttention has no backward on CPU (PyTorch raises NotImplementedError)"
    package = _PACKAGES.get(row.backend)
    if package and importlib.util.find_spec(package) is None:
        return f"{row.backend} is not installed here (pip install {row.backend}); its rows are optional"
    return None


def refuses_shape(backend: str, err: BaseException) -> str | None:
    """The skip reason when a forced SDPA kernel refuses a shape/dtype (device lacks it), else None."""
    # CUDA builds say "No available kernel", the CPU dispatcher "No viable backend".
    refused = any(m in str(err) for m in ("No available kernel", "No viable backend"))
    if backend.startswith("sdpa-") and isinstance(err, RuntimeError) and refused:
        return f"{backend}: PyTorch has no such kernel for this shape/dtype on this device ({str(err).splitlines()[0]})"
    return None
