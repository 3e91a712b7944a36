"""Fused backward: recomputes P from the saved LSE; two builds (:func:`bwd_spec`; which one a
call takes: :mod:`.choice`; ``auto`` is the split pair until a GPU result says otherwise).

The split build (7 matmuls, 2 exponentials per score, no atomics), per phase:
- ``_bwd_dq_kernel``: one program per (query block, batch*head, row) walks the row's sources as
  the forward does and owns its dQ block; it also writes Delta = rowsum(dO * O) for the dK/dV pass.
- ``_bwd_dkv_kernel``: one program per (key block, batch*head, target), where a target is a
  distinct key/value source (a frame, or the image tokens), walks the *inverse* table: every
  row that reads the target, in row order. Shared K/V (the anchor frame, the image tokens) get
  their gradient summed over all readers in registers, in a fixed order: same bits every run.
The fused build (5 matmuls, 1 exponential): ``_bwd_delta_kernel`` writes Delta, then
``_bwd_dkvq_kernel`` (the same per-target work, :func:`_dkv_target`, on the grouped launch order)
also adds each key tile's dQ contribution into fp32 partial slots (:func:`_dq_partial`: in
key-block order by :func:`_ordered_add`, or atomic), and ``_bwd_dq_reduce_kernel`` sums each
row's slots into dQ. The host side of a phase is a :class:`BwdPhase` (:func:`bwd_spec`).
Phase 2 runs first; its dV for a keyframe source is dU, the gradient of the refreshed values,
which is then the dO of phase 1. Phase 1 accumulates (load + add + store, never concurrently)
into dQ, dK, dV and the image gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from . import choice
from .forward import block_config, cdiv, dot_precision, launch_strides, operand_strides, split_head_dim, tile_override
from .launch import Launch, interpreting, target_arch, tiles_for_cuda
from .primitives import LOG2E, dot_pair, frame_at, image_at, load_pair, load_tile, store_pair, store_tile

# The widest head dim (as chunks) the fused pass compiles for without spills; auto never takes it wider.
FUSED_MAX_WIDTH = 64


@triton.jit
def _dq_step(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_shift, b_delta, p_k, p_v, stride_kn, stride_vn, L, start,
             qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             SPLIT: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """dQ contribution of keys [start, start + BLOCK_N) of a source (MASK: the tail tile)."""
    o_k = start + tl.arange(0, BLOCK_N)
    b_k0, b_k1 = load_pair(p_k, o_k, stride_kn, L, HEAD_DIM, D0, D1, SPLIT, MASK)
    b_v0, b_v1 = load_pair(p_v, o_k, stride_vn, L, HEAD_DIM, D0, D1, SPLIT, MASK)
    # P = exp2(s * qk_scale + bias - lse2): one FFMA per score, the row shift (lse2 - bias) hoisted
    b_p = tl.exp2(dot_pair(b_q0, b_q1, b_k0, b_k1, SPLIT, PREC) * qk_scale - b_shift[:, None])
    if MASK:
        b_p = tl.where((o_k < L)[None, :], b_p, 0.0)
    b_ds = b_p * (dot_pair(b_do0, b_do1, b_v0, b_v1, SPLIT, PREC) - b_delta[:, None])
    b_dq0 += tl.dot(b_ds.to(b_k0.dtype), b_k0, input_precision=PREC)
    if SPLIT:
        b_dq1 += tl.dot(b_ds.to(b_k1.dtype), b_k1, input_precision=PREC)
    return b_dq0, b_dq1


@triton.jit
def _dq_source(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta, p_k, p_v, stride_kn, stride_vn,
               L, bias, qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """dQ contribution of one source's L keys: sum_j dS_ij K_j (unscaled), by head-dim chunk.
    Full key tiles run unmasked; only the last, partial one is masked (as the forward)."""
    b_shift = b_lse2 - bias
    if HEAD_DIM <= 128:
        n_full = L // BLOCK_N * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            b_dq0, b_dq1 = _dq_step(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_shift, b_delta, p_k, p_v, stride_kn,
                                    stride_vn, L, start, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, False, PREC)
        for start in tl.range(n_full, L, BLOCK_N, num_stages=1):
            b_dq0, b_dq1 = _dq_step(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_shift, b_delta, p_k, p_v, stride_kn,
                                    stride_vn, L, start, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, True, PREC)
    else:  # one masked, pipelined loop: a second loop body pushes D = 160 past 255 registers
        for start in range(0, L, BLOCK_N):
            b_dq0, b_dq1 = _dq_step(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_shift, b_delta, p_k, p_v, stride_kn,
                                    stride_vn, L, start, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, True, PREC)
    return b_dq0, b_dq1


@triton.jit
def _row_stats(LSE, DLSE, DELTA, SHIFT, b_delta, o_l, o_s, o_m, N, N_PAD, n_src, p_logw, stride_ss,
               HAS_DLSE: tl.constexpr):
    """The row statistics the dK/dV pass reads, written by the phase's first kernel (dq or delta):
    Delta (rowsum(dO * O), 0 past N, minus the LSE's gradient: d lse_i / d s_ij = P_ij) and, for
    each of the row's ``n_src`` sources, the shift lse2 - bias (lse2 = lse * log2 e, +inf past N,
    so a padded query's P is exactly 0; bias = log2 of the source's multiplicity, ``p_logw``:
    the row's natural log-counts), token-contiguous and padded to whole query tiles (N_PAD), so
    that pass loads the shift for its (target, reader) pair with no mask, scaling or subtraction.
    ``o_l``: the rows' offsets in LSE / DLSE; ``o_s``: in DELTA / SHIFT (slot s at SHIFT +
    s * stride_ss). Returns Delta and lse2."""
    m_m = o_m < N
    m_s = o_m < N_PAD
    if HAS_DLSE:
        b_delta -= tl.load(DLSE + o_l, mask=m_m, other=0.0)
    b_lse2 = tl.load(LSE + o_l, mask=m_m, other=float("inf")) * LOG2E
    tl.store(DELTA + o_s, b_delta, mask=m_s)
    for i_s in range(0, n_src):
        tl.store(SHIFT + i_s * stride_ss + o_s, b_lse2 - tl.load(p_logw + i_s) * LOG2E, mask=m_s)
    return b_delta, b_lse2


@triton.jit
def _bwd_dq_kernel(
    q, k, v, u, k_img, v_img, do_o, lse, stats, dq, rows, dims, qk_scale, scale,
    HAS_IMG: tl.constexpr, HAS_DLSE: tl.constexpr, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """The split build's Q-major pass: dQ of one query block of one row, over all its sources
    (walked as the forward does), and the row statistics the dK/dV pass reads. Operands are
    (pointer, strides) (``primitives.frame_at``); ``do_o``: (dO, O, their strides); ``lse``:
    (LSE, its gradient or LSE, strides); ``stats``: (Delta, shifts, strides with the slot's last);
    ``rows``: (row_qframe, n_src, src_frame, src_vslot, src_logw); ``dims``: (H, N, N_PAD, M,
    S_MAX)."""
    row_qframe, n_src, src_frame, src_vslot, src_logw = rows
    H, N, N_PAD, M, S_MAX = dims
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    i_qf = tl.load(row_qframe + i_row).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)

    p_q, s_q = frame_at(q, i_b, i_qf, i_h, ALIGN)
    b_q0, b_q1 = load_pair(p_q, o_m, s_q, N, HEAD_DIM, D0, D1, SPLIT)
    DO, O, st_o = do_o
    o_o = (i_b * st_o[0] + i_r64 * st_o[1] + i_h * st_o[3]) * ALIGN
    b_do0, b_do1 = load_pair(DO + o_o, o_m, st_o[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
    b_o0, b_o1 = load_pair(O + o_o, o_m, st_o[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
    b_delta = tl.sum(b_do0.to(tl.float32) * b_o0.to(tl.float32), 1)
    if SPLIT:
        b_delta += tl.sum(b_do1.to(tl.float32) * b_o1.to(tl.float32), 1)
    o_tab = i_row * S_MAX
    LSE, DLSE, st_l = lse
    DELTA, SHIFT, st_s = stats
    b_delta, b_lse2 = _row_stats(LSE, DLSE, DELTA, SHIFT, b_delta,
                                 i_b * st_l[0] + i_r64 * st_l[1] + o_m * st_l[2] + i_h * st_l[3],
                                 i_b * st_s[0] + i_r64 * st_s[1] + o_m * st_s[2] + i_h * st_s[3],
                                 o_m, N, N_PAD, tl.load(n_src + i_row), src_logw + o_tab, st_s[4], HAS_DLSE)

    b_dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    b_dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    i_first = 0
    if HAS_IMG:
        if tl.load(src_frame + o_tab) < 0:
            p_k, s_k = image_at(k_img, i_b, i_h, ALIGN)
            p_v, s_v = image_at(v_img, i_b, i_h, ALIGN)
            b_dq0, b_dq1 = _dq_source(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta, p_k, p_v, s_k, s_v,
                                      M, 0.0, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
            i_first = 1
    for i_s in range(i_first, tl.load(n_src + i_row)):
        i_src = tl.load(src_frame + o_tab + i_s).to(tl.int64)
        i_slot = tl.load(src_vslot + o_tab + i_s).to(tl.int64)
        bias = tl.load(src_logw + o_tab + i_s) * LOG2E
        p_k, s_k = frame_at(k, i_b, i_src, i_h, ALIGN)
        if i_slot < 0:
            p_v, s_v = frame_at(v, i_b, i_src, i_h, ALIGN)
            b_dq0, b_dq1 = _dq_source(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta, p_k, p_v, s_k, s_v,
                                      N, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
        else:
            p_v, s_v = frame_at(u, i_b, i_slot, i_h, ALIGN)
            b_dq0, b_dq1 = _dq_source(b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta, p_k, p_v, s_k, s_v,
                                      N, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
    # ACCUMULATE: phase 1 after phase 2, the keyframe's queries were read by both.
    p_g, s_g = frame_at(dq, i_b, i_qf, i_h, ALIGN)
    store_pair(p_g, b_dq0 * scale, b_dq1 * scale, o_m, s_g, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)


@triton.jit
def _wait_count(p_sem, target, POLL_LIMIT: tl.constexpr):
    """Spin until the int32 at ``p_sem`` is at least ``target`` (acquire, GPU scope); returns it
    (:func:`_ordered_add` says why at least, not equal). After POLL_LIMIT polls (2^28 by
    default, each an L2 round trip, a few hundred ns to a microsecond: minutes; the GPU smoke
    test lowers it so a hang fails in seconds) it gives up and traps, a CUDA error the caller
    sees, rather than hang the process: a block that never comes is a bug, not a slow GPU. One
    inline-PTX op rather than a Triton while loop: a loop nested in the query-tile loop would
    stop Triton from software-pipelining that loop's loads (cp.async). The labels are local to
    the braces, so the op may be inlined more than once."""
    return tl.inline_asm_elementwise(
        """{
        .reg .pred p_wait;
        .reg .u32 n_poll;
        mov.u32 n_poll, 0;
        vb_wait_dq:
        ld.global.acquire.gpu.b32 $0, [$1];
        setp.ge.s32 p_wait, $0, $2;
        @p_wait bra vb_wait_done;
        add.u32 n_poll, n_poll, 1;
        setp.ge.u32 p_wait, n_poll, $3;
        @p_wait trap;
        bra vb_wait_dq;
        vb_wait_done:
        }""",
        "=r,l,r,n", [p_sem, target, POLL_LIMIT], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _stall_last_warp(THREADS: tl.constexpr, STALL_NS: tl.constexpr):
    """The last warp of the block sleeps about STALL_NS ns (``nanosleep``) before it polls, so
    the block's other warps pass the wait, add and release first: the schedule an equality wait
    would miss. For the GPU stress test only (``launch.debug_constants(STALL_NS=...)``)."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred p_late;
        setp.ge.u32 p_late, $1, $2;
        @p_late nanosleep.u32 $3;
        mov.u32 $0, 0;
        }""",
        "=r,r,n,n", [tl.arange(0, THREADS), THREADS - 32, STALL_NS], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ordered_add(p_sem, i_n, p, o_m, o_d0, o_d1, stride_row, b_x0, b_x1, m0, m1, D0: tl.constexpr,
                 SPLIT: tl.constexpr, INTERPRET: tl.constexpr, THREADS: tl.constexpr,
                 POLL_LIMIT: tl.constexpr, STALL_NS: tl.constexpr):
    """The ordered reduction of the fused backward: program ``i_n`` (a key block) of a chain adds
    its tile (chunks ``b_x0``, ``b_x1``; rows ``o_m``, columns ``o_d0`` / ``D0 + o_d1``, masks
    ``m0`` / ``m1``) into ``p`` after programs 0 .. i_n - 1 of the chain, so every element is a
    sum in key-block order: the same bits every run. Program 0 stores (no zero fill).

    Protocol, one int32 count per tile at ``p_sem`` (zeroed before the launch): each of the
    block's THREADS threads waits until the count is at least ``i_n`` x THREADS (acquire), adds,
    then counts one (release, GPU scope). Invariant: the count stays below (j + 1) x THREADS until
    every thread of block j has released, and no thread of a later block releases before that;
    so count >= i_n x THREADS holds exactly when blocks 0 .. i_n - 1 are done, whichever of block
    i_n's own warps released first. An equality wait would miss that (a warp that has released
    moves the count past a slower warp's target): tests/test_dq_order_protocol.py checks both
    rules in every interleaving. Forward progress: block i_n - 1's program comes earlier in the
    grid (the launch order), and the GPU dispatches a grid's blocks in order. Under the
    interpreter (one program at a time, in grid order) the count must already be ``i_n``:
    ``tl.assume`` checks it (the interpreter evaluates it always)."""
    if INTERPRET:
        seen = tl.atomic_add(p_sem, 0) // THREADS
        tl.assume(seen == i_n)
    else:
        if STALL_NS > 0:  # the GPU stress test's build: one warp of the block polls late
            _stall_last_warp(THREADS, STALL_NS)
        seen = _wait_count(p_sem, (i_n * THREADS).to(tl.int32), POLL_LIMIT) // THREADS
    # the tile's address depends on the count read (seen - i_n == 0), so no access to it can be
    # scheduled before the wait; times 4, so the base keeps its 16-byte alignment and the adds
    # stay 4-wide vectors
    p += (seen - i_n) * 4
    p0 = p + o_m[:, None] * stride_row + o_d0[None, :]
    # Masked twins on a uniform predicate, not an if/else (triton 3.6's software pipeliner fails
    # on that branch); the predicate is broadcast to the tile on purpose (scalar masks compiled
    # to more instructions: docs/kernels.md)
    first = (i_n == 0) & (o_m[:, None] >= 0)
    tl.store(p0, b_x0, mask=first & m0)
    tl.atomic_add(p0, b_x0, mask=~first & m0, sem="relaxed")
    if SPLIT:
        p1 = p + D0 + o_m[:, None] * stride_row + o_d1[None, :]
        tl.store(p1, b_x1, mask=first & m1)
        tl.atomic_add(p1, b_x1, mask=~first & m1, sem="relaxed")
    # every thread counts one for its own adds; no CTA barrier (it would stop the loop's software
    # pipelining); ptxas aggregates a warp's same-address adds into one (docs/kernels.md)
    tl.atomic_add(p_sem + tl.zeros([THREADS], tl.int32), 1, sem="release")


@triton.jit
def _dq_partial(dqp, b_dst, b_k0, b_k1, i_slot, i_b, i_h, i_bh, i_row, i_n, i_qt, o_m,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
                PREC: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERPRET: tl.constexpr,
                THREADS: tl.constexpr, DQ_WIDTH: tl.constexpr, POLL_LIMIT: tl.constexpr, STALL_NS: tl.constexpr):
    """This key tile's dQ contribution dS K (unscaled, fp32) to query tile ``i_qt`` of row
    ``i_row``, added into the row's partial slot ``i_slot`` (the slot of this target's source in
    the row's source list): the 5th matmul, with dS^T already in registers from dK.
    ``dqp``: (partials, semaphores, (slot, batch, row, token / 4) strides, rows, query tiles,
    batch*heads). DETERMINISTIC: in key-block order (:func:`_ordered_add`, one semaphore per
    (slot, batch*head, row, query tile)); else atomic adds into one zeroed slot (FA2's default,
    not bit-reproducible)."""
    DQP, SEM, st_p, n_rows, n_qt, n_bh = dqp
    b_ds = tl.trans(b_dst).to(b_k0.dtype)  # (BLOCK_M, BLOCK_N)
    b_dq0 = tl.dot(b_ds, b_k0, input_precision=PREC)
    if SPLIT:
        b_dq1 = tl.dot(b_ds, b_k1, input_precision=PREC)
    else:
        b_dq1 = b_dq0
    # The partials are padded to whole query tiles (padded rows hold zeros: P^T is 0 past N), and
    # are DQ_WIDTH wide: the head dim when it is a multiple of 4 (a column mask then keeps or drops
    # whole 4-wide vectors: the adds stay vectors), else the chunks' width D0 + D1 (no mask).
    p = DQP + i_slot * st_p[0] + i_b * st_p[1] + i_row * st_p[2] + i_h * DQ_WIDTH
    o_d0 = tl.arange(0, D0)
    o_d1 = tl.arange(0, D1)
    # the token stride arrives divided by 4 (rows are 16-byte aligned: the compiler must know it
    # to keep the adds 4-wide, and it only learns divisibility by 16 from an argument)
    stride_row = st_p[3] * 4
    # column masks: all true (and folded away: same SASS) where the chunk lies inside DQ_WIDTH
    m0 = o_d0[None, :] < DQ_WIDTH
    m1 = o_d1[None, :] < DQ_WIDTH - D0
    if DETERMINISTIC:
        p_sem = SEM + ((i_slot * n_bh + i_bh) * n_rows + i_row) * n_qt + i_qt
        _ordered_add(p_sem, i_n, p, o_m, o_d0, o_d1, stride_row, b_dq0, b_dq1, m0, m1, D0, SPLIT, INTERPRET,
                     THREADS, POLL_LIMIT, STALL_NS)
    else:
        tl.atomic_add(p + o_m[:, None] * stride_row + o_d0[None, :], b_dq0, mask=m0, sem="relaxed")
        if SPLIT:
            tl.atomic_add(p + D0 + o_m[:, None] * stride_row + o_d1[None, :], b_dq1, mask=m1, sem="relaxed")


@triton.jit
def _dkv_readers(b_k0, b_k1, b_v0, b_v1, i_t, i_b, i_h, i_bh, i_n, q, do, stats, readers, N, qk_scale, dqp,
                 ALIGN: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                 PART: tl.constexpr, FUSED_DQ: tl.constexpr, DETERMINISTIC: tl.constexpr,
                 INTERPRET: tl.constexpr, THREADS: tl.constexpr, DQ_WIDTH: tl.constexpr,
                 POLL_LIMIT: tl.constexpr, STALL_NS: tl.constexpr):
    """dK (unscaled), dV of one key tile, summed over every row that reads it, in row order.
    ``readers``: (row_qframe, n_rd, rd_row, rd_slot, RD_MAX). PART 0: both; 1: dV only (no V, no
    Delta needed); 2: dK only. Split launches halve the accumulators where dK and dV of a 64-key
    tile would not fit one warpgroup (D = 160). One masked loop over query tiles: an unmasked
    loop for full tiles plus a masked tail (the forward's and dQ's layout) compiled to more
    instructions and spills here (compile report). FUSED_DQ (the fused build, with PART != 1):
    also each query tile's dQ contribution (:func:`_dq_partial`)."""
    row_qframe, n_rd, rd_row, rd_slot, RD_MAX = readers
    DELTA, SHIFT, st_s = stats
    b_dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    b_dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    b_dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    b_dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    for i_r in range(0, tl.load(n_rd + i_t)):
        i_row = tl.load(rd_row + i_t * RD_MAX + i_r).to(tl.int64)
        i_qf = tl.load(row_qframe + i_row).to(tl.int64)
        # (the strides times ALIGN first, then the offsets, as before the operands: frame_at's
        # order took 2-3 more registers in the split build's pass, compile report)
        p_q = q[0] + i_b * (q[1][0] * ALIGN) + i_qf * (q[1][1] * ALIGN) + i_h * (q[1][3] * ALIGN)
        p_do = do[0] + i_b * (do[1][0] * ALIGN) + i_row * (do[1][1] * ALIGN) + i_h * (do[1][3] * ALIGN)
        s_q = q[1][2] * ALIGN
        s_do = do[1][2] * ALIGN
        o_l = i_b * st_s[0] + i_row * st_s[1] + i_h * st_s[3]
        # the target's place in the reader's source list: its dQ partial slot, and its shift's
        i_slot = tl.load(rd_slot + i_t * RD_MAX + i_r).to(tl.int64)
        p_shift = SHIFT + i_slot * st_s[4] + o_l
        for start in range(0, N, BLOCK_M):
            o_m = start + tl.arange(0, BLOCK_M)
            b_q0, b_q1 = load_pair(p_q, o_m, s_q, N, HEAD_DIM, D0, D1, SPLIT)
            b_do0, b_do1 = load_pair(p_do, o_m, s_do, N, HEAD_DIM, D0, D1, SPLIT)
            # P^T = exp2(s * qk_scale + bias - lse2): one FFMA per score, the shift (lse2 - bias)
            # per query. SHIFT (the reader's shifts, one per source) and DELTA are the padded row
            # statistics (_row_stats): no mask, scaling or subtraction; padded query rows hold
            # +inf, so their P^T column is exactly 0.
            b_shift = tl.load(p_shift + o_m * st_s[2])
            b_pt = tl.exp2(dot_pair(b_k0, b_k1, b_q0, b_q1, SPLIT, PREC) * qk_scale - b_shift[None, :])
            if PART != 2:
                b_dv0 += tl.dot(b_pt.to(b_do0.dtype), b_do0, input_precision=PREC)
                if SPLIT:
                    b_dv1 += tl.dot(b_pt.to(b_do1.dtype), b_do1, input_precision=PREC)
            if PART != 1:
                b_delta = tl.load(DELTA + o_l + o_m * st_s[2])
                b_dst = b_pt * (dot_pair(b_v0, b_v1, b_do0, b_do1, SPLIT, PREC) - b_delta[None, :])
                b_dk0 += tl.dot(b_dst.to(b_q0.dtype), b_q0, input_precision=PREC)
                if SPLIT:
                    b_dk1 += tl.dot(b_dst.to(b_q1.dtype), b_q1, input_precision=PREC)
                if FUSED_DQ:
                    _dq_partial(dqp, b_dst, b_k0, b_k1, i_slot, i_b, i_h, i_bh, i_row, i_n, start // BLOCK_M, o_m,
                                HEAD_DIM, D0, D1, SPLIT, PREC, DETERMINISTIC, INTERPRET, THREADS, DQ_WIDTH,
                                POLL_LIMIT, STALL_NS)
    return b_dk0, b_dk1, b_dv0, b_dv1


