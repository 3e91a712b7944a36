"""Tile helpers shared by the fused forward and backward kernels.

Logits are kept in base 2 inside the kernels (``qk_scale = scale / ln 2``, ``exp2``); every LSE
that leaves a kernel is converted to the natural log.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # jit globals must be constexpr
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_tile(p_base, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              MASK_ROWS: tl.constexpr = True):
    """Load a (len(o_rows), BLOCK_D) tile of a token-major tensor; rows >= L and dims >= HEAD_DIM
    read 0. Without MASK_ROWS the caller knows every row is < L (a full tile): no row predicate,
    so the load stays one vectorised, pipelined copy."""
    o_d = tl.arange(0, BLOCK_D)
    p = p_base + o_rows[:, None] * stride_row + o_d[None, :]
    if MASK_ROWS:
        return tl.load(p, mask=(o_rows[:, None] < L) & (o_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM < BLOCK_D:
        return tl.load(p, mask=o_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(p)


@triton.jit
def store_tile(p_base, b_x, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (len(o_rows), BLOCK_D) tile, masking rows >= L and dims >= HEAD_DIM."""
    o_d = tl.arange(0, BLOCK_D)
    m = (o_rows[:, None] < L) & (o_d[None, :] < HEAD_DIM)
    tl.store(p_base + o_rows[:, None] * stride_row + o_d[None, :], b_x.to(p_base.dtype.element_ty), mask=m)


@triton.jit
def load_pair(p_base, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              SPLIT: tl.constexpr, MASK_ROWS: tl.constexpr = True):
    """A tile as its head-dim chunks: cols [0, D0) and, with SPLIT, [D0, D0 + D1) (else chunk 0 again)."""
    b_x0 = load_tile(p_base, o_rows, stride_row, L, HEAD_DIM, D0, MASK_ROWS)
    if SPLIT:
        b_x1 = load_tile(p_base + D0, o_rows, stride_row, L, HEAD_DIM - D0, D1, MASK_ROWS)
    else:
        b_x1 = b_x0
    return b_x0, b_x1


@triton.jit
def store_pair(p_base, b_x0, b_x1, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
               D1: tl.constexpr, SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Store a tile given as head-dim chunks; with ACCUMULATE add what an earlier launch wrote."""
    if ACCUMULATE:
        b_x0 += load_tile(p_base, o_rows, stride_row, L, HEAD_DIM, D0).to(tl.float32)
    store_tile(p_base, b_x0, o_rows, stride_row, L, HEAD_DIM, D0)
    if SPLIT:
        if ACCUMULATE:
            b_x1 += load_tile(p_base + D0, o_rows, stride_row, L, HEAD_DIM - D0, D1).to(tl.float32)
        store_tile(p_base + D0, b_x1, o_rows, stride_row, L, HEAD_DIM - D0, D1)


@triton.jit
def dot_pair(b_a0, b_a1, b_b0, b_b1, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """A0 B0^T (+ A1 B1^T): a product over the head dim given as chunks, fp32."""
    b_c = tl.dot(b_a0, tl.trans(b_b0), input_precision=PREC)
    if SPLIT:
        b_c = tl.dot(b_a1, tl.trans(b_b1), b_c, input_precision=PREC)
    return b_c


@triton.jit
def online_step(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, stride_kn, stride_vn, L, start, bias, qk_scale,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                SPLIT: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N) of a source (MASK: the tail tile)."""
    o_k = start + tl.arange(0, BLOCK_N)
    b_k0, b_k1 = load_pair(p_k, o_k, stride_kn, L, HEAD_DIM, D0, D1, SPLIT, MASK)
    b_s = dot_pair(b_q0, b_q1, b_k0, b_k1, SPLIT, PREC)  # raw scores: scale and bias enter once per row
    if MASK:
        b_s = tl.where((o_k < L)[None, :], b_s, float("-inf"))
    # qk_scale > 0, so max(s * qk_scale + bias) = max(s) * qk_scale + bias. The tile holds a valid
    # key (start < L), so m_new is finite: no -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale + bias)
    alpha = tl.exp2(m_i - m_new)
    b_p = tl.exp2(b_s * qk_scale + (bias - m_new)[:, None])  # one FFMA per score
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_v0, b_v1 = load_pair(p_v, o_k, stride_vn, L, HEAD_DIM, D0, D1, SPLIT, MASK)
    acc0 = tl.dot(b_p.to(b_v0.dtype), b_v0, acc0 * alpha[:, None], input_precision=PREC)
    if SPLIT:
        acc1 = tl.dot(b_p.to(b_v1.dtype), b_v1, acc1 * alpha[:, None], input_precision=PREC)
    return acc0, acc1, l_i, m_new


@triton.jit
def attend_source(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, stride_kn, stride_vn, L, bias, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  SPLIT: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax pass of one query tile over one source's L keys, read in place.

    The head dim is one power-of-two chunk [0, D0), or with SPLIT two chunks [0, D0) and
    [D0, D0 + D1) (80 = 64 + 16, 160 = 128 + 32): S = Q0 K0^T + Q1 K1^T, O = [P V0, P V1],
    instead of padding 80 to 128. ``bias`` is log2(count) of a reference read ``count`` times.
    Full tiles run unmasked; only the last, partial tile is masked.
    """
    n_full = L // BLOCK_N * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc0, acc1, l_i, m_i = online_step(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, stride_kn, stride_vn,
                                           L, start, bias, qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, False, PREC)
    # The tail (< BLOCK_N keys), masked, in tiles of at most 64 keys and not software-pipelined:
    # a masked 128-key tile next to the pipelined loop would push the kernel past 255 registers.
    TAIL: tl.constexpr = min(BLOCK_N, 64)
    for start in tl.range(n_full, L, TAIL, num_stages=1):
        acc0, acc1, l_i, m_i = online_step(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, stride_kn, stride_vn,
                                           L, start, bias, qk_scale, TAIL, HEAD_DIM, D0, D1, SPLIT, True, PREC)
    return acc0, acc1, l_i, m_i


# ---- operands: a tensor travels to a kernel as (pointer, strides), the strides in units of the
# launch's ALIGN elements (forward.launch_strides), so a kernel takes one argument per tensor ----
@triton.jit
def frame_at(op, i_b, i_f, i_h, ALIGN: tl.constexpr):
    """(pointer to batch ``i_b``, frame ``i_f``, head ``i_h``; token stride) of a (B, F, N, H, D)
    operand ``op`` = (pointer, (batch, frame, token, head) strides in ALIGN elements)."""
    return op[0] + (i_b * op[1][0] + i_f * op[1][1] + i_h * op[1][3]) * ALIGN, op[1][2] * ALIGN


@triton.jit
def image_at(op, i_b, i_h, ALIGN: tl.constexpr):
    """(pointer to batch ``i_b``, head ``i_h``; token stride) of a (B, M, H, D) operand ``op`` =
    (pointer, (batch, token, head) strides in ALIGN elements)."""
    return op[0] + (i_b * op[1][0] + i_h * op[1][2]) * ALIGN, op[1][1] * ALIGN
