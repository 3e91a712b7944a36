"""Fused forward: one multi-source online-softmax kernel, launched once per phase.

A launch computes, for every query row i of a :class:`kernels.schedule.Plan` (a frame's queries)
and every distinct source of that row (the image tokens, or a reference frame read ``count``
times), softmax attention over the concatenation of the sources' keys, without building it:
each source's K/V tiles are read in place from the caller's tensors (image tokens from
``k_img``/``v_img``; frame r's keys from ``k``; its values from ``v``, or from the refreshed
keyframe values U when r is a keyframe). Phase 1 writes only U (keyframes); phase 2 reads it.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .launch import launch, tiles_for_cuda
from .primitives import LN2, LOG2E, attend_source, load_pair, store_pair


@triton.jit
def _fwd_kernel(
    Q, K, V, U, KI, VI, O, LSE,
    row_qframe, n_src, src_frame, src_vslot, src_logw,
    stride_qb, stride_qf, stride_qn, stride_qh,
    stride_kb, stride_kf, stride_kn, stride_kh,
    stride_vb, stride_vf, stride_vn, stride_vh,
    stride_ub, stride_uf, stride_un, stride_uh,
    stride_kib, stride_kim, stride_kih,
    stride_vib, stride_vim, stride_vih,
    stride_ob, stride_of, stride_on, stride_oh,
    stride_lb, stride_lf, stride_ln,
    H, N, M, S_MAX, qk_scale,
    HAS_IMG: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # int64 batch/frame/head offsets: B*F*N*H*D may exceed 2**31 elements.
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    i_qf = tl.load(row_qframe + i_row).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)

    p_q = Q + i_b * stride_qb + i_qf * stride_qf + i_h * stride_qh
    b_q0, b_q1 = load_pair(p_q, o_m, stride_qn, N, HEAD_DIM, D0, D1, SPLIT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)  # unused (and removed) without SPLIT

    o_tab = i_row * S_MAX
    i_first = 0
    if HAS_IMG:  # the plan puts the image source first in the rows that read it
        if tl.load(src_frame + o_tab) < 0:
            acc0, acc1, l_i, m_i = attend_source(
                acc0, acc1, l_i, m_i, b_q0, b_q1,
                KI + i_b * stride_kib + i_h * stride_kih, VI + i_b * stride_vib + i_h * stride_vih,
                stride_kim, stride_vim, M, 0.0, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT)
            i_first = 1
    for i_s in range(i_first, tl.load(n_src + i_row)):
        i_src = tl.load(src_frame + o_tab + i_s).to(tl.int64)
        i_slot = tl.load(src_vslot + o_tab + i_s).to(tl.int64)
        bias = tl.load(src_logw + o_tab + i_s) * LOG2E
        p_k = K + i_b * stride_kb + i_src * stride_kf + i_h * stride_kh
        if i_slot < 0:  # values of a plain frame
            acc0, acc1, l_i, m_i = attend_source(
                acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, V + i_b * stride_vb + i_src * stride_vf + i_h * stride_vh,
                stride_kn, stride_vn, N, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT)
        else:  # a keyframe: its values were refreshed by phase 1
            acc0, acc1, l_i, m_i = attend_source(
                acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, U + i_b * stride_ub + i_slot * stride_uf + i_h * stride_uh,
                stride_kn, stride_un, N, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT)

    # A row with no keys (rejected at the door, guarded anyway) gives zeros and lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_pair(O + i_b * stride_ob + i_r64 * stride_of + i_h * stride_oh, acc0 / l_safe[:, None],
               acc1 / l_safe[:, None], o_m, stride_on, N, HEAD_DIM, D0, D1, SPLIT, False)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    # LSE is allocated (B, rows, N, H) contiguous: its head stride is 1.
    tl.store(LSE + i_b * stride_lb + i_r64 * stride_lf + o_m * stride_ln + i_h, lse, mask=o_m < N)


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(D0, D1): the head dim as one power-of-two chunk (D1 = 0), or two (DESIGN.md section 4:
    40 = 32 + 16, 72 = 64 + 16 with 8 masked, 80 = 64 + 16, 160 = 128 + 32) where that wastes
    fewer FLOPs than padding to the next power of two. Chunks are >= 16 (the MMA K minimum)."""
    pad = max(16, triton.next_power_of_2(head_dim))
    d0 = 1 << (head_dim.bit_length() - 1)
    if d0 == head_dim or d0 < 16:
        return pad, 0
    d1 = max(16, triton.next_power_of_2(head_dim - d0))
    return (d0, d1) if d0 + d1 < pad else (pad, 0)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (pass, bytes per element, head-dim width bucket).
