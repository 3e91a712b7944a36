"""FlexAttention baseline: one call per phase over a concatenated K/V with a block mask.

Keys are [K_img; K_0 .. K_{F-1}] (one concat, no per-frame repeat); phase 1 refreshes the
keyframes' values with a first call, phase 2 reads a materialised W table (V with the keyframes'
rows replaced by U). Duplicated references (the original's [0, 0]) are expressed exactly by a
``score_mod`` adding log(count). Every schedule of :class:`vb_kernels.Schedule` is expressible.
On CUDA the call goes through ``torch.compile`` (FlexAttention is slow and memory-hungry eager).
"""
from __future__ import annotations

import functools
import torch
from torch.nn.attention import flex_attention as _fa

from ..schedule import Schedule


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(_fa.flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, score_mod, scale, want_lse):
    """q: (B, Lq, H, D), k/v: (B, Lk, H, D). Returns (out (B, Lq, H, D), lse (B, Lq, H) or None)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    fn = _compiled_flex() if q.is_cuda else _fa.flex_attention
    kwargs = {}
    if want_lse:
        kwargs = ({"return_aux": _fa.AuxRequest(lse=True)} if hasattr(_fa, "AuxRequest")
                  else {"return_lse": True})
    res = fn(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale, **kwargs)
    if not want_lse:
        return res.transpose(1, 2), None
    out, aux = res
    lse = aux.lse if hasattr(aux, "lse") else aux
    return out.transpose(1, 2), lse.transpose(1, 2).float()


@functools.lru_cache(maxsize=64)
def _masks(schedule: Schedule, n: int, m: int, device: torch.device):
    """Block masks (phase 1, phase 2), the score_mod and keyframe ids of a schedule at a size:
    built once and reused, as a user of FlexAttention would (building them costs a kernel)."""
    n_frames = schedule.num_frames
    phase1, phase2 = schedule.plan(m > 0)
    kv_len = m + n_frames * n
    refresh = None
    kf = torch.tensor([frame for frame, _ in phase1.rows], device=device, dtype=torch.long)
    if phase1.rows:
        def refresh_mask(b_, h_, q_idx, kv_idx):
            own = (kv_idx >= m) & ((kv_idx - m) // n == kf[q_idx // n])
            return own | (kv_idx < m)

        refresh = _fa.create_block_mask(refresh_mask, None, None, len(kf) * n, kv_len, device=device)

    # Phase 2: count[f, r] = how many times frame f reads frame r (duplicates counted).
    count = torch.zeros(n_frames, n_frames, dtype=torch.float32)
    for frame, sources in phase2.rows:
        for s in sources:
            if s.frame >= 0:
                count[frame, s.frame] = s.count
    img_keys = bool(m) and schedule.image_everywhere
    present = (count > 0).to(device)
    logc = count.clamp(min=1).log().to(device)

    def cross_mask(b_, h_, q_idx, kv_idx):
        frame_key = present[q_idx // n, (kv_idx - m).clamp(min=0) // n] & (kv_idx >= m)
        return frame_key | ((kv_idx < m) & img_keys)

    def count_bias(score, b_, h_, q_idx, kv_idx):
        bias = logc[q_idx // n, (kv_idx - m).clamp(min=0) // n]
        return score + torch.where(kv_idx >= m, bias, 0.0)

    # a reference read c times is attended once with a log(c) bias; none: no score_mod at all
    score_mod = count_bias if bool((count > 1).any()) else None

    cross = _fa.create_block_mask(cross_mask, None, None, n_frames * n, kv_len, device=device)
    return refresh, cross, score_mod, kf


def flex_attention_vb(q, k, v, k_img, v_img, schedule: Schedule, scale: float, return_lse: bool):
    """Shapes as :func:`vb_kernels.videobooth_attention`; inputs already validated."""
    b, n_frames, n, h, d = q.shape
    m = 0 if k_img is None else k_img.shape[1]
    refresh, cross, score_mod, kf = _masks(schedule, n, m, q.device)
    kcat = k.reshape(b, n_frames * n, h, d)
    if m:
        kcat = torch.cat([k_img, kcat], 1)

    w = v
    if refresh is not None:
        vcat = v.reshape(b, n_frames * n, h, d)
        vcat = torch.cat([v_img, vcat], 1) if m else vcat
        u, _ = _flex(q[:, kf].flatten(1, 2), kcat, vcat, refresh, None, scale, False)
        w = v.index_copy(1, kf, u.view(b, len(kf), n, h, d))

    vcat = w.reshape(b, n_frames * n, h, d)
    vcat = torch.cat([v_img, vcat], 1) if m else vcat
    out, lse = _flex(q.flatten(1, 2), kcat, vcat, cross, score_mod, scale, return_lse)
    out = out.view(b, n_frames, n, h, d)
    return (out, lse.view(b, n_frames, n, h)) if return_lse else out
