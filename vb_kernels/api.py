"""Public entry of the VideoBooth cross-frame attention op: validation at the door, dispatch.

Backends (DESIGN.md section 2): ``reference`` (literal concat, the oracle), ``sdpa`` (concat
once per distinct reference set + PyTorch SDPA), ``flex`` (FlexAttention with a block mask),
``triton`` (the fused kernels), ``auto`` (triton where it runs compiled, i.e. on CUDA, else sdpa).
"""
from __future__ import annotations

import math
import numbers

import torch

from .impl.fused.choice import check_build
from .impl.fused.launch import check_interpreter, interpreting
from .schedule import Schedule

BACKENDS = ("auto", "reference", "sdpa", "flex", "triton")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_runs_here(device: torch.device) -> bool:
    """True where the Triton kernels run: compiled on CUDA, or through the CPU interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float16,
                    last_dim_contiguous: bool = True) -> str:
    """``auto``: triton where it runs compiled and takes the inputs (CUDA, fp16/bf16/fp32, last
    dim contiguous), else sdpa."""
    if backend == "auto":
        fused_ok = device.type == "cuda" and dtype != torch.float64 and last_dim_contiguous
        return "triton" if fused_ok else "sdpa"
    return backend


def videobooth_attention(q, k, v, k_img=None, v_img=None, *, schedule: Schedule | None = None,
                         scale: float | None = None, backend: str = "auto", return_lse: bool = False,
                         deterministic: bool = True, bwd_build: str | None = None):
    """VideoBooth cross-frame attention with image-prompt value refresh (DESIGN.md section 2).

    Phase 1 (keyframes u): U_u = softmax(s Q_u [K_img; K_u]^T) [V_img; V_u].
    Phase 2 (every frame f): out_f = softmax(s Q_f K'_f^T) V'_f with K'_f the concatenation of
    the image keys (if ``schedule.image_everywhere``) and of K_r for r in refs[f], and V'_f
    likewise with W_r = U_r for keyframes, V_r otherwise.

    Args:
        q, k, v: (B, F, N, H, D) frame tensors, "BFNHD" layout (a diffusers processor's
            ``to_q(x).view(B, F, N, H, D)``); strided views allowed, last dim contiguous.
            dtype float16, bfloat16, float32 (float64 for reference/sdpa/flex).
            D a multiple of 8 in [16, 256].
        k_img, v_img: (B, M, H, D) image-prompt tokens, or both None. M may differ from N;
            M = 0 is the same as no image.
        schedule: :class:`Schedule` with ``num_frames == F``; None = ``Schedule.videobooth(F)``.
        scale: softmax scale s; None = 1/sqrt(D).
        backend: one of ``auto``, ``reference``, ``sdpa``, ``flex``, ``triton``.
        return_lse: also return the phase-2 log-sum-exp.
        deterministic: for the triton backend's fused backward build: dQ's contributions are
            added in a fixed order (the same bits every run; the default). False: atomic adds,
            as FlashAttention's default backward: a little faster, and dQ may differ in its
            last bits from run to run (dK, dV and the image gradients stay deterministic either
            way). The split build is deterministic either way. Other backends: PyTorch's own
            (see ``torch.use_deterministic_algorithms``).
        bwd_build: the triton backend's backward build for this call: ``"split"`` (a dQ pass
            and a dK/dV pass, 7 matmuls: the build that has run on a GPU), ``"fused"`` (one
            pass, 5 matmuls, dQ added across key blocks) or ``"auto"`` (split, until a committed
            GPU result shows the fused build correct and faster at the head dim on the device
            class). None: the innermost ``vb_kernels.backward_build(...)`` block, else the
            ``VB_BWD`` environment variable, else ``auto``. Fixed when the forward runs.
            Ignored by the other backends.

    Returns:
        out: (B, F, N, H, D), dtype of q. With ``return_lse``: (out, lse), lse (B, F, N, H)
        float32 (the triton backend's is a view of (B, H, F, N) memory: ``.contiguous()``
        before ``.view``), natural log, of the scaled scores of each query row over its keys (a
        duplicated reference counts twice, as in the literal concat). Both are differentiable
        on every backend, so partial attentions can be merged through the LSE in training.
    """
    schedule, scale, k_img, v_img = _validate_inputs(q, k, v, k_img, v_img, schedule, scale, backend)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    if bwd_build is not None:
        check_build(bwd_build, "bwd_build")
    if backend == "auto":
        tensors = [t for t in (q, k, v, k_img, v_img) if t is not None]
        backend = resolve_backend(backend, q.device, q.dtype, all(t.stride(-1) == 1 for t in tensors))
    if backend == "reference":
        from .impl.reference import reference_attention
        return reference_attention(q, k, v, k_img, v_img, schedule, scale, return_lse)
    if backend == "sdpa":
        from .impl.sdpa import sdpa_attention
        return sdpa_attention(q, k, v, k_img, v_img, schedule, scale, return_lse)
    if backend == "flex":
        from .impl.flex import flex_attention_vb
        return flex_attention_vb(q, k, v, k_img, v_img, schedule, scale, return_lse)
    if q.dtype == torch.float64:
        raise TypeError("q: backend 'triton' expects float16, bfloat16 or float32, got torch.float64")
    if not triton_runs_here(q.device):
        raise RuntimeError(
            f"backend 'triton' needs a CUDA device or the Triton interpreter on CPU "
            f"(set TRITON_INTERPRET=1 before triton is imported); q is on {q.device}")
    if q.shape[0] * q.shape[3] > 65535:  # B*H is the launch grid's y dimension
        raise ValueError(f"q: backend 'triton' expects B*H <= 65535, got B={q.shape[0]}, H={q.shape[3]}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_img", k_img), ("v_img", v_img)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: backend 'triton' expects the last dim contiguous (stride 1), "
                             f"got strides {tuple(t.stride())}")
    out, lse = _fused()(q, k, v, k_img, v_img, schedule, scale, lse_grad=return_lse, deterministic=deterministic,
                        bwd_build=bwd_build)
    return (out, lse) if return_lse else out


_FUSED = None
_DEFAULT_SCHEDULES: dict = {}  # F -> Schedule.videobooth(F), the default of a call


def _fused():
    # imported at first use (triton and the kernels load only for this backend), then one lookup;
    # a module global rather than functools.lru_cache, which torch.compile warns about when it
    # traces a model calling the op
    global _FUSED
    if _FUSED is None:
        if interpreting():
            import numpy
            import triton

            check_interpreter(triton.__version__, numpy.__version__)
        from .impl.fused.function import fused_attention
        _FUSED = fused_attention
    return _FUSED


def _validate_inputs(q, k, v, k_img, v_img, schedule, scale, backend):
    """One check at the door; kernels assume valid input. Returns (schedule, scale, k_img, v_img)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name}: expected shape (B, F, N, H, D), got {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} (same as q), got {tuple(t.shape)}")
    b, n_frames, n, h, d = q.shape
    if min(b, n_frames, n, h) == 0:
        raise ValueError(f"q: expected a non-empty clip (B, F, N, H >= 1), got {tuple(q.shape)}")
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"q: expected head dim D a multiple of 8 in [16, 256], got D={d}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: expected dtype in {[str(t) for t in _DTYPES]}, got {q.dtype}")
    if (k_img is None) != (v_img is None):
        raise ValueError("k_img, v_img: expected both tensors or both None, got only "
                         + ("k_img" if v_img is None else "v_img"))
    tensors = [("k", k), ("v", v)]
    if k_img is not None:
        for name, t in (("k_img", k_img), ("v_img", v_img)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != b or t.shape[2] != h or t.shape[3] != d:
                raise ValueError(f"{name}: expected shape ({b}, M, {h}, {d}), got {tuple(t.shape)}")
        if v_img.shape != k_img.shape:
            raise ValueError(f"v_img: expected shape {tuple(k_img.shape)} (same as k_img), got {tuple(v_img.shape)}")
        tensors += [("k_img", k_img), ("v_img", v_img)]
    for name, t in tensors:
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
    if k_img is not None and k_img.shape[1] == 0:
        k_img = v_img = None  # M = 0 is no image
    if schedule is None:  # one per F (its device tables are kept on it)
        schedule = _DEFAULT_SCHEDULES.get(n_frames)
        if schedule is None:
            schedule = _DEFAULT_SCHEDULES.setdefault(n_frames, Schedule.videobooth(n_frames))
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a vb_kernels.Schedule or None, got {type(schedule).__name__}")
    if schedule.num_frames != n_frames:
        raise ValueError(f"schedule: expected a schedule of F={n_frames} frames (q.shape[1]), "
                         f"got {schedule.num_frames}")
    if not (schedule.image_everywhere and k_img is not None):
        empty = schedule.frames_without_refs()
        if empty:
            f = empty[0]
            raise ValueError(f"schedule: frame {f} has no keys (refs[{f}] is all -1 and no image "
                             f"tokens are prepended); expected at least one reference")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite float > 0 or None, got {scale!r}")
    return schedule, float(scale), k_img, v_img
