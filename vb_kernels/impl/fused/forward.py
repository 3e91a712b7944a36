"""Fused forward: one multi-source online-softmax kernel, launched once per phase.

A launch computes, for every query row i of a :class:`vb_kernels.schedule.Plan` (a frame's queries)
and every distinct source of that row (the image tokens, or a reference frame read ``count``
times), softmax attention over the concatenation of the sources' keys, without building it:
each source's K/V tiles are read in place from the caller's tensors (image tokens from
``k_img``/``v_img``; frame r's keys from ``k``; its values from ``v``, or from the refreshed
keyframe values U when r is a keyframe). Phase 1 writes only U (keyframes); phase 2 reads it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .launch import Launch, tiles_for_cuda
from .primitives import LN2, LOG2E, attend_source, frame_at, image_at, load_pair, store_pair


@triton.jit
def _fwd_kernel(
    q, k, v, u, k_img, v_img, o, lse, rows, dims, qk_scale,
    HAS_IMG: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One query block of one row (a frame's queries) over all its sources. Operands are
    (pointer, strides) (:func:`frame_at`); ``u``: the refreshed keyframe values (phase 2);
    ``o``, ``lse``: the row's output and LSE (B, rows, N, H); ``rows``: the plan's tables
    (row_qframe, n_src, src_frame, src_vslot, src_logw); ``dims``: (H, N, M, S_MAX)."""
    row_qframe, n_src, src_frame, src_vslot, src_logw = rows
    H, N, M, S_MAX = dims
    i_m, i_bh, i_row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # int64 batch/frame/head offsets: B*F*N*H*D may exceed 2**31 elements.
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_r64 = i_row.to(tl.int64)
    i_qf = tl.load(row_qframe + i_row).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)

    p_q, s_q = frame_at(q, i_b, i_qf, i_h, ALIGN)
    b_q0, b_q1 = load_pair(p_q, o_m, s_q, N, HEAD_DIM, D0, D1, SPLIT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)  # unused (and removed) without SPLIT

    o_tab = i_row * S_MAX
    i_first = 0
    if HAS_IMG:  # the plan puts the image source first in the rows that read it
        if tl.load(src_frame + o_tab) < 0:
            p_k, s_k = image_at(k_img, i_b, i_h, ALIGN)
            p_v, s_v = image_at(v_img, i_b, i_h, ALIGN)
            acc0, acc1, l_i, m_i = attend_source(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, s_k, s_v, M, 0.0,
                                                 qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
            i_first = 1
    for i_s in range(i_first, tl.load(n_src + i_row)):
        i_src = tl.load(src_frame + o_tab + i_s).to(tl.int64)
        i_slot = tl.load(src_vslot + o_tab + i_s).to(tl.int64)
        bias = tl.load(src_logw + o_tab + i_s) * LOG2E
        p_k, s_k = frame_at(k, i_b, i_src, i_h, ALIGN)
        if i_slot < 0:  # values of a plain frame
            p_v, s_v = frame_at(v, i_b, i_src, i_h, ALIGN)
            acc0, acc1, l_i, m_i = attend_source(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, s_k, s_v, N, bias,
                                                 qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)
        else:  # a keyframe: its values were refreshed by phase 1
            p_v, s_v = frame_at(u, i_b, i_slot, i_h, ALIGN)
            acc0, acc1, l_i, m_i = attend_source(acc0, acc1, l_i, m_i, b_q0, b_q1, p_k, p_v, s_k, s_v, N, bias,
                                                 qk_scale, BLOCK_N, HEAD_DIM, D0, D1, SPLIT, PREC)

    # A row with no keys (rejected at the door, guarded anyway) gives zeros and lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    p_o, s_o = frame_at(o, i_b, i_r64, i_h, ALIGN)
    store_pair(p_o, acc0 / l_safe[:, None], acc1 / l_safe[:, None], o_m, s_o, N, HEAD_DIM, D0, D1, SPLIT, False)
    b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    # LSE: (B, rows, N, H) indexed through its strides (allocated token-contiguous, function._lse_buffer).
    p_l, st_l = lse
    tl.store(p_l + i_b * st_l[0] + i_r64 * st_l[1] + o_m * st_l[2] + i_h * st_l[3], b_lse, mask=o_m < N)


def split_head_dim(head_dim: int, min_chunk: int = 16) -> tuple[int, int]:
    """(D0, D1): the head dim as one power-of-two chunk (D1 = 0), or two (DESIGN.md section 4:
    40 = 32 + 16, 72 = 64 + 16 with 8 masked, 80 = 64 + 16, 160 = 128 + 32) where that wastes
    fewer FLOPs than padding to the next power of two. Chunks are >= ``min_chunk`` (16 is the MMA
    K minimum; the backward asks for 32 at D >= 64, since a 16-wide chunk makes m64n16 wgmma,
    a quarter-width instruction, in each of its four products: 80 = 64 + 32 with 16 masked)."""
    pad = max(16, triton.next_power_of_2(head_dim))
    d0 = 1 << (head_dim.bit_length() - 1)
    if d0 == head_dim or d0 < 16:
        return pad, 0
    d1 = max(min_chunk if d0 >= 64 else 16, triton.next_power_of_2(head_dim - d0))
    return (d0, d1) if d0 + d1 < pad else (pad, 0)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (kernel, bytes per element, head-dim width bucket);
# BLOCK_M is always the query tile, BLOCK_N the key tile. Chosen from the real-launch compile
# report (`python -m vb_kernels.impl.fused.aot`, sm_90): no spills, cp.async pipelining, no
# m64n8/n16 wgmma where the head dim allows, fewest SASS instructions per tile. Not yet timed on
# a GPU: `python -m bench.gpu_run` sweeps them there. Each warpgroup (4 warps) owns 64 rows of the
# MMA's M side (queries for fwd and dq, keys for dK/dV): 8 warps on a 64-row tile would split
# the N side into quarter-width wgmma instead. fp32 tiles hold twice the bytes: smaller.
_TILES = {
    ("fwd", 2, 64): (128, 128, 8, 2), ("fwd", 2, 96): (128, 64, 8, 2), ("fwd", 2, 128): (128, 64, 8, 2),
    ("fwd", 2, 192): (128, 32, 8, 2), ("fwd", 2, 256): (128, 32, 8, 2),
    ("dq", 2, 64): (128, 64, 8, 2), ("dq", 2, 96): (128, 32, 8, 2), ("dq", 2, 128): (128, 32, 8, 2),
    ("dq", 2, 192): (128, 32, 8, 2), ("dq", 2, 256): (64, 32, 8, 2),
    ("dkv", 2, 64): (64, 64, 4, 2), ("dkv", 2, 96): (32, 128, 8, 2), ("dkv", 2, 128): (16, 128, 8, 2),
    ("dkv", 2, 192): (32, 128, 8, 2), ("dkv", 2, 256): (32, 64, 8, 2),
    ("fwd", 4, 64): (64, 64, 4, 2), ("fwd", 4, 96): (64, 32, 4, 2), ("fwd", 4, 128): (64, 32, 4, 2),
    ("fwd", 4, 192): (16, 32, 4, 1), ("fwd", 4, 256): (16, 32, 4, 1),
    ("dq", 4, 64): (32, 32, 4, 2), ("dq", 4, 96): (32, 16, 4, 1), ("dq", 4, 128): (32, 16, 4, 1),
    ("dq", 4, 192): (32, 16, 4, 1), ("dq", 4, 256): (32, 16, 4, 1),
    ("dkv", 4, 64): (32, 32, 4, 2), ("dkv", 4, 96): (16, 32, 4, 1), ("dkv", 4, 128): (16, 32, 4, 1),
    ("dkv", 4, 192): (16, 32, 4, 1), ("dkv", 4, 256): (16, 32, 4, 1),
    # the fused backward's KV-major pass (dK, dV and dQ's contributions): the 64 bucket is the
    # compile report's leanest loop (docs/kernels.md has its figures); wider buckets run fused
    # only when a call asks for the fused build (they spill). The GPU sweep tunes them
    ("dkvq", 2, 64): (64, 128, 8, 2), ("dkvq", 2, 96): (32, 64, 4, 2), ("dkvq", 2, 128): (32, 64, 4, 2),
    ("dkvq", 2, 192): (32, 64, 8, 2), ("dkvq", 2, 256): (32, 64, 8, 2),
    ("dkvq", 4, 64): (32, 32, 4, 2), ("dkvq", 4, 96): (16, 32, 4, 1), ("dkvq", 4, 128): (16, 32, 4, 1),
    ("dkvq", 4, 192): (16, 32, 4, 1), ("dkvq", 4, 256): (16, 32, 4, 1),
}


def tile_override(kernel: str, spec: str | None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kernel`` from a ``VB_TILES`` value ``spec``
    (e.g. ``"fwd=128,64,8,2;dkv=64,64,4,2"``, what the GPU tile sweep sets), or None; for
    ``kernel="readers"`` the dK/dV reader cap (``"readers=4"``: split every backward target read
    by more than 4 rows, see :func:`vb_kernels.schedule.chunk_targets`) as ``(cap,)``."""
    for item in filter(None, (spec or "").split(";")):
        name, _, vals = item.partition("=")
        name = name.strip()
        try:
            tiles = tuple(int(x) for x in vals.split(","))
        except ValueError:
            tiles = ()
        if name == "readers":
            if len(tiles) != 1 or tiles[0] < 1:
                raise ValueError(f"VB_TILES: expected 'readers=K' with an int K >= 1, got {item!r}")
        elif name not in ("fwd", "dq", "dkv", "dkvq") or len(tiles) != 4 or any(
                x < 16 or x & (x - 1) for x in tiles[:2]) or tiles[2] not in (1, 2, 4, 8) or tiles[3] < 1:
            raise ValueError(f"VB_TILES: expected 'kernel=BLOCK_M,BLOCK_N,num_warps,num_stages;...' with kernel "
                             f"in fwd/dq/dkv/dkvq and power-of-two blocks >= 16, got {item!r}")
        if name == kernel:
            return tiles
    return None


def tile_env() -> str | None:
    """The environment's tile override (``VB_TILES``, see :func:`tile_override`), read once per op
    call and passed down (an ``os.environ`` read costs host time)."""
    return os.environ.get("VB_TILES")


def block_config(head_dim: int, device: torch.device, kernel: str = "fwd",
                 n_queries: int | None = None, n_keys: int | None = None, elem_bytes: int = 2,
                 env: str | None = None) -> dict:
    """See :func:`_block_config`; cached per shape and tile environment (``env``: from
    :func:`tile_env`)."""
    return dict(_block_config(head_dim, tiles_for_cuda(device), kernel, n_queries, n_keys, elem_bytes, env))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' fp32 dots: "ieee" unless the user opted into TF32 the
    PyTorch way (``torch.set_float32_matmul_precision("high")`` or "medium"); Triton's own
    default would be TF32. 16-bit inputs: "tf32" (ignored, the MMA takes them as they are)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (``triton.cdiv`` costs a constexpr-function call on the host path)."""
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def _block_config(head_dim: int, cuda: bool, kernel: str, n_queries, n_keys, elem_bytes: int,
                  env_tiles: str | None) -> tuple:
    """Launch constants of ``kernel`` ("fwd", "dq", "dkv" or "dkvq", the fused backward's pass) as (name, value) pairs: head-dim
    chunks (D0, D1, SPLIT; masked, never copied), tiles (BLOCK_M queries, BLOCK_N keys), warps,
    stages.

    On CUDA the tiles shrink to the sequence (the U-Net's 16- and 64-token levels would leave
    most of a 128-row tile masked). ``VB_TILES`` (``env_tiles``) overrides them per kernel, as
    given (the GPU tile sweep; tests force other tilings on CPU)."""
    d0, d1 = split_head_dim(head_dim, 16 if kernel == "fwd" else 32)
    cfg = dict(D0=d0, D1=max(d1, 16), SPLIT=d1 > 0)  # D1 is a placeholder size without SPLIT
    width = d0 + d1
    override = tile_override(kernel, env_tiles)
    if override:
        tiles = override
    elif not cuda:  # interpreter: small tiles so odd N crosses several blocks
        tiles = (16, 16, 1, 1)
    else:
        bucket = next(b for b in (64, 96, 128, 192, 256) if width <= b)
        tiles = _TILES[(kernel, 4 if elem_bytes >= 4 else 2, bucket)]
    block_m, block_n, num_warps, num_stages = tiles
    if cuda and not override:
        if n_queries is not None:
            block_m = min(block_m, max(16, triton.next_power_of_2(n_queries)))
        if n_keys is not None:
            block_n = min(block_n, max(16, triton.next_power_of_2(n_keys)))
        if (block_m, block_n) != tiles[:2]:  # shrunk to a short sequence: no idle warps, but
            # 4x the warps where fewer would hold a (rows, > 64) fp32 accumulator and spill
            num_warps = min(num_warps, max(1, max(block_m, block_n) // 16) * (4 if width > 64 else 1))
    cfg.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return tuple(cfg.items())


_LOG2E = math.log2(math.e)


def launch_strides(*specs) -> tuple[int, tuple]:
    """(ALIGN, strides) of a launch. ``specs``: (tensor or None, n) pairs; ``strides`` is the
    concatenation of each tensor's first n strides in units of ALIGN elements (zeros for None).

    ALIGN is 16 bytes in elements when every stride but the last of every tensor is a multiple
    of it (and below 2**31), else 1. The kernels multiply the strides back by the constexpr
    ALIGN, so the compiler knows each row starts on a 16-byte boundary: vector loads and
    cp.async pipelining even where the head stride (D = 40, 72) is not a multiple of 16, which
    is all Triton's own launch specialisation looks at. Pointers are specialised on their
    16-byte alignment by Triton itself."""
    strides = tuple(t.stride() if t is not None else None for t, _ in specs)
    align = 16 // specs[0][0].element_size()
    if any(s % align or s >= 2 ** 31 for st in strides if st is not None for s in st[:-1]):
        align = 1
    return align, tuple(s for t, n in specs for s in operand_strides(t, n, align))


def operand_strides(t, n: int, align: int) -> tuple:
    """The first ``n`` strides of ``t`` in units of ``align`` elements (zeros for None): the
    strides half of the kernels' (pointer, strides) operands (see :func:`launch_strides`)."""
    if t is None:
        return (0,) * n
    st = t.stride()[:n]
    return st if align == 1 else tuple(x // align for x in st)


@dataclasses.dataclass(frozen=True)
class FwdPhase:
    """The host plan of one forward phase (:func:`fwd_spec`): its launch and its operands'
    strides (in ALIGN elements)."""
    launch: Launch
    strides: dict

    def run(self, t: dict) -> None:
        """Launch the phase on the call's tensors ``t`` (q, k, v, u, k_img, v_img, o, lse; a
        missing one is q: never dereferenced, HAS_IMG=False / no keyframe slot in the table)."""
        self.launch({name: (t[name], st) for name, st in self.strides.items()})


def fwd_spec(q, k, v, u, k_img, v_img, out, lse, tables: dict, scale: float, env: str | None) -> FwdPhase:
    """The plan of one forward phase for these tensors' shapes and strides (``env``:
    :func:`tile_env`): for every row i of ``tables`` it writes ``out[:, i]`` and ``lse[:, i]``.
    q, k, v (B, F, N, H, D); u (B, K, N, H, D) refreshed keyframe values or None; k_img, v_img
    (B, M, H, D) or None; out (B, rows, N, H, D); lse (B, rows, N, H) float32."""
    b, _, n, h, d = q.shape
    m = 0 if k_img is None else k_img.shape[1]
    cfg = block_config(d, q.device, "fwd", n_queries=n, n_keys=max(n, m), elem_bytes=q.element_size(), env=env)
    grid = (cdiv(n, cfg["BLOCK_M"]), b * h, tables["n_rows"])
    al, _ = launch_strides((q, 4), (k, 4), (v, 4), (u, 4), (k_img, 3), (v_img, 3), (out, 4))
    strides = {name: operand_strides(t, n_st, al) for name, t, n_st in (
        ("q", q, 4), ("k", k, 4), ("v", v, 4), ("u", u, 4), ("k_img", k_img, 3), ("v_img", v_img, 3), ("o", out, 4))}
    strides["lse"] = tuple(lse.stride())
    rows = tuple(tables[key] for key in ("row_qframe", "n_src", "src_frame", "src_vslot", "src_logw"))
    args = dict(rows=rows, dims=(h, n, m, tables["n_src_max"]), qk_scale=scale * _LOG2E)
    consts = dict(HAS_IMG=m > 0, HEAD_DIM=d, ALIGN=al, PREC=dot_precision(q.dtype), **cfg)
    return FwdPhase(Launch(_fwd_kernel, grid, tuple((name, name) for name in strides), args, consts), strides)
