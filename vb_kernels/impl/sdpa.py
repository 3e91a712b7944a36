"""What a careful PyTorch user writes: K/V concatenated once per distinct reference set (frames
that share references share one K/V and run as one SDPA call), then
``torch.nn.functional.scaled_dot_product_attention``, which picks flash / efficient / cudnn /
math by itself (force one with ``torch.nn.attention.sdpa_kernel``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..schedule import Schedule


def _sdpa(q, k, v, scale):
    """q: (B, G, N, H, D) queries of G frames sharing keys k/v: (B, L, H, D). Returns
    (out (B, G, N, H, D), lse (B, G, N, H) float32 or None)."""
    b, g, n, h, d = q.shape
    qh = q.permute(0, 3, 1, 2, 4).reshape(b, h, g * n, d)
    out = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.reshape(b, h, g, n, d).permute(0, 2, 3, 1, 4)


def _lse(q, k, scale):
    # SDPA does not return the LSE; recompute it only when asked for (return_lse=True).
    dt = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bgnhd,blhd->bgnhl", q.to(dt), k.to(dt)) * scale
    return torch.logsumexp(s, dim=-1).float()


def sdpa_attention(q, k, v, k_img, v_img, schedule: Schedule, scale: float, return_lse: bool):
    """Shapes as :func:`vb_kernels.videobooth_attention`; inputs already validated."""
    has_img = k_img is not None
    phase1, phase2 = schedule.plan(has_img)
    # Phase 1: one SDPA per keyframe over [K_img; K_u].
    u = {}
    for slot, (frame, _) in enumerate(phase1.rows):
        kk, vv = k[:, frame], v[:, frame]
        if has_img:
            kk, vv = torch.cat([k_img, kk], 1), torch.cat([v_img, vv], 1)
        u[slot] = _sdpa(q[:, frame:frame + 1], kk, vv, scale)[:, 0]

    # Phase 2: group frames by their (distinct) key/value set; concat once per group.
    groups: dict[tuple, list[int]] = {}
    for frame, sources in phase2.rows:
        groups.setdefault(tuple((s.frame, s.value_slot, s.count) for s in sources), []).append(frame)
    outs, lses = [None] * q.shape[1], [None] * q.shape[1]
    for key, frames in groups.items():
        ks, vs = [], []
        # Exact shortcut: one source read c times attends once (softmax over [K; K] is softmax
        # over K); its LSE is log(c) higher. Mixed duplicates are concatenated literally.
        log_c = math.log(key[0][2]) if len(key) == 1 else 0.0
        if len(key) == 1:
            key = ((key[0][0], key[0][1], 1),)
        for src_frame, slot, count in key:
            if src_frame < 0:
                kk, vv = k_img, v_img
            else:
                kk, vv = k[:, src_frame], (u[slot] if slot >= 0 else v[:, src_frame])
            ks += [kk] * count  # a duplicated reference counts twice, as in the literal concat
            vs += [vv] * count
        kk = torch.cat(ks, 1) if len(ks) > 1 else ks[0]
        vv = torch.cat(vs, 1) if len(vs) > 1 else vs[0]
        idx = frames[0] if len(frames) == 1 else torch.tensor(frames, device=q.device)
        qg = q[:, idx:idx + 1] if len(frames) == 1 else q[:, idx]
        o = _sdpa(qg, kk, vv, scale)
        l = _lse(qg, kk, scale) + log_c if return_lse else None
        for i, f in enumerate(frames):
            outs[f] = o[:, i]
            lses[f] = None if l is None else l[:, i]
    out = torch.stack(outs, 1)
    return (out, torch.stack(lses, 1)) if return_lse else out