@triton.jit
def _store_partials(PK, PV, i_part, i_bh, n_bh, o_n, L, L_MAX, b_dk0, b_dk1, b_dv0, b_dv1,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
                    PART: tl.constexpr):
    """fp32 dK (scaled) / dV of one chunk of a split target's readers, into partial slot ``i_part``
    of this program's (batch, head): (slots, B*H, L_MAX, HEAD_DIM) buffers, summed later by
    :func:`_bwd_reduce_kernel`."""
    o_p = (i_part * n_bh + i_bh).to(tl.int64) * L_MAX * HEAD_DIM
    if PART != 1:
        store_pair(PK + o_p, b_dk0, b_dk1, o_n, HEAD_DIM, L, HEAD_DIM, D0, D1, SPLIT, False)
    if PART != 2:
        store_pair(PV + o_p, b_dv0, b_dv1, o_n, HEAD_DIM, L, HEAD_DIM, D0, D1, SPLIT, False)


@triton.jit
def _dkv_target(i_n, i_bh, i_t, ins, stats, grads, parts, targets, readers, dims, qk_scale, scale, dqp,
                ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
                D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr, CHUNKED: tl.constexpr,
                FUSED_DQ: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERPRET: tl.constexpr,
                THREADS: tl.constexpr, DQ_WIDTH: tl.constexpr, POLL_LIMIT: tl.constexpr, STALL_NS: tl.constexpr):
    """dK, dV of key block ``i_n`` of target ``i_t`` (a distinct key/value source: a frame, or
    the image tokens) for batch*head ``i_bh``: its K and V tiles (V, or U for a keyframe in phase
    2), :func:`_dkv_readers`, then the stores (or partials of a split target). Shared by both
    builds' kernels. ``ins``: the operands (q, k, v, u, k_img, v_img, dO); ``grads``: (dK, dV,
    dU, dK_img, dV_img, frame strides, U strides, image strides); ``parts``: (PK, PV, L_MAX,
    B*H); ``targets``: (tgt_frame, tgt_vslot, tgt_part); ``dims``: (H, N, M)."""
    q, k, v, u, k_img, v_img, do = ins
    tgt_frame, tgt_vslot, tgt_part = targets
    H, N, M = dims
    DK, DV, DU, DKI, DVI, st_g, st_gu, st_gi = grads
    PK, PV, L_MAX, n_bh = parts
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_src = tl.load(tgt_frame + i_t).to(tl.int64)
    i_slot = tl.load(tgt_vslot + i_t).to(tl.int64)
    # CHUNKED: some targets' readers are split across programs (load balance); those programs
    # write fp32 partials, reduced in slot order afterwards. Without it the code is as before.
    if CHUNKED:
        i_part = tl.load(tgt_part + i_t)
    else:
        i_part = -1
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if i_src < 0:  # the image tokens: M keys
        if i_n * BLOCK_N < M:
            p_k, s_k = image_at(k_img, i_b, i_h, ALIGN)
            b_k0, b_k1 = load_pair(p_k, o_n, s_k, M, HEAD_DIM, D0, D1, SPLIT)
            if PART != 1:
                p_v, s_v = image_at(v_img, i_b, i_h, ALIGN)
                b_v0, b_v1 = load_pair(p_v, o_n, s_v, M, HEAD_DIM, D0, D1, SPLIT)
            else:  # dV only: the values are not read
                b_v0, b_v1 = b_k0, b_k1
            b_dk0, b_dk1, b_dv0, b_dv1 = _dkv_readers(
                b_k0, b_k1, b_v0, b_v1, i_t, i_b, i_h, i_bh, i_n, q, do, stats, readers, N, qk_scale, dqp,
                ALIGN, HEAD_DIM, D0, D1, SPLIT, BLOCK_M, BLOCK_N, PREC, PART, FUSED_DQ, DETERMINISTIC, INTERPRET,
                THREADS, DQ_WIDTH, POLL_LIMIT, STALL_NS)
            o_g = (i_b * st_gi[0] + i_h * st_gi[2]) * ALIGN
            if i_part >= 0:
                _store_partials(PK, PV, i_part, i_bh, n_bh, o_n, M, L_MAX, b_dk0 * scale, b_dk1 * scale, b_dv0,
                                b_dv1, HEAD_DIM, D0, D1, SPLIT, PART)
            else:
                if PART != 1:
                    store_pair(DKI + o_g, b_dk0 * scale, b_dk1 * scale, o_n, st_gi[1] * ALIGN, M, HEAD_DIM,
                               D0, D1, SPLIT, ACCUMULATE)
                if PART != 2:
                    store_pair(DVI + o_g, b_dv0, b_dv1, o_n, st_gi[1] * ALIGN, M, HEAD_DIM, D0, D1, SPLIT,
                               ACCUMULATE)
    elif i_n * BLOCK_N < N:  # a frame: N keys; values V, or U for a keyframe in phase 2
        p_k, s_k = frame_at(k, i_b, i_src, i_h, ALIGN)
        b_k0, b_k1 = load_pair(p_k, o_n, s_k, N, HEAD_DIM, D0, D1, SPLIT)
        if PART == 1:  # dV only: the values are not read
            b_v0, b_v1 = b_k0, b_k1
        elif i_slot < 0:
            p_v, s_v = frame_at(v, i_b, i_src, i_h, ALIGN)
            b_v0, b_v1 = load_pair(p_v, o_n, s_v, N, HEAD_DIM, D0, D1, SPLIT)
        else:
            p_v, s_v = frame_at(u, i_b, i_slot, i_h, ALIGN)
            b_v0, b_v1 = load_pair(p_v, o_n, s_v, N, HEAD_DIM, D0, D1, SPLIT)
        b_dk0, b_dk1, b_dv0, b_dv1 = _dkv_readers(
            b_k0, b_k1, b_v0, b_v1, i_t, i_b, i_h, i_bh, i_n, q, do, stats, readers, N, qk_scale, dqp,
            ALIGN, HEAD_DIM, D0, D1, SPLIT, BLOCK_M, BLOCK_N, PREC, PART, FUSED_DQ, DETERMINISTIC, INTERPRET,
            THREADS, DQ_WIDTH, POLL_LIMIT, STALL_NS)
        o_g = (i_b * st_g[0] + i_src * st_g[1] + i_h * st_g[3]) * ALIGN
        if not ACCUMULATE and PART != 2:
            if i_slot >= 0:  # phase 2 writes every gradient: a keyframe's own V is read in phase 1 only
                store_pair(DV + o_g, tl.zeros([BLOCK_N, D0], tl.float32), tl.zeros([BLOCK_N, D1], tl.float32),
                           o_n, st_g[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, False)
        if i_part >= 0:
            _store_partials(PK, PV, i_part, i_bh, n_bh, o_n, N, L_MAX, b_dk0 * scale, b_dk1 * scale, b_dv0,
                            b_dv1, HEAD_DIM, D0, D1, SPLIT, PART)
        else:
            if PART != 1:
                store_pair(DK + o_g, b_dk0 * scale, b_dk1 * scale, o_n, st_g[2] * ALIGN, N, HEAD_DIM, D0, D1,
                           SPLIT, ACCUMULATE)
            if PART == 2:
                pass
            elif i_slot < 0:
                store_pair(DV + o_g, b_dv0, b_dv1, o_n, st_g[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            else:  # gradient of the refreshed values U: the dO of phase 1
                store_pair(DU + (i_b * st_gu[0] + i_slot * st_gu[1] + i_h * st_gu[3]) * ALIGN, b_dv0,
                           b_dv1, o_n, st_gu[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)


@triton.jit
def _bwd_dkv_kernel(
    ins, stats, grads, parts, targets, readers, dims, qk_scale, scale,
    ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    """The split build's KV-major pass: one program per (key block, batch*head, target), key
    blocks fastest; dK and dV only (:func:`_dkv_target`; ``ins``: (q, k, v, u, k_img, v_img,
    dO) operands)."""
    _dkv_target(tl.program_id(0), tl.program_id(1), tl.program_id(2), ins, stats, grads, parts, targets, readers,
                dims, qk_scale, scale, readers, ACCUMULATE, HEAD_DIM, ALIGN, D0, D1, SPLIT,
                BLOCK_M, BLOCK_N, PREC, PART, CHUNKED, False, False, False, 32, 0, 0, 0)


# n_bh, group, n_chain: the launch order's counts, not specialised (no effect on the code; values
# of 1 or multiples of 16 would each be a new binary)
@triton.jit(do_not_specialize=["n_bh", "group", "n_chain"])
def _bwd_dkvq_kernel(
    ins, stats, grads, parts, targets, readers, dims, qk_scale, scale, dqp,
    n_bh, group, n_chain,
    ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr,
    CHUNKED: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERPRET: tl.constexpr, THREADS: tl.constexpr,
    DQ_WIDTH: tl.constexpr, POLL_LIMIT: tl.constexpr = 1 << 28, STALL_NS: tl.constexpr = 0,
):
    """The fused build's KV-major pass: dK, dV and each key tile's dQ contribution
    (:func:`_dq_partial`), on the grouped launch order: grid (chain in group, key block, group),
    a chain being a (batch*head, target) pair (:func:`launch_order`); the last group's missing
    chains exit at once. ``dqp``: (dQ partials, semaphores, their strides, rows, query tiles,
    batch*heads)."""
    i_n = tl.program_id(1)
    chain = tl.program_id(2) * group + tl.program_id(0)
    if chain >= n_chain:  # the last group's missing chains
        return
    _dkv_target(i_n, chain % n_bh, chain // n_bh, ins, stats, grads, parts, targets, readers, dims, qk_scale,
                scale, dqp, ACCUMULATE, HEAD_DIM, ALIGN, D0, D1, SPLIT, BLOCK_M, BLOCK_N,
                PREC, PART, CHUNKED, True, DETERMINISTIC, INTERPRET, THREADS, DQ_WIDTH, POLL_LIMIT, STALL_NS)


@triton.jit
def _bwd_reduce_kernel(
    parts, grads, reductions, dims,
    ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV (or dU) of each split target: its partial slots added in slot order (the same
    bits every run), then written (phase 2) or added to what phase 2 wrote (phase 1).
    ``reductions``: (red_frame, red_vslot, red_first, red_count); ``dims``: (H, N, M)."""
    PK, PV, L_MAX, _ = parts
    DK, DV, DU, DKI, DVI, st_g, st_gu, st_gi = grads
    red_frame, red_vslot, red_first, red_count = reductions
    H, N, M = dims
    i_n, i_bh, i_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_src = tl.load(red_frame + i_j).to(tl.int64)
    i_slot = tl.load(red_vslot + i_j).to(tl.int64)
    i_first = tl.load(red_first + i_j)
    L = tl.where(i_src < 0, M, N)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if i_n * BLOCK_N < L:
        b_dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
        b_dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        b_dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
        b_dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
        for i_c in range(0, tl.load(red_count + i_j)):
            o_p = ((i_first + i_c) * tl.num_programs(1) + i_bh).to(tl.int64) * L_MAX * HEAD_DIM
            p0, p1 = load_pair(PK + o_p, o_n, HEAD_DIM, L, HEAD_DIM, D0, D1, SPLIT)
            b_dk0 += p0
            if SPLIT:  # without SPLIT, p1 is chunk 0 again (D0 wide, not D1)
                b_dk1 += p1
            p0, p1 = load_pair(PV + o_p, o_n, HEAD_DIM, L, HEAD_DIM, D0, D1, SPLIT)
            b_dv0 += p0
            if SPLIT:
                b_dv1 += p1
        if i_src < 0:
            o_g = (i_b * st_gi[0] + i_h * st_gi[2]) * ALIGN
            store_pair(DKI + o_g, b_dk0, b_dk1, o_n, st_gi[1] * ALIGN, M, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            store_pair(DVI + o_g, b_dv0, b_dv1, o_n, st_gi[1] * ALIGN, M, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
        else:
            o_g = (i_b * st_g[0] + i_src * st_g[1] + i_h * st_g[3]) * ALIGN
            store_pair(DK + o_g, b_dk0, b_dk1, o_n, st_g[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            if i_slot < 0:
                store_pair(DV + o_g, b_dv0, b_dv1, o_n, st_g[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            else:
                store_pair(DU + (i_b * st_gu[0] + i_slot * st_gu[1] + i_h * st_gu[3]) * ALIGN, b_dv0,
                           b_dv1, o_n, st_gu[2] * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)


@triton.jit
def _bwd_delta_kernel(
    do_o, lse, stats, rows, dims,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The fused build's first kernel: the row statistics (:func:`_row_stats`) its dK/dV/dQ pass
    reads; the split build's dq kernel writes them itself. ``rows``: (n_src, src_logw);
    ``dims``: (H, N, N_PAD, S_MAX)."""
    n_src, src_logw = rows
    H, N, N_PAD, S_MAX = dims
    DO, O, st_o = do_o
    LSE, DLSE, st_l = lse
    DELTA, SHIFT, st_s = stats
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_o = (i_b * st_o[0] + i_r64 * st_o[1] + i_h * st_o[3]) * ALIGN
    b_do = load_tile(DO + o_o, o_m, st_o[2] * ALIGN, N, HEAD_DIM, BLOCK_D)
    b_o = load_tile(O + o_o, o_m, st_o[2] * ALIGN, N, HEAD_DIM, BLOCK_D)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)  # 0 past N (masked loads)
    _row_stats(LSE, DLSE, DELTA, SHIFT, b_delta,
               i_b * st_l[0] + i_r64 * st_l[1] + o_m * st_l[2] + i_h * st_l[3],
               i_b * st_s[0] + i_r64 * st_s[1] + o_m * st_s[2] + i_h * st_s[3],
               o_m, N, N_PAD, tl.load(n_src + i_row), src_logw + i_row * S_MAX, st_s[4], HAS_DLSE)


@triton.jit
def _bwd_dq_reduce_kernel(
    dqp, dq, rows, dims, scale,
    ONE_SLOT: tl.constexpr, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
):
    """dQ of each row: its partial slots (one per source, :func:`_dq_partial`) added in slot
    order (the same bits every run), scaled, cast, written (phase 2) or added to what phase 2
    wrote (phase 1). ONE_SLOT: the atomic build's single slot. ``dqp``: (partials, (slot, batch,
    row, token) strides); ``rows``: (row_qframe, n_src); ``dims``: (H, N)."""
    DQP, st_p = dqp
    row_qframe, n_src = rows
    H, N = dims
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = DQP + i_b * st_p[1] + i_r64 * st_p[2] + i_h * WIDTH
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if ONE_SLOT:
        b_dq += load_tile(p, o_m, st_p[3], N, HEAD_DIM, BLOCK_D)
    else:
        for i_s in range(0, tl.load(n_src + i_row)):
            b_dq += load_tile(p + i_s * st_p[0], o_m, st_p[3], N, HEAD_DIM, BLOCK_D)
    b_dq = b_dq * scale
    i_qf = tl.load(row_qframe + i_row).to(tl.int64)
    p_g, s_g = frame_at(dq, i_b, i_qf, i_h, ALIGN)
    if ACCUMULATE:
        b_dq += load_tile(p_g, o_m, s_g, N, HEAD_DIM, BLOCK_D).to(tl.float32)
    store_tile(p_g, b_dq, o_m, s_g, N, HEAD_DIM, BLOCK_D)


def auto_build(d: int, device) -> str:
    """What ``auto`` takes for head dim ``d`` on ``device``: the fused build where a committed
    GPU result shows it correct and faster for this head dim's chunks on this device class
    (``choice.FUSED_VERIFIED``, which cites the file) and its loop fits the registers (chunks
    at most ``FUSED_MAX_WIDTH`` wide), else the split pair, the build that has run on a GPU."""
    d0, d1 = split_head_dim(d, 32)
    width = d0 + d1
    if width > FUSED_MAX_WIDTH:
        return "split"
    verified = choice.fused_verified(width, target_arch(device), choice.device_name(device))
    return "fused" if verified else "split"


@functools.lru_cache(maxsize=16)
def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # a CPU tensor under cuda_tiles() (the compile report): an H100 SXM


def reader_cap(reader_counts, key_blocks: int, batch_heads: int, cuda: bool, device, env: str | None):
    """Most readers one dK/dV program may carry, or None to keep every target whole.

    A target read by R rows is one program of R passes per key block; the launch takes at least
    as long as its heaviest program. That only matters when it exceeds the average work per SM
    (small grids: the U-Net's 16- and 64-token levels, where the anchor frame's programs carry F
    times the others' work); then the cap is that average (at least the mean readers per
    target). ``VB_TILES="readers=K"`` forces K (tests split targets on the CPU this way)."""
    forced = tile_override("readers", env)
    heavy = max(reader_counts, default=0)
    if forced:
        cap = forced[0]
    elif not cuda:
        return None
    else:
        read = [r for r in reader_counts if r]
        total = sum(read)
        per_sm = cdiv(key_blocks * batch_heads * total, _sm_count(device))
        cap = max(cdiv(total, max(1, len(read))), per_sm)
    return cap if heavy > cap else None


# The fused pass's launch order keeps about this many query-tile steps between the starts of
# consecutive key blocks of one chain (see order_group).
_ORDER_LAG_STEPS = 4


def order_group(n_qt: int, cuda: bool, device) -> int:
    """Chains per group of the fused pass's grouped launch order (:func:`launch_order`).

    Key block j of a chain waits, at every query tile, for block j - 1's release (the ordered dQ
    adds). Launched side by side (key blocks fastest, as the split pass is), a chain's blocks
    start together and the last waits for all the others' releases before its first add; in
    groups of G chains, block j starts about G x (steps of a program) / SMs steps after block
    j - 1, so the order costs no wait once that lag exceeds the release latency, while the few
    key blocks of a chain that are resident together still share their queries' loads in L2.
    G: about ``_ORDER_LAG_STEPS`` steps of a one-reader program (``n_qt`` query tiles), a multiple
    of 16 (one specialisation) in [16, 64]; 2 in the interpreter (its tests cross groups). The
    model: ``python tools/dkv_balance.py --order``."""
    if not cuda:
        return 2
    want = cdiv(_ORDER_LAG_STEPS * _sm_count(device), max(1, n_qt))
    return min(64, max(16, 16 * cdiv(want, 16)))


def launch_order(n_chains: int, key_blocks: int, group: int) -> list[tuple[int, int]]:
    """(chain, key block) of each program of the fused pass, in launch (program id) order. Chains
    are (batch*head, target) pairs, targets slowest (heaviest first); the kernel's grid is
    (chain in group, key block, group), x fastest, and the last group's missing chains exit."""
    order = []
    for g0 in range(0, n_chains, group):
        size = min(group, n_chains - g0)
        order.extend((g0 + c, j) for j in range(key_blocks) for c in range(size))
    return order


@dataclasses.dataclass(frozen=True)
class BwdPhase:
    """The host plan of one backward phase (:func:`bwd_spec`): its launches, in order, and its
    fp32 scratch as consecutive pieces of one workspace (``sizes`` in 4-byte words, each piece
    16-byte aligned; ``pieces``: name -> index of its piece): the row statistics (Delta, then one
    shift per source slot), the fused build's dQ partials and int32 semaphores (zeroed per
    call), the split targets' dK/dV partials. The workspace is cut with one ``split`` per call."""
    launches: tuple
    strides: dict  # operand name -> its strides (in ALIGN elements, as the kernels take them)
    consts: dict  # per-phase values the operands carry: L_MAX, B*H, the dQ partials' strides, ...
    sizes: tuple  # words of each piece (padding pieces included)
    pieces: dict  # scratch name -> index into the pieces
    zeroed: tuple  # scratch set to zero before the phase runs (the atomic build's dQ slot)

    @property
    def words(self) -> int:
        return sum(self.sizes)

    def operands(self, t: dict, ws: tuple) -> dict:
        """The kernels' operands of this phase from the call's tensors ``t`` (q, k, v, u, k_img,
        v_img, do, out, lse, dlse, dq, dk, dv, du, dk_img, dv_img; a missing one is q, never read)
        and the workspace's pieces ``ws`` (fp32; the semaphores are seen as int32)."""
        st, c, at, q = self.strides, self.consts, self.pieces, t["q"]
        ins = ((q, st["q"]), (t["k"], st["k"]), (t["v"], st["v"]), (t["u"], st["u"]), (t["k_img"], st["k_img"]),
               (t["v_img"], st["v_img"]), (t["do"], st["do"]))
        dqp = ws[at["dqp"]] if "dqp" in at else q
        sem = ws[at["sem"]].view(torch.int32) if "sem" in at else c["no_sem"]
        parts = (ws[at["pk"]], ws[at["pv"]]) if "pk" in at else (q, q)
        return dict(
            ins=ins, q=ins[0], k=ins[1], v=ins[2], u=ins[3], k_img=ins[4], v_img=ins[5], do=ins[6],
            do_o=(t["do"], t["out"], st["do"]), lse=(t["lse"], t["dlse"], st["lse"]),
            stats=(ws[at["delta"]], ws[at["shift"]], st["stats"]), dq=(t["dq"], st["dq"]),
            grads=(t["dk"], t["dv"], t["du"], t["dk_img"], t["dv_img"], st["dk"], st["du"], st["dk_img"]),
            parts=(*parts, c["l_max"], c["n_bh"]), dqp=(dqp, sem, c["p_strides"], c["n_rows"], c["n_qt"], c["n_bh"]),
            dqp_sum=(dqp, c["p_sum_strides"]), semaphores=sem)

    def run(self, t: dict, ws: tuple, init_semaphores) -> None:
        """Launch the phase on the call's tensors and its pieces of the workspace."""
        ops = self.operands(t, ws)
        if "sem" in self.pieces:
            init_semaphores(ops["semaphores"])
        for name in self.zeroed:
            ws[self.pieces[name]].zero_()
        for lnch in self.launches:
            lnch(ops)


def _layout(regions) -> tuple[tuple, dict]:
    """(sizes, pieces) of a workspace for (name, words) regions, in order: each region starts on a
    16-byte boundary (the kernels' vector loads and Triton's pointer specialisation), a padding
    piece after it where needed; ``pieces``: name -> index of its piece."""
    sizes, pieces = [], {}
    for name, words in regions:
        if words:
            pieces[name] = len(sizes)
            sizes.append(words)
            if words % 4:
                sizes.append(4 - words % 4)
    return tuple(sizes), pieces


def bwd_spec(q, k, v, u, k_img, v_img, do, out, lse, dlse, dq, dk, dv, du, dk_img, dv_img, tables: dict,
             scale: float, accumulate: bool, env: str | None, deterministic: bool = True,
             build: str = "split") -> BwdPhase:
    """The plan (:class:`BwdPhase`) of one backward phase for these tensors' shapes and strides.
    ``do``/``out``/``lse``/``dlse`` (gradient of the LSE or None) are indexed by row; gradient
    buffers dq/dk/dv (B,F,N,H,D), du (B,K,N,H,D), dk_img/dv_img (B,M,H,D) share the strides of
    dk (frames) and dk_img (image). ``accumulate``: add into the gradient buffers (phase 1,
    after phase 2) instead of writing them.

    ``build``: ``"fused"``: Delta from a small kernel, then one KV-major pass computing dK, dV
    and each key tile's dQ contribution (5 matmuls, 1 exponential per score), the dQ partials
    reduced per row at the end (``deterministic``: ordered, bit-reproducible; else atomic adds).
    ``"split"``: the Q-major dQ pass plus the KV-major dK/dV pass (7 matmuls, 2 exponentials).
    ``"auto"``: :func:`auto_build` (the split pair, until a committed GPU result shows the fused
    build correct and faster at the head dim on the device class). Head dims whose chunks are
    wider than 64 spill the fused pass's dK, dV and dQ tiles, and sm_80 has no vector float
    atomics (compile report, docs/kernels.md). Which build a call asks for: :mod:`.choice`."""
    choice.check_build(build, "build")
    b, _, n, h, d = q.shape
    m = 0 if k_img is None else k_img.shape[1]
    # the kernels read O with dO's strides and Delta with the LSE's (token-contiguous, see _lse_buffer)
    assert do.stride() == out.stride()
    assert dlse is None or dlse.stride() == lse.stride()
    qk_scale = scale * math.log2(math.e)
    prec = dot_precision(q.dtype)
    # One ALIGN for all launches: every data tensor of the phase must satisfy it.
    al, _ = launch_strides((q, 4), (k, 4), (v, 4), (u, 4), (k_img, 3), (v_img, 3), (do, 4),
                           (dq, 4), (dk, 4), (du, 4), (dk_img, 3), (dv, 4), (dv_img, 3))
    strides = {name: operand_strides(x, n_st, al) for name, x, n_st in (
        ("q", q, 4), ("k", k, 4), ("v", v, 4), ("u", u, 4), ("k_img", k_img, 3), ("v_img", v_img, 3),
        ("do", do, 4), ("dq", dq, 4), ("dk", dk, 4), ("du", du, 4), ("dk_img", dk_img, 3))}
    strides["lse"] = tuple(lse.stride())
    if build == "auto":
        build = auto_build(d, q.device)
    fused = build == "fused"
    cuda = tiles_for_cuda(q.device)
    rows = tables["n_rows"]
    cfg = block_config(d, q.device, "dkvq" if fused else "dkv", n_queries=n, n_keys=max(n, m),
                       elem_bytes=q.element_size(), env=env)
    dq_cfg = None if fused else block_config(d, q.device, "dq", n_queries=n, n_keys=max(n, m),
                                             elem_bytes=q.element_size(), env=env)
    # Row statistics for the dK/dV pass: fp32 (1 + sources per row, B, H, rows, N padded to its
    # query tiles, and to the dq pass's, whose programs write them: powers of two, so the larger
    # tile is a multiple of the smaller), Delta then one shift (base-2 LSE minus the source's
    # bias) per source slot, each in the LSE's stride order (batch, row, token, head)
    tile = cfg["BLOCK_M"] if fused else max(cfg["BLOCK_M"], dq_cfg["BLOCK_M"])
    n_pad = cdiv(n, tile) * tile
    s_max = tables["n_src_max"]
    plane = b * h * rows * n_pad
    strides["stats"] = (h * rows * n_pad, n_pad, 1, rows * n_pad, plane)
    row_tables = tuple(tables[key] for key in ("row_qframe", "n_src", "src_frame", "src_vslot", "src_logw"))
    launches = []
    if not fused:
        launches.append(Launch(
            _bwd_dq_kernel, (cdiv(n_pad, dq_cfg["BLOCK_M"]), b * h, rows),
            (("q", "q"), ("k", "k"), ("v", "v"), ("u", "u"), ("k_img", "k_img"), ("v_img", "v_img"),
             ("do_o", "do_o"), ("lse", "lse"), ("stats", "stats"), ("dq", "dq")),
            dict(rows=row_tables, dims=(h, n, n_pad, m, s_max), qk_scale=qk_scale, scale=scale),
            dict(HAS_IMG=m > 0, HAS_DLSE=dlse is not None, ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, PREC=prec,
                 **dq_cfg)))
    width = cfg["D0"] + (cfg["D1"] if cfg["SPLIT"] else 0)  # the head dim's chunks, as the kernels see it
    # the dQ partials' width: the head dim itself when its columns split into whole 4-wide vectors
    # (a column mask keeps the adds vectors), else the chunks' (no mask); fp32 rows 16-byte aligned
    dq_width = d if d % 4 == 0 else width
    n_qt = cdiv(n, cfg["BLOCK_M"])
    consts = dict(n_bh=b * h, n_rows=rows, n_qt=n_qt, l_max=max(n, m), no_sem=tables["row_qframe"],
                  p_strides=(0, 0, 0, 0), p_sum_strides=(0, 0, 0, 0))
    sizes = [("delta", plane), ("shift", s_max * plane)]  # Delta, then the shifts right after it
    dqsum = None
    if fused:
        slots = tables["n_src_max"] if deterministic else 1
        # dQ partials (slots, B, rows, N padded to whole query tiles, H, dq_width) fp32, token-major
        # like dq; one slot when atomic
        pn, pr = h * dq_width, n_pad * h * dq_width
        pb, ps = rows * pr, b * rows * pr
        consts.update(p_strides=(ps if deterministic else 0, pb, pr, pn // 4),  # pn / 4: see _dq_partial
                      p_sum_strides=(ps, pb, pr, pn))
        block_d = max(16, triton.next_power_of_2(d))
        block_r = (64 if d <= 64 else 32 if d <= 128 else 16) if cuda else 16
        launches.append(Launch(
            _bwd_delta_kernel, (cdiv(n_pad, block_r), b * h, rows), (("do_o", "do_o"), ("lse", "lse"), ("stats", "stats")),
            dict(rows=(tables["n_src"], tables["src_logw"]), dims=(h, n, n_pad, s_max)),
            dict(HAS_DLSE=dlse is not None, HEAD_DIM=d, ALIGN=al, BLOCK_D=block_d, BLOCK_M=block_r,
                 num_warps=4 if cuda else 1)))
        dqsum = Launch(
            _bwd_dq_reduce_kernel, (cdiv(n, block_r), b * h, rows), (("dqp", "dqp_sum"), ("dq", "dq")),
            dict(rows=(tables["row_qframe"], tables["n_src"]), dims=(h, n), scale=scale),
            dict(ONE_SLOT=not deterministic, ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, BLOCK_D=block_d,
                 BLOCK_M=block_r, WIDTH=dq_width, num_warps=4 if cuda else 1))
        sizes.append(("dqp", slots * b * rows * n_pad * h * dq_width))
        if deterministic:
            sizes.append(("sem", slots * b * h * rows * n_qt))
    if tables["n_targets"]:
        key_blocks = cdiv(max(n, m), cfg["BLOCK_N"])
        cap = reader_cap(tables["reader_counts"], key_blocks, b * h, cuda, q.device, env)
        t = tables if cap is None else tables["plan"].tables(q.device, cap)
        # D > 128 in 16 bits: dK and dV in two launches (dV, then dK), each with half the
        # accumulators, so one warpgroup owns a 64-key tile without spills or m64n16 wgmma.
        parts = (1, 2) if width > 128 and q.element_size() == 2 and cfg["BLOCK_N"] >= 64 else (0,)
        n_chain = b * h * t["n_targets"]  # (batch*head, target) pairs
        operands = (("ins", "ins"), ("stats", "stats"), ("grads", "grads"), ("parts", "parts"))
        args = dict(targets=(t["tgt_frame"], t["tgt_vslot"], t["tgt_part"]),
                    readers=(t["row_qframe"], t["n_rd"], t["rd_row"], t["rd_slot"], t["n_rd_max"]),
                    dims=(h, n, m), qk_scale=qk_scale, scale=scale)
        kconsts = dict(ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, PREC=prec, CHUNKED=cap is not None, **cfg)
        if fused:  # the grouped launch order (order_group, launch_order)
            group = min(n_chain, order_group(n_qt, cuda, q.device))
            grid = (group, key_blocks, cdiv(n_chain, group))
            operands += (("dqp", "dqp"),)
            args.update(n_bh=b * h, group=group, n_chain=n_chain)
            kconsts.update(DETERMINISTIC=deterministic, INTERPRET=interpreting(), THREADS=32 * cfg["num_warps"],
                           DQ_WIDTH=dq_width)
            kernel = _bwd_dkvq_kernel
        else:
            grid = (key_blocks, b * h, t["n_targets"])
            kernel = _bwd_dkv_kernel
        launches.extend(Launch(kernel, grid, operands, args, dict(kconsts, PART=part)) for part in parts)
        if cap is not None:
            d0, d1 = split_head_dim(d)
            block_r = 64 if d <= 64 else 32 if d <= 128 else 16
            launches.append(Launch(
                _bwd_reduce_kernel, (cdiv(max(n, m), block_r), b * h, t["n_reductions"]),
                (("parts", "parts"), ("grads", "grads")),
                dict(reductions=(t["red_frame"], t["red_vslot"], t["red_first"], t["red_count"]), dims=(h, n, m)),
                dict(ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, D0=d0, D1=max(d1, 16), SPLIT=d1 > 0,
                     BLOCK_N=block_r, num_warps=4)))
            part_words = t["n_partials"] * b * h * max(n, m) * d
            sizes += [("pk", part_words), ("pv", part_words)]
    if dqsum is not None:
        launches.append(dqsum)
    zeroed = ("dqp",) if fused and not deterministic else ()
    return BwdPhase(tuple(launches), strides, consts, *_layout(sizes), zeroed)
