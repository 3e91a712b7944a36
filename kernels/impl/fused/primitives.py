"""Tile helpers shared by the fused forward and backward kernels.

Logits are kept in base 2 inside the kernels (``qk_scale = scale / ln 2``, ``exp2``); every LSE
that leaves a kernel is converted to the natural log.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # jit globals must be constexpr
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def load_tile(p_base, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (len(o_rows), BLOCK_D) tile of a token-major tensor; rows >= L and dims >= HEAD_DIM read 0."""
    o_d = tl.arange(0, BLOCK_D)
    m = (o_rows[:, None] < L) & (o_d[None, :] < HEAD_DIM)
    return tl.load(p_base + o_rows[:, None] * stride_row + o_d[None, :], mask=m, other=0.0)


@triton.jit
def store_tile(p_base, b_x, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (len(o_rows), BLOCK_D) tile, masking rows >= L and dims >= HEAD_DIM."""
    o_d = tl.arange(0, BLOCK_D)
    m = (o_rows[:, None] < L) & (o_d[None, :] < HEAD_DIM)
    tl.store(p_base + o_rows[:, None] * stride_row + o_d[None, :], b_x.to(p_base.dtype.element_ty), mask=m)


@triton.jit
def load_pair(p_base, o_rows, stride_row, L, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              SPLIT: tl.constexpr):
    """A tile as its head-dim chunks: cols [0, D0) and, with SPLIT, [D0, D0 + D1) (else chunk 0 again)."""
    b_x0 = load_tile(p_base, o_rows, stride_row, L, HEAD_DIM, D0)
    if SPLIT:
        b_x1 = load_tile(p_base + D0, o_rows, stride_row, L, HEAD_DIM - D0, D1)
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
def dot_pair(b_a0, b_a1, b_b0, b_b1, SPLIT: tl.constexpr):
    """A0 B0^T (+ A1 B1^T): a product over the head dim given as chunks, fp32."""
    b_c = tl.dot(b_a0, tl.trans(b_b0))
    if SPLIT:
        b_c = tl.dot(b_a1, tl.trans(b_b1), b_c)
    return b_c


@triton.jit
def attend_source(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, stride_kn, stride_vn, L, bias, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  SPLIT: tl.constexpr):
    """Online-softmax pass of one query tile over one source's L keys, read in place.

    The head dim is one power-of-two chunk [0, D0), or with SPLIT two chunks [0, D0) and
    [D0, D0 + D1) (80 = 64 + 16, 160 = 128 + 32): S = Q0 K0^T + Q1 K1^T, O = [P V0, P V1],
    instead of padding 80 to 128. ``bias`` is log2(count) of a reference read ``count`` times.
    """
    o_n = tl.arange(0, BLOCK_N)
    for start in range(0, L, BLOCK_N):
        o_k = start + o_n
        b_k0, b_k1 = load_pair(p_k, o_k, stride_kn, L, HEAD_DIM, D0, D1, SPLIT)
        b_s = dot_pair(b_q0, b_q1, b_k0, b_k1, SPLIT) * qk_scale + bias
        b_s = tl.where((o_k < L)[None, :], b_s, float("-inf"))
        # start < L, so every block holds a valid key and m_new is finite: no -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        alpha = tl.exp2(m_i - m_new)
        b_p = tl.exp2(b_s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        b_v0, b_v1 = load_pair(p_v, o_k, stride_vn, L, HEAD_DIM, D0, D1, SPLIT)
        acc0 = acc0 * alpha[:, None] + tl.dot(b_p.to(b_v0.dtype), b_v0)
        if SPLIT:
            acc1 = acc1 * alpha[:, None] + tl.dot(b_p.to(b_v1.dtype), b_v1)
        m_i = m_new
    return acc0, acc1, l_i, m_i
