"""The one place where the fused host code launches a Triton kernel.

Going through :func:`launch` lets two tools see every launch without a GPU:
- the real-launch compile report (:mod:`vb_kernels.impl.fused.aot`) records each kernel with its
  actual arguments and compiles it for sm_90 the way Triton specialises a real call;
- the host-overhead benchmark replaces the launch by a no-op, so only host work is timed.

:func:`cuda_tiles` makes the host code choose the tiles and the backward build of a CUDA launch
(for a given compute capability) for tensors that live on the CPU (the report builds real-size
arguments in host memory).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from typing import Any, Callable

_hook: Callable | None = None
_cuda_arch = 0  # inside cuda_tiles(): the compute capability x10 the host code plans for


_debug: dict = {}  # inside debug_constants(): constexprs given to every kernel that takes them


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or the installed hook's ``hook(kernel, grid, args, kwargs)``."""
    if _debug:
        kwargs.update((name, value) for name, value in _debug.items() if name in kernel.arg_names)
    if _hook is not None:
        _hook(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of a cached host plan: everything but the call's tensors.

    ``operands``: (argument name, operand name) pairs: the argument is the call's operand of
    that name (a tensor with its strides, ``(tensor, strides)``, the kernels' operand form, see
    ``primitives.frame_at``; or a tuple of such), built once per call by the plan. ``args``: the
    other runtime arguments by name (scalars, tuples, the schedule's tables); ``consts``:
    constexprs and launch options. A plan is a few of these, computed once per input signature."""
    kernel: Any
    grid: tuple
    operands: tuple
    args: dict
    consts: dict

    def __post_init__(self):
        # the call's positional arguments, in the kernel's order up to the last one given, with
        # the operands' places left to fill (names are resolved once here, not per call), and
        # the launch options (num_warps, num_stages) apart
        names = list(self.kernel.arg_names)
        given = {**self.args, **self.consts, **{name: None for name, _ in self.operands}}
        last = max(names.index(name) for name in given if name in names)
        missing = [name for name in names[:last + 1] if name not in given]
        if missing:
            raise ValueError(f"Launch of {self.kernel.__name__}: arguments {missing} not given")
        template = [given[name] for name in names[:last + 1]]
        slots = tuple((names.index(name), key) for name, key in self.operands)
        options = {name: value for name, value in self.consts.items() if name not in names}
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_options", options)

    def __call__(self, ops: dict) -> None:
        args = self._template.copy()
        for i, key in self._slots:
            args[i] = ops[key]
        launch(self.kernel, self.grid, *args, **self._options)


@contextlib.contextmanager
def intercept(hook: Callable):
    """Within the block, every launch calls ``hook(kernel, grid, args, kwargs)`` instead."""
    global _hook
    old, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = old


DEBUG_CONSTANTS = ("POLL_LIMIT", "STALL_NS")


@contextlib.contextmanager
def debug_constants(**consts):
    """Within the block, launches of kernels that take these constexprs get them: ``POLL_LIMIT``
    (polls before the ordered dQ wait traps; default 2^28) and ``STALL_NS`` (the last warp of
    each block sleeps that long before it polls; default 0). A test build for the GPU smoke and
    stress tests (each value is its own binary); nothing else uses them."""
    global _debug
    bad = sorted(set(consts) - set(DEBUG_CONSTANTS))
    if bad:
        raise ValueError(f"debug_constants: expected names among {DEBUG_CONSTANTS}, got {bad}")
    for name, value in consts.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 31:
            raise ValueError(f"debug_constants: {name} expected an int in [0, 2^31), got {value!r}")
    old, _debug = _debug, {**_debug, **consts}
    try:
        yield
    finally:
        _debug = old


@contextlib.contextmanager
def cuda_tiles(arch: int = 90):
    """Within the block, the host code plans (tiles, backward build) as for a CUDA launch on
    ``sm_<arch>`` whatever the tensors' device."""
    global _cuda_arch
    old, _cuda_arch = _cuda_arch, arch
    try:
        yield
    finally:
        _cuda_arch = old


_interpreting = None


def interpreting() -> bool:
    """Whether the kernels run through Triton's CPU interpreter: Triton reads TRITON_INTERPRET
    once, when the kernels are defined (their first use), so this reads it once too (into a
    module global, not functools.lru_cache: torch.compile traces the callers)."""
    global _interpreting
    if _interpreting is None:
        _interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return _interpreting


def _major_minor(version: str) -> tuple:
    return tuple(int(re.match(r"\d+", part).group()) for part in version.split(".")[:2])


def check_interpreter(triton_version: str, numpy_version: str) -> None:
    """Raise RuntimeError where Triton's interpreter cannot run these kernels: triton <= 3.6 turns
    a loop bound into a Python int from a one-element array, which numpy >= 2.4 refuses (every
    kernel with a runtime loop fails with "only 0-dimensional arrays can be converted to Python
    scalars"; seen with triton 3.6.0 and numpy 2.4.6; numpy 2.3.5 and triton 3.7.1 work)."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        raise RuntimeError(f"TRITON_INTERPRET=1: triton {triton_version}'s interpreter cannot run the kernels with "
                           f"numpy {numpy_version} (it converts one-element arrays to Python ints, which numpy >= "
                           f"2.4 refuses); install numpy<2.4 or triton>=3.7")


def tiles_for_cuda(device) -> bool:
    """Whether a launch on ``device`` takes the CUDA tiles (always inside :func:`cuda_tiles`)."""
    return bool(_cuda_arch) or device.type == "cuda"


def target_arch(device) -> int | None:
    """The compute capability x10 a launch on ``device`` is planned for: the GPU's, the one of
    :func:`cuda_tiles` for a tensor elsewhere, or None (the interpreter)."""
    if device.type == "cuda":
        return _capability(device)
    return _cuda_arch or None


@functools.lru_cache(maxsize=16)
def _capability(device) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
