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
``_bwd_dkv_kernel`` with ``FUSED_DQ`` also adds each key tile's dQ contribution into fp32 partial
slots (:func:`_dq_partial`: ordered by semaphores, or atomic), and ``_bwd_dq_reduce_kernel`` sums
each row's slots into dQ.
Phase 2 runs first; its dV for a keyframe source is dU, the gradient of the refreshed values,
which is then the dO of phase 1. Phase 1 accumulates (load + add + store, never concurrently)
into dQ, dK, dV and the image gradients.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .forward import block_config, cdiv, dot_precision, launch_strides, split_head_dim, tile_override
from . import choice
from .launch import interpreting, launch, target_arch, tiles_for_cuda
from .primitives import LOG2E, dot_pair, load_pair, load_tile, store_pair, store_tile

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
    Q, K, V, U, KI, VI, DO, O, LSE, DLSE, DELTA, SHIFT, DQ,
    row_qframe, n_src, src_frame, src_vslot, src_logw,
    stride_qb, stride_qf, stride_qn, stride_qh,
    stride_kb, stride_kf, stride_kn, stride_kh,
    stride_vb, stride_vf, stride_vn, stride_vh,
    stride_ub, stride_uf, stride_un, stride_uh,
    stride_kib, stride_kim, stride_kih,
    stride_vib, stride_vim, stride_vih,
    stride_ob, stride_of, stride_on, stride_oh,
    stride_gb, stride_gf, stride_gn, stride_gh,
    stride_lb, stride_lf, stride_ln, stride_lh,
    stride_sb, stride_sf, stride_sn, stride_sh, stride_ss,
    H, N, N_PAD, M, S_MAX, qk_scale, scale,
    HAS_IMG: tl.constexpr, HAS_DLSE: tl.constexpr, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ALIGN: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    i_qf = tl.load(row_qframe + i_row).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)

    b_q0, b_q1 = load_pair(Q + (i_b * stride_qb + i_qf * stride_qf + i_h * stride_qh) * ALIGN, o_m,
                           stride_qn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
    o_o = (i_b * stride_ob + i_r64 * stride_of + i_h * stride_oh) * ALIGN
    b_do0, b_do1 = load_pair(DO + o_o, o_m, stride_on * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
    b_o0, b_o1 = load_pair(O + o_o, o_m, stride_on * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
    b_delta = tl.sum(b_do0.to(tl.float32) * b_o0.to(tl.float32), 1)
    if SPLIT:
        b_delta += tl.sum(b_do1.to(tl.float32) * b_o1.to(tl.float32), 1)
    o_tab = i_row * S_MAX
    b_delta, b_lse2 = _row_stats(LSE, DLSE, DELTA, SHIFT, b_delta,
                                 i_b * stride_lb + i_r64 * stride_lf + o_m * stride_ln + i_h * stride_lh,
                                 i_b * stride_sb + i_r64 * stride_sf + o_m * stride_sn + i_h * stride_sh,
                                 o_m, N, N_PAD, tl.load(n_src + i_row), src_logw + o_tab, stride_ss, HAS_DLSE)

    b_dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    b_dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    i_first = 0
    if HAS_IMG:
        if tl.load(src_frame + o_tab) < 0:
            b_dq0, b_dq1 = _dq_source(
                b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta,
                KI + (i_b * stride_kib + i_h * stride_kih) * ALIGN,
                VI + (i_b * stride_vib + i_h * stride_vih) * ALIGN,
                stride_kim * ALIGN, stride_vim * ALIGN, M, 0.0, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT,
                PREC)
            i_first = 1
    for i_s in range(i_first, tl.load(n_src + i_row)):
        i_src = tl.load(src_frame + o_tab + i_s).to(tl.int64)
        i_slot = tl.load(src_vslot + o_tab + i_s).to(tl.int64)
        bias = tl.load(src_logw + o_tab + i_s) * LOG2E
        p_k = K + (i_b * stride_kb + i_src * stride_kf + i_h * stride_kh) * ALIGN
        if i_slot < 0:
            b_dq0, b_dq1 = _dq_source(
                b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta, p_k,
                V + (i_b * stride_vb + i_src * stride_vf + i_h * stride_vh) * ALIGN,
                stride_kn * ALIGN, stride_vn * ALIGN, N, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
        else:
            b_dq0, b_dq1 = _dq_source(
                b_dq0, b_dq1, b_q0, b_q1, b_do0, b_do1, b_lse2, b_delta, p_k,
                U + (i_b * stride_ub + i_slot * stride_uf + i_h * stride_uh) * ALIGN,
                stride_kn * ALIGN, stride_un * ALIGN, N, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
    # ACCUMULATE: phase 1 after phase 2, the keyframe's queries were read by both.
    store_pair(DQ + (i_b * stride_gb + i_qf * stride_gf + i_h * stride_gh) * ALIGN, b_dq0 * scale,
               b_dq1 * scale, o_m, stride_gn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)


@triton.jit
def _wait_count(p_sem, target, POLL_LIMIT: tl.constexpr):
    """Spin until the int32 at ``p_sem`` is at least ``target`` (acquire, GPU scope); returns it.
    At least, not equal: the count only grows, and a warp of the waiting block that has passed
    the wait may release (count > target) before a slower warp of the same block has polled; an
    equality test would leave that warp spinning forever (:func:`_dq_partial` has the invariant).
    After POLL_LIMIT polls (2^28 by default, each an L2 round trip, a few hundred ns to a
    microsecond: minutes; the GPU smoke test lowers it so a hang fails in seconds) it gives up and traps, a CUDA error the caller sees, rather than hang the process: a block
    that never comes is a bug, not a slow GPU. One inline-PTX op rather than a Triton while loop: a
    loop nested in the query-tile loop would stop Triton from software-pipelining that loop's
    loads (cp.async). The labels are local to the braces, so the op may be inlined more than
    once."""
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
def _dq_partial(DQP, SEM, b_dst, b_k0, b_k1, i_slot, i_b, i_h, i_bh, i_row, i_n, i_qt, o_m, stride_ps, stride_pb,
                stride_pr, stride_pn, n_rows, n_qt, n_bh, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                SPLIT: tl.constexpr, PREC: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERPRET: tl.constexpr,
                THREADS: tl.constexpr, DQ_WIDTH: tl.constexpr, POLL_LIMIT: tl.constexpr, STALL_NS: tl.constexpr):
    """This key tile's dQ contribution dS K (unscaled, fp32) to query tile ``i_qt`` of row
    ``i_row``, added into the row's partial slot ``i_slot`` (the slot of this target's source in
    the row's source list): the 5th matmul, with dS^T already in registers from dK.

    DETERMINISTIC: the key blocks of a target add into a tile in key-block order, ranked by a
    semaphore per (slot, batch*head, row, query tile). Block ``i_n``'s threads each wait until
    the count is at least ``i_n`` x THREADS (block 0 writes instead of adding: no zero fill), add,
    then count one each (release: each publishes its own adds). Invariant: the count stays below
    (j + 1) x THREADS until every thread of block j has released, and no thread of a later block
    releases before that; so count >= ``i_n`` x THREADS holds exactly when blocks 0 .. i_n - 1
    are done, whichever of block ``i_n``'s own warps released first (an equality test would miss
    it: tests/test_dq_order_protocol.py checks both rules in every interleaving). Block
    ``i_n``'s program comes after block ``i_n - 1``'s in the grid (the grouped launch order,
    :func:`launch_order`: a few programs later), so no wait points to a program that can start
    later (forward progress rests on blocks being dispatched in grid order). Under the interpreter (the grid runs in
    order) the count must already be ``i_n``: an assertion checks it (``tl.assume``, which the
    interpreter checks always). Else: atomic adds into
    one zeroed slot (FA2's default, not bit-reproducible)."""
    b_ds = tl.trans(b_dst).to(b_k0.dtype)  # (BLOCK_M, BLOCK_N)
    b_dq0 = tl.dot(b_ds, b_k0, input_precision=PREC)
    if SPLIT:
        b_dq1 = tl.dot(b_ds, b_k1, input_precision=PREC)
    else:
        b_dq1 = b_dq0
    # The partials are padded to whole query tiles (padded rows hold zeros: P^T is 0 past N), and
    # are DQ_WIDTH wide: the head dim when it is a multiple of 4 (a column mask then keeps or drops
    # whole 4-wide vectors: the adds stay vectors), else the chunks' width D0 + D1 (no mask).
    p = DQP + i_slot * stride_ps + i_b * stride_pb + i_row * stride_pr + i_h * DQ_WIDTH
    if DETERMINISTIC:
        p_sem = SEM + ((i_slot * n_bh + i_bh) * n_rows + i_row) * n_qt + i_qt
        if INTERPRET:
            seen = tl.atomic_add(p_sem, 0) // THREADS
            # the order check: device_assert is compiled only in debug mode, while the
            # interpreter checks tl.assume always ("Assume failed": block i_n found a count other
            # than i_n, i.e. its wait would point to a program that has not run)
            tl.assume(seen == i_n)
        else:
            if STALL_NS > 0:  # the GPU stress test's build: one warp of the block polls late
                _stall_last_warp(THREADS, STALL_NS)
            seen = _wait_count(p_sem, (i_n * THREADS).to(tl.int32), POLL_LIMIT) // THREADS
        # the partial's address depends on the count read (seen - i_n == 0), so no access to it
        # can be scheduled before the wait; times 4, so the base keeps its 16-byte alignment and
        # the adds stay 4-wide vectors
        p += (seen - i_n) * 4
    o_d0 = tl.arange(0, D0)
    # stride_pn arrives divided by 4 (rows are 16-byte aligned: the compiler must know it to keep
    # the adds 4-wide, and it only learns divisibility by 16 from an argument)
    p0 = p + o_m[:, None] * (stride_pn * 4) + o_d0[None, :]
    # column masks: all true (and folded away: same SASS) where the chunk lies inside DQ_WIDTH
    m0 = o_d0[None, :] < DQ_WIDTH
    if SPLIT:
        o_d1 = tl.arange(0, D1)
        p1 = p + D0 + o_m[:, None] * (stride_pn * 4) + o_d1[None, :]
        m1 = o_d1[None, :] < DQ_WIDTH - D0
    if DETERMINISTIC:
        # key block 0 writes (the buffer is never filled), the later ones add after it: the
        # adds of one element happen in key-block order whatever the timing, so the sum is
        # bit-reproducible. Masked twins on a uniform predicate, not an if/else (triton 3.6's
        # software pipeliner fails on that branch). The predicate is broadcast to the tile on
        # purpose: scalar masks compiled to 499 / 458 SASS per tile at D = 40 / 64 against 493 /
        # 465, and 533 / 483 against 510 / 456 under triton 3.6
        first = (i_n == 0) & (o_m[:, None] >= 0)
        tl.store(p0, b_dq0, mask=first & m0)
        tl.atomic_add(p0, b_dq0, mask=~first & m0, sem="relaxed")
        if SPLIT:
            tl.store(p1, b_dq1, mask=first & m1)
            tl.atomic_add(p1, b_dq1, mask=~first & m1, sem="relaxed")
        # every thread counts one for its own adds (release, GPU scope): the next block's wait
        # passes once all THREADS have. No CTA barrier (it would stop the loop's software
        # pipelining); ptxas aggregates the same-address adds of a warp into one (docs/kernels.md)
        tl.atomic_add(p_sem + tl.zeros([THREADS], tl.int32), 1, sem="release")
    else:
        tl.atomic_add(p0, b_dq0, mask=m0, sem="relaxed")
        if SPLIT:
            tl.atomic_add(p1, b_dq1, mask=m1, sem="relaxed")


@triton.jit
def _dkv_readers(b_k0, b_k1, b_v0, b_v1, i_t, i_b, i_h, Q, DO, LSE, DELTA, row_qframe, n_rd, rd_row,
                 stride_qb, stride_qf, stride_qn, stride_qh, stride_ob, stride_of, stride_on,
                 stride_oh, stride_lb, stride_lf, stride_ln, stride_lh, stride_ls, N, RD_MAX, qk_scale,
                 DQP, SEM, rd_slot, i_bh, i_n, stride_ps, stride_pb, stride_pr, stride_pn, n_rows, n_qt, n_bh,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr,
                 FUSED_DQ: tl.constexpr, DETERMINISTIC: tl.constexpr, INTERPRET: tl.constexpr,
                 THREADS: tl.constexpr, DQ_WIDTH: tl.constexpr, POLL_LIMIT: tl.constexpr, STALL_NS: tl.constexpr):
    """dK (unscaled), dV of one key tile, summed over every row that reads it, in row order.
    PART 0: both; 1: dV only (no V, no Delta needed); 2: dK only. Split launches halve the
    accumulators where dK and dV of a 64-key tile would not fit one warpgroup (D = 160).
    One masked loop over query tiles: an unmasked loop for full tiles plus a masked tail (the
    forward's and dQ's layout) compiled to more instructions and spills here (compile report).
    FUSED_DQ (with PART != 1): also each query tile's dQ contribution (:func:`_dq_partial`)."""
    b_dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    b_dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
    b_dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    b_dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    for i_r in range(0, tl.load(n_rd + i_t)):
        i_row = tl.load(rd_row + i_t * RD_MAX + i_r).to(tl.int64)
        i_qf = tl.load(row_qframe + i_row).to(tl.int64)
        p_q = Q + i_b * stride_qb + i_qf * stride_qf + i_h * stride_qh
        p_do = DO + i_b * stride_ob + i_row * stride_of + i_h * stride_oh
        o_l = i_b * stride_lb + i_row * stride_lf + i_h * stride_lh
        # the target's place in the reader's source list: its dQ partial slot, and its shift's
        i_slot = tl.load(rd_slot + i_t * RD_MAX + i_r).to(tl.int64)
        p_shift = LSE + i_slot * stride_ls + o_l
        for start in range(0, N, BLOCK_M):
            o_m = start + tl.arange(0, BLOCK_M)
            b_q0, b_q1 = load_pair(p_q, o_m, stride_qn, N, HEAD_DIM, D0, D1, SPLIT)
            b_do0, b_do1 = load_pair(p_do, o_m, stride_on, N, HEAD_DIM, D0, D1, SPLIT)
            # P^T = exp2(s * qk_scale + bias - lse2): one FFMA per score, the shift (lse2 - bias)
            # per query. LSE (the reader's shifts, one per source) and DELTA are the padded row
            # statistics (_row_stats): no mask, scaling or subtraction; padded query rows hold
            # +inf, so their P^T column is exactly 0.
            b_shift = tl.load(p_shift + o_m * stride_ln)
            b_pt = tl.exp2(dot_pair(b_k0, b_k1, b_q0, b_q1, SPLIT, PREC) * qk_scale - b_shift[None, :])
            if PART != 2:
                b_dv0 += tl.dot(b_pt.to(b_do0.dtype), b_do0, input_precision=PREC)
                if SPLIT:
                    b_dv1 += tl.dot(b_pt.to(b_do1.dtype), b_do1, input_precision=PREC)
            if PART != 1:
                b_delta = tl.load(DELTA + o_l + o_m * stride_ln)
                b_dst = b_pt * (dot_pair(b_v0, b_v1, b_do0, b_do1, SPLIT, PREC) - b_delta[None, :])
                b_dk0 += tl.dot(b_dst.to(b_q0.dtype), b_q0, input_precision=PREC)
                if SPLIT:
                    b_dk1 += tl.dot(b_dst.to(b_q1.dtype), b_q1, input_precision=PREC)
                if FUSED_DQ:
                    _dq_partial(DQP, SEM, b_dst, b_k0, b_k1, i_slot, i_b, i_h, i_bh, i_row, i_n, start // BLOCK_M,
                                o_m, stride_ps, stride_pb, stride_pr, stride_pn, n_rows, n_qt, n_bh, HEAD_DIM,
                                D0, D1, SPLIT, PREC, DETERMINISTIC, INTERPRET, THREADS, DQ_WIDTH, POLL_LIMIT,
                                STALL_NS)
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


# n_bh, group, n_chain: the launch order's counts, not specialised (no effect on the code, and
# the split build does not read them: values of 1 or multiples of 16 would each be a new binary)
@triton.jit(do_not_specialize=["n_bh", "group", "n_chain"])
def _bwd_dkv_kernel(
    Q, K, V, U, KI, VI, DO, LSE, DELTA, DK, DV, DU, DKI, DVI, PK, PV, DQP, SEM,
    row_qframe, tgt_frame, tgt_vslot, tgt_part, n_rd, rd_row, rd_slot,
    stride_qb, stride_qf, stride_qn, stride_qh,
    stride_kb, stride_kf, stride_kn, stride_kh,
    stride_vb, stride_vf, stride_vn, stride_vh,
    stride_ub, stride_uf, stride_un, stride_uh,
    stride_kib, stride_kim, stride_kih,
    stride_vib, stride_vim, stride_vih,
    stride_ob, stride_of, stride_on, stride_oh,
    stride_lb, stride_lf, stride_ln, stride_lh, stride_ls,
    stride_gb, stride_gf, stride_gn, stride_gh,
    stride_gub, stride_guf, stride_gun, stride_guh,
    stride_gib, stride_gim, stride_gih,
    H, N, M, RD_MAX, L_MAX, qk_scale, scale,
    stride_ps, stride_pb, stride_pr, stride_pn, n_rows, n_qt, n_bh, group, n_chain,
    ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr,
    CHUNKED: tl.constexpr, FUSED_DQ: tl.constexpr = False, DETERMINISTIC: tl.constexpr = True,
    INTERPRET: tl.constexpr = False, THREADS: tl.constexpr = 128, DQ_WIDTH: tl.constexpr = 0,
    GROUPED: tl.constexpr = False, POLL_LIMIT: tl.constexpr = 1 << 28, STALL_NS: tl.constexpr = 0,
):
    if GROUPED:  # grid (chain in group, key block, group): the grouped launch order (launch_order)
        i_n = tl.program_id(1)
        chain = tl.program_id(2) * group + tl.program_id(0)
        if chain >= n_chain:  # the last group's missing chains
            return
        i_bh, i_t = chain % n_bh, chain // n_bh
    else:  # (key block, batch*head, target), key blocks fastest
        i_n, i_bh, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
            b_k0, b_k1 = load_pair(KI + (i_b * stride_kib + i_h * stride_kih) * ALIGN, o_n,
                                   stride_kim * ALIGN, M, HEAD_DIM, D0, D1, SPLIT)
            if PART != 1:
                b_v0, b_v1 = load_pair(VI + (i_b * stride_vib + i_h * stride_vih) * ALIGN, o_n,
                                       stride_vim * ALIGN, M, HEAD_DIM, D0, D1, SPLIT)
            else:  # dV only: the values are not read
                b_v0, b_v1 = b_k0, b_k1
            b_dk0, b_dk1, b_dv0, b_dv1 = _dkv_readers(
                b_k0, b_k1, b_v0, b_v1, i_t, i_b, i_h, Q, DO, LSE, DELTA, row_qframe, n_rd, rd_row,
                stride_qb * ALIGN, stride_qf * ALIGN, stride_qn * ALIGN, stride_qh * ALIGN,
                stride_ob * ALIGN, stride_of * ALIGN, stride_on * ALIGN, stride_oh * ALIGN, stride_lb, stride_lf,
                stride_ln, stride_lh, stride_ls, N, RD_MAX, qk_scale,
                DQP, SEM, rd_slot, i_bh, i_n, stride_ps, stride_pb, stride_pr, stride_pn, n_rows, n_qt, n_bh,
                HEAD_DIM, D0, D1, SPLIT, BLOCK_M, BLOCK_N, PREC, PART, FUSED_DQ, DETERMINISTIC, INTERPRET, THREADS,
                DQ_WIDTH, POLL_LIMIT, STALL_NS)
            o_g = (i_b * stride_gib + i_h * stride_gih) * ALIGN
            if i_part >= 0:
                _store_partials(PK, PV, i_part, i_bh, n_bh, o_n, M, L_MAX, b_dk0 * scale, b_dk1 * scale, b_dv0,
                                b_dv1, HEAD_DIM, D0, D1, SPLIT, PART)
            else:
                if PART != 1:
                    store_pair(DKI + o_g, b_dk0 * scale, b_dk1 * scale, o_n, stride_gim * ALIGN, M, HEAD_DIM,
                               D0, D1, SPLIT, ACCUMULATE)
                if PART != 2:
                    store_pair(DVI + o_g, b_dv0, b_dv1, o_n, stride_gim * ALIGN, M, HEAD_DIM, D0, D1, SPLIT,
                               ACCUMULATE)
    elif i_n * BLOCK_N < N:  # a frame: N keys; values V, or U for a keyframe in phase 2
        b_k0, b_k1 = load_pair(K + (i_b * stride_kb + i_src * stride_kf + i_h * stride_kh) * ALIGN, o_n,
                               stride_kn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
        if PART == 1:  # dV only: the values are not read
            b_v0, b_v1 = b_k0, b_k1
        elif i_slot < 0:
            b_v0, b_v1 = load_pair(V + (i_b * stride_vb + i_src * stride_vf + i_h * stride_vh) * ALIGN, o_n,
                                   stride_vn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
        else:
            b_v0, b_v1 = load_pair(U + (i_b * stride_ub + i_slot * stride_uf + i_h * stride_uh) * ALIGN, o_n,
                                   stride_un * ALIGN, N, HEAD_DIM, D0, D1, SPLIT)
        b_dk0, b_dk1, b_dv0, b_dv1 = _dkv_readers(
            b_k0, b_k1, b_v0, b_v1, i_t, i_b, i_h, Q, DO, LSE, DELTA, row_qframe, n_rd, rd_row,
            stride_qb * ALIGN, stride_qf * ALIGN, stride_qn * ALIGN, stride_qh * ALIGN,
            stride_ob * ALIGN, stride_of * ALIGN, stride_on * ALIGN, stride_oh * ALIGN, stride_lb, stride_lf,
            stride_ln, stride_lh, stride_ls, N, RD_MAX, qk_scale,
            DQP, SEM, rd_slot, i_bh, i_n, stride_ps, stride_pb, stride_pr, stride_pn, n_rows, n_qt, n_bh,
            HEAD_DIM, D0, D1, SPLIT, BLOCK_M, BLOCK_N, PREC, PART, FUSED_DQ, DETERMINISTIC, INTERPRET, THREADS,
            DQ_WIDTH, POLL_LIMIT, STALL_NS)
        o_g = (i_b * stride_gb + i_src * stride_gf + i_h * stride_gh) * ALIGN
        if not ACCUMULATE and PART != 2:
            if i_slot >= 0:  # phase 2 writes every gradient: a keyframe's own V is read in phase 1 only
                store_pair(DV + o_g, tl.zeros([BLOCK_N, D0], tl.float32), tl.zeros([BLOCK_N, D1], tl.float32),
                           o_n, stride_gn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, False)
        if i_part >= 0:
            _store_partials(PK, PV, i_part, i_bh, n_bh, o_n, N, L_MAX, b_dk0 * scale, b_dk1 * scale, b_dv0,
                            b_dv1, HEAD_DIM, D0, D1, SPLIT, PART)
        else:
            if PART != 1:
                store_pair(DK + o_g, b_dk0 * scale, b_dk1 * scale, o_n, stride_gn * ALIGN, N, HEAD_DIM, D0, D1,
                           SPLIT, ACCUMULATE)
            if PART == 2:
                pass
            elif i_slot < 0:
                store_pair(DV + o_g, b_dv0, b_dv1, o_n, stride_gn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            else:  # gradient of the refreshed values U: the dO of phase 1
                store_pair(DU + (i_b * stride_gub + i_slot * stride_guf + i_h * stride_guh) * ALIGN, b_dv0,
                           b_dv1, o_n, stride_gun * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)


@triton.jit
def _bwd_reduce_kernel(
    PK, PV, DK, DV, DU, DKI, DVI,
    red_frame, red_vslot, red_first, red_count,
    stride_gb, stride_gf, stride_gn, stride_gh,
    stride_gub, stride_guf, stride_gun, stride_guh,
    stride_gib, stride_gim, stride_gih,
    H, N, M, L_MAX,
    ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV (or dU) of each split target: its partial slots added in slot order (the same
    bits every run), then written (phase 2) or added to what phase 2 wrote (phase 1)."""
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
            o_g = (i_b * stride_gib + i_h * stride_gih) * ALIGN
            store_pair(DKI + o_g, b_dk0, b_dk1, o_n, stride_gim * ALIGN, M, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            store_pair(DVI + o_g, b_dv0, b_dv1, o_n, stride_gim * ALIGN, M, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
        else:
            o_g = (i_b * stride_gb + i_src * stride_gf + i_h * stride_gh) * ALIGN
            store_pair(DK + o_g, b_dk0, b_dk1, o_n, stride_gn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            if i_slot < 0:
                store_pair(DV + o_g, b_dv0, b_dv1, o_n, stride_gn * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)
            else:
                store_pair(DU + (i_b * stride_gub + i_slot * stride_guf + i_h * stride_guh) * ALIGN, b_dv0,
                           b_dv1, o_n, stride_gun * ALIGN, N, HEAD_DIM, D0, D1, SPLIT, ACCUMULATE)


@triton.jit
def _bwd_delta_kernel(
    DO, O, LSE, DLSE, DELTA, SHIFT, n_src, src_logw,
    stride_ob, stride_of, stride_on, stride_oh,
    stride_lb, stride_lf, stride_ln, stride_lh,
    stride_sb, stride_sf, stride_sn, stride_sh, stride_ss,
    H, N, N_PAD, S_MAX,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The fused build's first kernel: the row statistics (:func:`_row_stats`) its dK/dV/dQ pass
    reads; the split build's dq kernel writes them itself."""
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_o = (i_b * stride_ob + i_r64 * stride_of + i_h * stride_oh) * ALIGN
    b_do = load_tile(DO + o_o, o_m, stride_on * ALIGN, N, HEAD_DIM, BLOCK_D)
    b_o = load_tile(O + o_o, o_m, stride_on * ALIGN, N, HEAD_DIM, BLOCK_D)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1)  # 0 past N (masked loads)
    _row_stats(LSE, DLSE, DELTA, SHIFT, b_delta,
               i_b * stride_lb + i_r64 * stride_lf + o_m * stride_ln + i_h * stride_lh,
               i_b * stride_sb + i_r64 * stride_sf + o_m * stride_sn + i_h * stride_sh,
               o_m, N, N_PAD, tl.load(n_src + i_row), src_logw + i_row * S_MAX, stride_ss, HAS_DLSE)


@triton.jit
def _bwd_dq_reduce_kernel(
    DQP, DQ, row_qframe, n_src,
    stride_ps, stride_pb, stride_pr, stride_pn,
    stride_gb, stride_gf, stride_gn, stride_gh,
    H, N, scale,
    ONE_SLOT: tl.constexpr, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
):
    """dQ of each row: its partial slots (one per source, :func:`_dq_partial`) added in slot
    order (the same bits every run), scaled, cast, written (phase 2) or added to what phase 2
    wrote (phase 1). ONE_SLOT: the atomic build's single slot."""
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = DQP + i_b * stride_pb + i_r64 * stride_pr + i_h * WIDTH
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if ONE_SLOT:
        b_dq += load_tile(p, o_m, stride_pn, N, HEAD_DIM, BLOCK_D)
    else:
        for i_s in range(0, tl.load(n_src + i_row)):
            b_dq += load_tile(p + i_s * stride_ps, o_m, stride_pn, N, HEAD_DIM, BLOCK_D)
    b_dq = b_dq * scale
    i_qf = tl.load(row_qframe + i_row).to(tl.int64)
    p_g = DQ + (i_b * stride_gb + i_qf * stride_gf + i_h * stride_gh) * ALIGN
    if ACCUMULATE:
        b_dq += load_tile(p_g, o_m, stride_gn * ALIGN, N, HEAD_DIM, BLOCK_D).to(tl.float32)
    store_tile(p_g, b_dq, o_m, stride_gn * ALIGN, N, HEAD_DIM, BLOCK_D)


def launch_bwd(spec: tuple, tables: dict, q, k, v, u, k_img, v_img, do, out, lse, dlse, dq, dk, dv, du,
               dk_img, dv_img, stats, pk=None, pv=None, dqp=None, sem=None) -> None:
    """Backward of one phase (see module docstring). ``spec``: :func:`bwd_spec` of these tensors
    (cached by the caller). ``do``/``out``/``lse``/``dlse`` (gradient of the LSE or None) are
    indexed by row; gradient buffers dq/dk/dv (B,F,N,H,D), du (B,K,N,H,D), dk_img/dv_img
    (B,M,H,D) share the strides of dk (frames) and dk_img (image). ``stats``: fp32 row statistics
    of shape ``spec[6]`` (Delta, then per source slot the base-2 LSE minus the source's bias,
    padded to the dK/dV pass's query tiles; written here by the dq or delta kernel).
    ``pk``/``pv``: fp32 partial buffers of shape ``spec[4]`` when the spec splits targets, else
    None. ``dqp``/``sem``: the fused build's fp32 dQ partials and int32 semaphores (``spec[5]``)."""
    dq_launch, dkv_launches, reduce_launch, dkv_tables, _, fused, _ = spec
    dummy = q  # never dereferenced
    u_ = u if u is not None else dummy
    ki_, vi_ = (k_img, v_img) if k_img is not None else (dummy, dummy)
    du_ = du if du is not None else dummy
    dki_, dvi_ = (dk_img, dv_img) if dk_img is not None else (dummy, dummy)
    pk_, pv_ = (pk, pv) if pk is not None else (dummy, dummy)
    dqp_ = dqp if dqp is not None else dummy
    sem_ = sem if sem is not None else tables["row_qframe"]
    if fused is None:  # the split build: Q-major dQ pass (writes Delta), then KV-major dK/dV
        launch(
            _bwd_dq_kernel, dq_launch[0],
            q, k, v, u_, ki_, vi_, do, out, lse, dlse if dlse is not None else lse, stats[0], stats[1], dq,
            tables["row_qframe"], tables["n_src"], tables["src_frame"], tables["src_vslot"], tables["src_logw"],
            *dq_launch[1], **dq_launch[2])
    else:
        grid, scalars, consts = fused["delta"]
        launch(_bwd_delta_kernel, grid, do, out, lse, dlse if dlse is not None else lse, stats[0], stats[1],
               tables["n_src"], tables["src_logw"], *scalars, **consts)
    t = dkv_tables
    for grid, scalars, consts in dkv_launches:
        launch(
            _bwd_dkv_kernel, grid,
            q, k, v, u_, ki_, vi_, do, stats[1], stats[0], dk, dv, du_, dki_, dvi_, pk_, pv_, dqp_, sem_,
            t["row_qframe"], t["tgt_frame"], t["tgt_vslot"], t["tgt_part"], t["n_rd"], t["rd_row"], t["rd_slot"],
            *scalars, **consts)
    if reduce_launch is not None:
        grid, scalars, consts = reduce_launch
        launch(_bwd_reduce_kernel, grid, pk, pv, dk, dv, du_, dki_, dvi_,
               t["red_frame"], t["red_vslot"], t["red_first"], t["red_count"], *scalars, **consts)
    if fused is not None:
        grid, scalars, consts = fused["dq_reduce"]
        launch(_bwd_dq_reduce_kernel, grid, dqp, dq, tables["row_qframe"], tables["n_src"], *scalars, **consts)


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


def bwd_spec(q, k, v, u, k_img, v_img, do, out, lse, dlse, dq, dk, dv, du, dk_img, dv_img, tables: dict,
             scale: float, accumulate: bool, env: str | None, deterministic: bool = True,
             build: str = "split") -> tuple:
    """(dq launch or None, dK/dV launches, reduction launch or None, the dK/dV launches' tables,
    shape of the fp32 dK/dV partial buffers or None, the fused build's launches and buffers or
    None, shape of the fp32 row statistics) of one backward phase, each launch as (grid,
    non-tensor arguments, constexpr/launch keywords); arguments as :func:`launch_bwd`'s,
    ``accumulate``: add into the gradient buffers (phase 1, after phase 2) instead of writing them.

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
    al, strides = launch_strides((q, 4), (k, 4), (v, 4), (u, 4), (k_img, 3), (v_img, 3), (do, 4),
                                 (dq, 4), (dk, 4), (du, 4), (dk_img, 3), (dv, 4), (dv_img, 3))
    common, st_dq, st_g = strides[:26], strides[26:30], strides[30:41]
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
    st_stats = (h * rows * n_pad, n_pad, 1, rows * n_pad, b * h * rows * n_pad)
    stats_shape = (1 + s_max, b, h, rows, n_pad)
    dq_launch = None
    if not fused:
        dq_launch = ((cdiv(n_pad, dq_cfg["BLOCK_M"]), b * h, rows),
                     (*common, *st_dq, *lse.stride(), *st_stats, h, n, n_pad, m, s_max, qk_scale, scale),
                     dict(HAS_IMG=m > 0, HAS_DLSE=dlse is not None, ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al,
                          PREC=prec, **dq_cfg))
    extra = None
    p_strides = (0, 0, 0, 0, rows, 1)
    width = cfg["D0"] + (cfg["D1"] if cfg["SPLIT"] else 0)  # the head dim's chunks, as the kernels see it
    # the dQ partials' width: the head dim itself when its columns split into whole 4-wide vectors
    # (a column mask keeps the adds vectors), else the chunks' (no mask); fp32 rows 16-byte aligned
    dq_width = d if d % 4 == 0 else width
    if fused:
        n_qt = cdiv(n, cfg["BLOCK_M"])
        slots = tables["n_src_max"] if deterministic else 1
        # dQ partials (slots, B, rows, N padded to whole query tiles, H, dq_width) fp32, token-major
        # like dq; one slot when atomic
        pn, pr = h * dq_width, n_pad * h * dq_width
        pb, ps = rows * pr, b * rows * pr
        p_strides = (ps if deterministic else 0, pb, pr, pn // 4, rows, n_qt)  # pn: see _dq_partial
        block_d = max(16, triton.next_power_of_2(d))
        block_r = (64 if d <= 64 else 32 if d <= 128 else 16) if cuda else 16
        extra = dict(
            delta=((cdiv(n_pad, block_r), b * h, rows), (*common[22:26], *lse.stride(), *st_stats, h, n, n_pad, s_max),
                   dict(HAS_DLSE=dlse is not None, HEAD_DIM=d, ALIGN=al, BLOCK_D=block_d, BLOCK_M=block_r,
                        num_warps=4 if cuda else 1)),
            dq_reduce=((cdiv(n, block_r), b * h, rows), (ps, pb, pr, pn, *st_dq, h, n, scale),
                       dict(ONE_SLOT=not deterministic, ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, BLOCK_D=block_d,
                            BLOCK_M=block_r, WIDTH=dq_width, num_warps=4 if cuda else 1)),
            dqp_shape=(slots, b, rows, n_pad, h, dq_width),
            sem_numel=slots * b * h * rows * n_qt if deterministic else 0, deterministic=deterministic)
    if tables["n_targets"] == 0:
        return dq_launch, (), None, tables, None, extra, stats_shape
    key_blocks = cdiv(max(n, m), cfg["BLOCK_N"])
    cap = reader_cap(tables["reader_counts"], key_blocks, b * h, cuda, q.device, env)
    t = tables if cap is None else tables["plan"].tables(q.device, cap)
    # D > 128 in 16 bits: dK and dV in two launches (dV, then dK), each with half the
    # accumulators, so one warpgroup owns a 64-key tile without spills or m64n16 wgmma.
    parts = (1, 2) if width > 128 and q.element_size() == 2 and cfg["BLOCK_N"] >= 64 else (0,)
    n_chain = b * h * t["n_targets"]  # (batch*head, target) pairs
    if fused:  # the grouped launch order (order_group, launch_order)
        group = min(n_chain, order_group(n_qt, cuda, q.device))
        grid = (group, key_blocks, cdiv(n_chain, group))
    else:
        group = 0
        grid = (key_blocks, b * h, t["n_targets"])
    scalars = (*common, *st_stats, *st_g, h, n, m, t["n_rd_max"], max(n, m), qk_scale,
               scale, *p_strides, b * h, group, n_chain)
    consts = dict(ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, PREC=prec, CHUNKED=cap is not None, **cfg)
    if fused:
        consts.update(FUSED_DQ=True, DETERMINISTIC=deterministic, INTERPRET=interpreting(),
                      THREADS=32 * cfg["num_warps"], DQ_WIDTH=dq_width, GROUPED=True)
    dkv = tuple((grid, scalars, dict(consts, PART=part)) for part in parts)
    if cap is None:
        return dq_launch, dkv, None, t, None, extra, stats_shape
    d0, d1 = split_head_dim(d)
    block_r = 64 if d <= 64 else 32 if d <= 128 else 16
    reduce = ((cdiv(max(n, m), block_r), b * h, t["n_reductions"]), (*st_g, h, n, m, max(n, m)),
              dict(ACCUMULATE=accumulate, HEAD_DIM=d, ALIGN=al, D0=d0, D1=max(d1, 16), SPLIT=d1 > 0,
                   BLOCK_N=block_r, num_warps=4))
    return dq_launch, dkv, reduce, t, (t["n_partials"], b * h, max(n, m), d), extra, stats_shape

