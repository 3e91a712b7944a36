"""The oracle: VideoBooth cross-frame attention the literal way the original code does it.

Every frame's keys are a physical ``torch.cat`` of the image tokens and of its reference frames
(the anchor frame is repeated once per frame by indexing), values likewise, then plain softmax
attention in the input dtype. It is the float64 oracle of every test and the "naive concat"
baseline of every benchmark. Nothing here is clever on purpose.
"""
from __future__ import annotations

import torch

from ..schedule import Schedule


def _attend(q, k, v, scale, key_mask=None):
    """softmax(scale * q k^T) v over the token axis. q: (B, G, N, H, D), k/v: (B, G, L, H, D),
    key_mask: (G, L) bool (True = key present). Returns (out (B, G, N, H, D), lse (B, G, N, H))."""
    scores = torch.einsum("bgnhd,bglhd->bghnl", q, k) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[None, :, None, None, :], float("-inf"))
    # at least fp32, fp64 for the float64 oracle; returned as fp32 (the op's contract)
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).float()
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bghnl,bglhd->bgnhd", probs, v)
    return out, lse.permute(0, 1, 3, 2)


def reference_attention(q, k, v, k_img, v_img, schedule: Schedule, scale: float, return_lse: bool):
    """Shapes as :func:`vb_kernels.videobooth_attention`; inputs already validated."""
    b, n_frames, n, h, d = q.shape
    has_img = k_img is not None and k_img.shape[1] > 0
    refs = torch.tensor(schedule.refs, device=q.device)  # (F, R)
    keyframes = list(schedule.keyframes)

    # Phase 1: U_u = softmax(s Q_u [K_img; K_u]^T) [V_img; V_u] for every keyframe u.
    w = v
    if keyframes:
        kf = torch.tensor(keyframes, device=q.device)
        k1, v1 = k[:, kf], v[:, kf]
        if has_img:
            rep = (-1, len(keyframes), -1, -1, -1)
            k1 = torch.cat([k_img[:, None].expand(rep), k1], dim=2)
            v1 = torch.cat([v_img[:, None].expand(rep), v1], dim=2)
        u, _ = _attend(q[:, kf], k1, v1, scale)
        w = v.index_copy(1, kf, u)  # W_r = U_r for keyframes, V_r otherwise

    # Phase 2: keys of frame f are [K_img if image_everywhere; K_r for r in refs[f]], literally
    # gathered (the anchor repeated per frame) and concatenated; -1 slots are masked out.
    idx = refs.clamp(min=0)  # (F, R)
    k2 = k[:, idx].flatten(2, 3)  # (B, F, R*N, H, D)
    v2 = w[:, idx].flatten(2, 3)
    mask = (refs >= 0).repeat_interleave(n, dim=1)  # (F, R*N)
    if schedule.image_everywhere and has_img:
        m = k_img.shape[1]
        rep = (-1, n_frames, -1, -1, -1)
        k2 = torch.cat([k_img[:, None].expand(rep), k2], dim=2)
        v2 = torch.cat([v_img[:, None].expand(rep), v2], dim=2)
        mask = torch.cat([mask.new_ones(n_frames, m), mask], dim=1)
    has_empty_slot = any(r < 0 for row in schedule.refs for r in row)
    out, lse = _attend(q, k2, v2, scale, mask if has_empty_slot else None)
    return (out, lse) if return_lse else out