# Sized from `python -m kernels.impl.fused.aot` on sm_90 (shared memory under the H100's 227 KiB,
# wgmma for 16-bit types, no or few spill bytes); not yet timed on a GPU: tune there. fp32 tiles
# hold twice the bytes, so they are smaller. The dq kernel uses the "bwd" tiles transposed.
_TILES = {
    ("fwd", 2, 64): (128, 64, 8, 3), ("fwd", 2, 128): (128, 64, 8, 2), ("fwd", 2, 256): (128, 32, 8, 2),
    ("fwd", 4, 64): (64, 64, 4, 2), ("fwd", 4, 128): (64, 32, 4, 2), ("fwd", 4, 256): (16, 32, 4, 1),
    ("bwd", 2, 64): (64, 64, 8, 2), ("bwd", 2, 128): (32, 64, 8, 2), ("bwd", 2, 256): (32, 64, 8, 2),
    ("bwd", 4, 64): (32, 32, 4, 2), ("bwd", 4, 128): (16, 32, 4, 1), ("bwd", 4, 256): (16, 32, 4, 1),
}


def block_config(head_dim: int, device: torch.device, kernel: str = "fwd",
                 n_queries: int | None = None, n_keys: int | None = None, elem_bytes: int = 2) -> dict:
    """Launch constants of ``kernel`` ("fwd", "dq" or "dkv"): head-dim chunks (D0, D1, SPLIT;
    masked, never copied), tiles, warps. The dq kernel takes the backward tiles transposed, so
    the MMA's M side (64 for Hopper's wgmma) is the dimension each kernel owns: queries for dq,
    keys for dK/dV.

    On CUDA the tiles shrink to the sequence (the U-Net's 16- and 64-token levels would leave
    most of a 128-row tile masked). ``VB_BLOCK_M``/``VB_BLOCK_N`` override the tiles (tests force
    other tilings on CPU)."""
    d0, d1 = split_head_dim(head_dim)
    cfg = dict(D0=d0, D1=max(d1, 16), SPLIT=d1 > 0)  # D1 is a placeholder size without SPLIT
    width = d0 + d1
    if os.environ.get("VB_BLOCK_M"):
        block_m = int(os.environ["VB_BLOCK_M"])
        block_n = int(os.environ.get("VB_BLOCK_N", block_m))
        if any(x < 16 or x & (x - 1) for x in (block_m, block_n)):
            raise ValueError(f"VB_BLOCK_M/VB_BLOCK_N: expected powers of two >= 16, got {block_m}, {block_n}")
        tiles = (block_m, block_n, 4, 1)
    elif not tiles_for_cuda(device):  # interpreter: small tiles so odd N crosses several blocks
        tiles = (16, 16, 1, 1)
    else:
        bucket = 64 if width <= 64 else 128 if width <= 128 else 256
        tiles = _TILES[("fwd" if kernel == "fwd" else "bwd", 4 if elem_bytes >= 4 else 2, bucket)]
        if kernel == "dq":
            tiles = (tiles[1], tiles[0], *tiles[2:])
    block_m, block_n, num_warps, num_stages = tiles
    if tiles_for_cuda(device) and not os.environ.get("VB_BLOCK_M"):
        if n_queries is not None:
            block_m = min(block_m, max(16, triton.next_power_of_2(n_queries)))
        if n_keys is not None:
            block_n = min(block_n, max(16, triton.next_power_of_2(n_keys)))
        if (block_m, block_n) != tiles[:2]:  # shrunk to a short sequence: no idle warps
            num_warps = min(num_warps, max(1, max(block_m, block_n) // 16))
    cfg.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return cfg


def _strides(t: torch.Tensor | None, n: int):
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def attention_fwd(q, k, v, u, k_img, v_img, out, lse, tables: dict, scale: float) -> None:
    """Launch one phase: for every row i of ``tables`` write ``out[:, i]`` and ``lse[:, i]``.

    q, k, v: (B, F, N, H, D); u: (B, K, N, H, D) refreshed keyframe values or None;
    k_img, v_img: (B, M, H, D) or None; out: (B, rows, N, H, D); lse: (B, rows, N, H) float32.
    """
    b, _, n, h, d = q.shape
    rows = tables["row_qframe"].numel()
    m = 0 if k_img is None else k_img.shape[1]
    cfg = block_config(d, q.device, "fwd", n_queries=n, n_keys=max(n, m), elem_bytes=q.element_size())
    assert lse.stride(-1) == 1, "the kernel writes the LSE with head stride 1"
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * h, rows)
    dummy = q  # never dereferenced: HAS_IMG=False / no keyframe slot in the table
    launch(
        _fwd_kernel, grid, q, k, v, u if u is not None else dummy, k_img if m else dummy, v_img if m else dummy, out, lse,
        tables["row_qframe"], tables["n_src"], tables["src_frame"], tables["src_vslot"], tables["src_logw"],
        *_strides(q, 4), *_strides(k, 4), *_strides(v, 4), *_strides(u, 4),
        *_strides(k_img, 3), *_strides(v_img, 3), *_strides(out, 4), *lse.stride()[:3],
        h, n, m, tables["n_src_max"], scale * math.log2(math.e),
        HAS_IMG=m > 0, HEAD_DIM=d, **cfg,
    )
