"""Helpers shared by tests/ and bench/: inputs for a named shape, the oracle comparison."""
from __future__ import annotations

import torch

# DESIGN.md section 3: ||out - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def make_inputs(b, f, n, h, d, m, *, dtype=torch.float32, device="cpu", strided=False,
                requires_grad=False, generator=None):
    """Random (q, k, v, k_img, v_img) in BFNHD / BMHD layout; k_img = v_img = None when m is None.

    ``strided=True`` returns views into wider buffers (as ``to_qkv(x).view(...).unbind``), so
    kernels must honour strides instead of assuming contiguity.
    """
    def rnd(*shape):
        if strided:  # a fused-projection-like buffer: every tensor is a view with padded strides
            big = torch.randn(*shape[:-1], 2 * shape[-1] + 8, generator=generator, dtype=torch.float32)
            t = big[..., 8:8 + shape[-1]]
        else:
            t = torch.randn(*shape, generator=generator, dtype=torch.float32)
        t = t.to(device=device, dtype=dtype)
        if strided and t.is_contiguous():  # .to() may have copied; keep a strided view
            t = torch.cat([t, t], -1)[..., : shape[-1]]
        return t.requires_grad_(requires_grad)

    q, k, v = rnd(b, f, n, h, d), rnd(b, f, n, h, d), rnd(b, f, n, h, d)
    if m is None:
        return q, k, v, None, None
    return q, k, v, rnd(b, m, h, d), rnd(b, m, h, d)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or Inf (NaN never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def upcast(*tensors):
    """float64 copies (None stays None), detached, for the oracle."""
    return tuple(None if t is None else t.detach().double() for t in tensors)


def saved_tensor_bytes(fn, *args, **kwargs) -> tuple[int, int]:
    """(bytes, count) of the distinct storages autograd saves for backward while ``fn`` runs.

    Works on ``device="meta"`` tensors (nothing is computed), so it measures what a backend
    keeps alive between forward and backward at full model size on any machine."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values()), len(seen)


def fused_saved_bytes(q, k, v, k_img, v_img, schedule, scale=None) -> tuple[int, int]:
    """:func:`saved_tensor_bytes` of the Triton backend's custom op; works on meta tensors
    (the op's fake implementation gives the shapes), where the public call would refuse."""
    from .impl.fused.function import _fused_fwd_op

    refs = [r for row in schedule.refs for r in row]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return saved_tensor_bytes(_fused_fwd_op, q, k, v, k_img, v_img, refs, schedule.num_refs,
                              list(schedule.keyframes), schedule.image_everywhere, scale)
