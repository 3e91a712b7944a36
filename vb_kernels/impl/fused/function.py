"""Host side of the fused op: the two phases forward and backward, registered as the custom ops
``videobooth::fused_fwd`` / ``videobooth::fused_bwd`` so that autograd and ``torch.compile``
(fullgraph) see one opaque, differentiable op instead of Triton launches.

Saved for backward: the inputs, the output, its LSE, and phase 1's refreshed keyframe values U
with their LSE (B, K, N, H, D with K = number of keyframes): never a concatenated K/V.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...profiling import nvtx_range
from ...schedule import Schedule
from .backward import bwd_spec
from .choice import requested_build
from .forward import dot_precision, fwd_spec, tile_env
from .launch import target_arch

# Every buffer the fused path allocates goes through these, so tests can poison outputs (fill
# with NaN) and audit that nothing but outputs, LSEs, U and gradients is ever allocated. The
# *_like forms where a tensor of the shape exists: half the host time of torch.empty(shape, ...).
_alloc = torch.empty
_alloc_like = torch.empty_like
_DENSE = torch.contiguous_format


_NOTHING = contextlib.nullcontext()


def _on_device(q):
    """Triton launches on the current CUDA device: make it q's (a pipeline on cuda:1, say)."""
    return torch.cuda.device(q.device) if q.is_cuda else _NOTHING


def fused_fwd(q, k, v, k_img, v_img, schedule: Schedule, scale: float):
    """Both phases. Returns (out (B,F,N,H,D), lse (B,F,N,H) fp32, u (B,K,N,H,D) or None,
    lse1 (B,K,N,H) or None), K = number of keyframes some frame reads (phase 1 skips the
    others: exact). Only U is written between the phases."""
    with _on_device(q):
        return _fused_fwd(q, k, v, k_img, v_img, schedule, scale)


# Host plans of a call: everything but the tensors (launch grids, scalar arguments, constexprs,
# buffer shapes) is a function of the inputs' shapes, strides, dtype, the schedule's tables, the
# scale and the tile environment, so it is computed once per such key and a call costs one key and
# one dict lookup (issue 11: host overhead). The tables are shared by equal schedules (cached
# plans), and each entry keeps them, so the ids in a key always name the live tables it was built for.
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}
_MAX_PLANS = 1024


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """The cached host plan of a call's forward or backward: each phase's plan
    (:class:`forward.FwdPhase` / :class:`backward.BwdPhase`, phase 1 None without keyframes),
    and the schedule tables they were built for (the cache key holds their ids)."""
    tables1: Optional[dict]
    tables2: dict
    phase1: object
    phase2: object


def _inputs_key(q, k, v, k_img, v_img, tables, scale, env) -> tuple:
    img = None if k_img is None else (k_img.shape[1], k_img.stride(), v_img.stride())
    return (id(tables[0]), id(tables[1]), q.shape, q.dtype, target_arch(q.device), q.stride(), k.stride(),
            v.stride(), img, scale, env, dot_precision(q.dtype))


def _lse_buffer(b: int, rows: int, n: int, h: int, like: Tensor) -> Tensor:
    """A (B, rows, N, H) fp32 LSE whose memory is (B, H, rows, N): contiguous along tokens, so
    the backward loads a block of rows' LSE and Delta (which has the LSE's strides) as one
    vector instead of a gather with stride H. Shape and values are the public (B, F, N, H)."""
    return torch.empty_strided((b, rows, n, h), (h * rows * n, n, 1, rows * n), dtype=torch.float32,
                               device=like.device)


def _remember(cache: dict, key, value):
    if len(cache) >= _MAX_PLANS:
        cache.clear()
    cache[key] = value
    return value


