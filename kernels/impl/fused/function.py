"""Host side of the fused op: the two phases, the autograd Function, the public entry."""
from __future__ import annotations

import torch

from ...profiling import nvtx_range
from ...schedule import Schedule
from .forward import attention_fwd

# Every buffer the fused path allocates goes through this one function, so tests can poison
# outputs (fill with NaN) and audit that nothing but out/lse/U/lse1 is ever allocated.
_alloc = torch.empty


def fused_fwd(q, k, v, k_img, v_img, schedule: Schedule, scale: float):
    """Both phases. Returns (out (B,F,N,H,D), lse (B,F,N,H) fp32, u (B,K,N,H,D) or None,
    lse1 (B,K,N,H) or None), K = number of keyframes. Only U is written between the phases."""
    b, n_frames, n, h, d = q.shape
    phase1, phase2 = schedule.plan(k_img is not None)
    u = lse1 = None
    if phase1.rows:
        n_key = len(phase1.rows)
        u = _alloc((b, n_key, n, h, d), dtype=q.dtype, device=q.device)
        lse1 = _alloc((b, n_key, n, h), dtype=torch.float32, device=q.device)
        with nvtx_range("vb.phase1.refresh"):
            attention_fwd(q, k, v, None, k_img, v_img, u, lse1, phase1.tables(q.device), scale)
    out = _alloc((b, n_frames, n, h, d), dtype=q.dtype, device=q.device)
    lse = _alloc((b, n_frames, n, h), dtype=torch.float32, device=q.device)
    with nvtx_range("vb.phase2.cross_frame"):
        attention_fwd(q, k, v, u, k_img, v_img, out, lse, phase2.tables(q.device), scale)
    return out, lse, u, lse1


def fused_attention(q, k, v, k_img, v_img, schedule: Schedule, scale: float):
    """(out, lse) of the fused op; inputs validated by :func:`kernels.videobooth_attention`."""
    out, lse, _, _ = fused_fwd(q, k, v, k_img, v_img, schedule, scale)
    return out, lse