def _fused_fwd(q, k, v, k_img, v_img, schedule, scale):
    b, n_frames, n, h, d = q.shape
    assert k_img is None or k_img.shape[1] > 0, "M = 0 travels as k_img = None (the plan has no image)"
    tables = schedule.fused_tables(k_img is not None, q.device)
    tables1, tables2 = tables
    env = tile_env()
    key = _inputs_key(q, k, v, k_img, v_img, tables, scale, env)
    plan = _FWD_PLANS.get(key)
    n_key = 0 if tables1 is None else tables1["n_rows"]
    u = lse1 = None
    if n_key:
        u = _alloc((b, n_key, n, h, d), dtype=q.dtype, device=q.device)
        lse1 = _lse_buffer(b, n_key, n, h, q)
    out = _alloc_like(q, memory_format=_DENSE)
    lse = _lse_buffer(b, n_frames, n, h, q)
    if plan is None or plan.tables1 is not tables1 or plan.tables2 is not tables2:
        plan = _remember(_FWD_PLANS, key, CallPlan(
            tables1, tables2, fwd_spec(q, k, v, None, k_img, v_img, u, lse1, tables1, scale, env) if n_key else None,
            fwd_spec(q, k, v, u, k_img, v_img, out, lse, tables2, scale, env)))
    spec1, spec2 = plan.phase1, plan.phase2
    ki, vi = (k_img, v_img) if k_img is not None else (q, q)  # absent: never dereferenced
    if n_key:
        with nvtx_range("vb.phase1.refresh"):
            spec1.run(dict(q=q, k=k, v=v, u=q, k_img=ki, v_img=vi, o=u, lse=lse1))
    with nvtx_range("vb.phase2.cross_frame"):
        spec2.run(dict(q=q, k=k, v=v, u=u if n_key else q, k_img=ki, v_img=vi, o=out, lse=lse))
    return out, lse, u, lse1


def _init_semaphores(sem: Tensor) -> None:
    """The fused build's ordered dQ adds start from zero counts (a test hook: the order check's
    positive control pre-counts a block here)."""
    sem.zero_()


def fused_bwd(dout, q, k, v, k_img, v_img, out, lse, u, lse1, schedule: Schedule, scale: float, dlse=None,
              deterministic: bool = True, build: str | None = None):
    """Gradients (dq, dk, dv, dk_img, dv_img); dk_img/dv_img None without image tokens.
    ``dlse``: gradient of the phase-2 LSE or None. Phase 2 first (it produces dU), then phase 1
    accumulating into the same buffers. ``deterministic``: dQ partials added in a fixed order
    (bit-reproducible); False: atomic adds (see :func:`vb_kernels.videobooth_attention`).
    ``build``: ``auto``, ``split`` or ``fused``; None: as :func:`.choice.requested_build` finds it."""
    build = requested_build(build)
    with _on_device(q):
        return _fused_bwd(dout, q, k, v, k_img, v_img, out, lse, u, lse1, schedule, scale, dlse, deterministic,
                          build)


def _fused_bwd(dout, q, k, v, k_img, v_img, out, lse, u, lse1, schedule, scale, dlse, deterministic, build):
    tables = schedule.fused_tables(k_img is not None, q.device)
    tables1, tables2 = tables
    dout = dout.contiguous()  # autograd may hand an expanded (stride 0) gradient
    if dlse is not None and dlse.stride() != lse.stride():  # the kernels read it with the LSE's strides
        dlse = _alloc_like(lse).copy_(dlse)
    env = tile_env()
    key = _inputs_key(q, k, v, k_img, v_img, tables, scale, env) + (out.stride(), dlse is not None, deterministic,
                                                                       build)
    plan = _BWD_PLANS.get(key)
    # No fills: phase 2 writes every element of dK, dV and the image gradients (zeros where no
    # row reads; Plan.unread), phase 1 then adds into them. (Not one buffer for all: a custom
    # op's outputs may not alias each other.)
    dq = _alloc_like(q, memory_format=_DENSE)
    dk = _alloc_like(q, memory_format=_DENSE)
    dv = _alloc_like(q, memory_format=_DENSE)
    dk_img = dv_img = du = None
    if k_img is not None:
        dk_img = _alloc_like(k_img, memory_format=_DENSE)
        dv_img = _alloc_like(k_img, memory_format=_DENSE)
    if u is not None:  # every slot of U is a phase-2 target (only read keyframes are refreshed): no fill
        du = _alloc_like(u)
    if plan is None or plan.tables1 is not tables1 or plan.tables2 is not tables2:
        spec2 = bwd_spec(q, k, v, u, k_img, v_img, dout, out, lse, dlse, dq, dk, dv, du, dk_img, dv_img, tables2,
                         scale, False, env, deterministic, build)
        spec1 = None if u is None else bwd_spec(q, k, v, None, k_img, v_img, du, u, lse1, None, dq, dk, dv, None,
                                                dk_img, dv_img, tables1, scale, True, env, deterministic, build)
        plan = _remember(_BWD_PLANS, key, CallPlan(tables1, tables2, spec1, spec2))
    spec2, spec1 = plan.phase2, plan.phase1
    # One workspace per call for both phases' scratch (row statistics, dK/dV partials, dQ
    # partials, semaphores), cut into the pieces the plans laid out with one split: fp32, the
    # counts seen as int32. Disjoint per phase, so nothing phase 1 reads is left over from phase 2.
    sizes = spec2.sizes + (spec1.sizes if spec1 is not None else ())
    ws = _alloc((sum(sizes),), dtype=torch.float32, device=q.device).split_with_sizes(sizes)
    t = dict(q=q, k=k, v=v, u=u if u is not None else q, k_img=k_img if k_img is not None else q,
             v_img=v_img if v_img is not None else q, do=dout, out=out, lse=lse, dlse=dlse if dlse is not None else lse,
             dq=dq, dk=dk, dv=dv, du=du if du is not None else q, dk_img=dk_img if dk_img is not None else q,
             dv_img=dv_img if dv_img is not None else q)
    with nvtx_range("vb.phase2.cross_frame.bwd"):
        spec2.run(t, ws, _init_semaphores)
    if u is not None:
        t.update(u=q, do=du, out=u, lse=lse1, dlse=lse1, du=q)
        with nvtx_range("vb.phase1.refresh.bwd"):
            spec1.run(t, ws[len(spec2.sizes):], _init_semaphores)
    return dq, dk, dv, dk_img, dv_img


# ---- custom ops: the schedule travels as plain ints so the op is traceable ---------------------
def _schedule(refs: List[int], num_refs: int, keyframes: List[int], image_everywhere: bool) -> Schedule:
    return _schedule_cached(tuple(refs), num_refs, tuple(keyframes), image_everywhere)


@functools.lru_cache(maxsize=256)
def _schedule_cached(refs, num_refs, keyframes, image_everywhere) -> Schedule:
    # One Schedule (and so one set of device tables) per distinct schedule, not one per call.
    table = [refs[i:i + num_refs] for i in range(0, len(refs), num_refs)]
    return Schedule(table, keyframes, image_everywhere)


def _empty_like_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Custom ops cannot return None: an absent tensor travels as a 0-element one.
    return t if t is not None else like.new_empty((0,))


@torch.library.custom_op("videobooth::fused_fwd", mutates_args=())
def _fused_fwd_op(q: Tensor, k: Tensor, v: Tensor, k_img: Optional[Tensor], v_img: Optional[Tensor],
                  refs: List[int], num_refs: int, keyframes: List[int], image_everywhere: bool,
                  scale: float, deterministic: bool = True,
                  bwd_build: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # deterministic, bwd_build: for the backward only (setup_context keeps them)
    sched = _schedule(refs, num_refs, keyframes, image_everywhere)
    out, lse, u, lse1 = fused_fwd(q, k, v, k_img, v_img, sched, scale)
    return out, lse, _empty_like_none(u, q), _empty_like_none(lse1, lse)


@_fused_fwd_op.register_fake
def _(q, k, v, k_img, v_img, refs, num_refs, keyframes, image_everywhere, scale, deterministic=True,
      bwd_build="auto"):
    b, n_frames, n, h, d = q.shape
    phase1, _ = _schedule(refs, num_refs, keyframes, image_everywhere).plan(k_img is not None)
    n_key = len(phase1.rows)  # keyframes that some frame reads
    out = q.new_empty(q.shape)
    lse = _lse_buffer(b, n_frames, n, h, q)
    u = q.new_empty((b, n_key, n, h, d)) if n_key else q.new_empty((0,))
    lse1 = _lse_buffer(b, n_key, n, h, q) if n_key else lse.new_empty((0,))
    return out, lse, u, lse1


@torch.library.custom_op("videobooth::fused_bwd", mutates_args=())
def _fused_bwd_op(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                  k_img: Optional[Tensor], v_img: Optional[Tensor], out: Tensor, lse: Tensor, u: Tensor,
                  lse1: Tensor, refs: List[int], num_refs: int, keyframes: List[int], image_everywhere: bool,
                  scale: float, deterministic: bool = True,
                  bwd_build: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sched = _schedule(refs, num_refs, keyframes, image_everywhere)
    has_u = u.numel() > 0
    dq, dk, dv, dki, dvi = fused_bwd(dout, q, k, v, k_img, v_img, out, lse, u if has_u else None,
                                     lse1 if has_u else None, sched, scale, dlse, deterministic, bwd_build)
    return dq, dk, dv, _empty_like_none(dki, q), _empty_like_none(dvi, q)


@_fused_bwd_op.register_fake
def _(dout, dlse, q, k, v, k_img, v_img, out, lse, u, lse1, refs, num_refs, keyframes, image_everywhere, scale,
      deterministic=True, bwd_build="auto"):
    img = (k_img.new_empty(k_img.shape), k_img.new_empty(k_img.shape)) if k_img is not None else (
        q.new_empty((0,)), q.new_empty((0,)))
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), *img


def _setup_context(ctx, inputs, output):
    q, k, v, k_img, v_img, refs, num_refs, keyframes, image_everywhere, scale, deterministic, build = inputs
    out, lse, u, lse1 = output
    ctx.save_for_backward(q, k, v, k_img, v_img, out, lse, u, lse1)
    ctx.sched_args = (refs, num_refs, keyframes, image_everywhere, scale, deterministic, build)
    ctx.mark_non_differentiable(u, lse1)  # internal: never leave fused_attention


def _backward(ctx, dout, dlse, _du, _dlse1):
    q, k, v, k_img, v_img, out, lse, u, lse1 = ctx.saved_tensors
    if dout is None:  # only the LSE was used downstream
        dout = torch.zeros_like(out)
    dq, dk, dv, dki, dvi = _fused_bwd_op(dout, dlse, q, k, v, k_img, v_img, out, lse, u, lse1, *ctx.sched_args)
    has_img = k_img is not None
    return dq, dk, dv, dki if has_img else None, dvi if has_img else None, None, None, None, None, None, None, None


_fused_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedAttention(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom ops, without the dispatcher's
    cost per call (schema checks, alias analysis, autograd wrapping: ~75 us host time)."""

    @staticmethod
    def forward(ctx, q, k, v, k_img, v_img, schedule, scale, lse_grad, deterministic, build):
        out, lse, u, lse1 = fused_fwd(q, k, v, k_img, v_img, schedule, scale)
        # U and its LSE go through save_for_backward too: saved-tensor hooks (activation
        # offloading, the saved-bytes tests) see everything the backward keeps
        ctx.save_for_backward(q, k, v, k_img, v_img, out, lse, u, lse1)
        ctx.schedule, ctx.scale, ctx.deterministic, ctx.build = schedule, scale, deterministic, build
        ctx.set_materialize_grads(False)
        if not lse_grad:  # the caller drops the LSE: one differentiable output less to track
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, k_img, v_img, out, lse, u, lse1 = ctx.saved_tensors
        if dout is None:  # only the LSE was used downstream
            dout = torch.zeros_like(out)
        grads = fused_bwd(dout, q, k, v, k_img, v_img, out, lse, u, lse1, ctx.schedule, ctx.scale, dlse,
                          ctx.deterministic, ctx.build)
        return *grads, None, None, None, None, None


def fused_attention(q, k, v, k_img, v_img, schedule: Schedule, scale: float, lse_grad: bool = True,
                    deterministic: bool = True, bwd_build: str | None = None):
    """(out, lse) of the fused op, both differentiable in q, k, v, k_img, v_img (a gradient of
    the LSE, e.g. from merging partial attentions, enters the backward through Delta);
    inputs validated by :func:`vb_kernels.videobooth_attention`. ``lse_grad=False``: the caller
    drops the LSE (it is returned non-differentiable in eager mode: less autograd work).

    Under ``torch.compile`` the call is the custom op ``videobooth::fused_fwd`` (one opaque node,
    fullgraph); in eager mode it runs the same host functions directly (an autograd.Function when
    a gradient is needed, else plain calls): the dispatcher is most of the host time of a call.
    ``bwd_build``: the backward build of this call (None: the innermost ``backward_build`` block,
    else ``VB_BWD``, else ``auto``; :mod:`.choice`), fixed now for the backward."""
    build = requested_build(bwd_build)
    if torch.compiler.is_compiling():
        refs = [r for row in schedule.refs for r in row]
        out, lse, _, _ = _fused_fwd_op(q, k, v, k_img, v_img, refs, schedule.num_refs,
                                       list(schedule.keyframes), schedule.image_everywhere, scale, deterministic,
                                       build)
        return out, lse
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            k_img is not None and (k_img.requires_grad or v_img.requires_grad))):
        return _FusedAttention.apply(q, k, v, k_img, v_img, schedule, scale, lse_grad, deterministic, build)
    out, lse, _, _ = fused_fwd(q, k, v, k_img, v_img, schedule, scale)
    return out, lse
