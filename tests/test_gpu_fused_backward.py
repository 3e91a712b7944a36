"""The fused backward on a GPU: what the interpreter (one program at a time, in grid order) cannot
get wrong. N 4096 with several launch groups and a short last one, image tokens longer than the
frames (M > N), two CUDA streams running the fused backward at once, CUDA-graph capture and
replay, the semaphores' final counts. Each test is small: ``pytest tests -m gpu`` has 120 s for
everything in bench.gpu_run, and bench.warm compiles these binaries first
(``attention_cases.GPU_FUSED_CASES`` and ``GPU_GRAPH_SHAPE`` in ``gpu_triton_calls``)."""
from __future__ import annotations

import pytest
import torch

from attention_cases import (GPU_FUSED_BUILDS, GPU_FUSED_CASES, GPU_GRAPH_SHAPE, GPU_GROUPS_SHAPE, named_schedule,
                             needs_cuda)
from bench.smoke import LaunchRecorder, check_semaphores
from vb_kernels import videobooth_attention
from vb_kernels.impl.fused import backward, launch
from vb_kernels.testing import TOLERANCE, make_inputs, rel_err

pytestmark = [needs_cuda(), pytest.mark.gpu]

NAMES = ("q", "k", "v", "k_img", "v_img")
BF16 = torch.bfloat16
TOL_OUT, TOL_GRAD = TOLERANCE[BF16], 5 * TOLERANCE[BF16]  # as test_attention_backward's 16-bit gradients


def _inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    ins = make_inputs(*shape, dtype=BF16, device="cuda", strided=True, generator=gen)
    grad = torch.randn(*shape[:5], generator=gen).to("cuda", BF16)
    return ins, grad


def _leaves(ins, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ins]


def _forward(leaves, sched, build, deterministic=True, backend="triton"):
    kw = dict(bwd_build=build, deterministic=deterministic) if backend == "triton" else {}
    return videobooth_attention(*leaves, schedule=sched, backend=backend, **kw)


def _grads(leaves):
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _run(ins, grad, sched, build, deterministic=True, backend="triton", dtype=None):
    """Forward and backward on fresh leaves: (output, the five gradients)."""
    leaves = _leaves(ins, dtype)
    out = _forward(leaves, sched, build, deterministic, backend)
    out.backward(grad.to(out.dtype))
    return out.detach(), _grads(leaves)


def _oracle(ins, grad, sched, shape):
    """The float64 reference where its scores fit easily, else SDPA in fp32 (N 4096)."""
    big = shape[2] * (shape[5] + 2 * shape[2]) * shape[1] * shape[3] * shape[0] > 1 << 27
    return _run(ins, grad, sched, None, backend="sdpa" if big else "reference",
                dtype=torch.float32 if big else torch.float64)


def _assert_close(out, grads, ref, what):
    ref_out, ref_grads = ref
    assert rel_err(out, ref_out) < TOL_OUT, (what, "out", rel_err(out, ref_out))
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == BF16 and g.shape == r.shape, (what, name)
        assert rel_err(g, r) < TOL_GRAD, (what, name, rel_err(g, r))


def _assert_equal(a, b, what):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b), (what, "out")
    for name, x, y in zip(NAMES, grads_a, grads_b):
        assert torch.equal(x, y), (what, name)


def _dkv_grids(ins, grad, sched, build="fused", deterministic=True):
    rec = LaunchRecorder()
    with launch.intercept(rec):
        out = _run(ins, grad, sched, build, deterministic)
    torch.cuda.synchronize()
    return out, rec


@pytest.mark.parametrize("shape, schedule_name", GPU_FUSED_CASES, ids=["N4096-groups", "M-gt-N"])
def test_fused_builds_at_launch_groups_and_m_gt_n_on_gpu(shape, schedule_name):
    """N 4096 with 3 launch groups of the fused pass (16, 16, 4 chains: the last group's missing
    chains exit), and M > N (the image target has more key blocks than a frame's, whose extra
    blocks exit): every build against the oracle, the fused builds against the split pair, and
    the ordered build bitwise the same on a second run."""
    sched = named_schedule(schedule_name, shape[1])
    ins, grad = _inputs(shape, seed=0)
    ref = _oracle(ins, grad, sched, shape)
    fused, rec = _dkv_grids(ins, grad, sched)
    phase2 = rec.dkv[0]  # the backward runs phase 2 first
    group, key_blocks, n_groups = phase2["grid"]
    n, m, block_n = shape[2], shape[5], int(phase2["BLOCK_N"])
    if shape == GPU_GROUPS_SHAPE:  # the premise: several groups, the last one short
        want = backward.order_group(int(phase2["n_qt"]), True, ins[0].device)
        assert group == min(int(phase2["n_chain"]), want) and n_groups >= 3, phase2["grid"]
        assert int(phase2["n_chain"]) % group != 0, (phase2["n_chain"], group)
    else:  # the premise: the image's key blocks outnumber a frame's
        assert key_blocks == -(-m // block_n) > -(-n // block_n), (phase2["grid"], block_n)
    runs = {}
    for build, det in GPU_FUSED_BUILDS:
        what = f"{build}{'' if det else ' atomic'}"
        runs[what] = fused if (build, det) == ("fused", True) else _run(ins, grad, sched, build, det)
        _assert_close(*runs[what], ref, what)
    for what in ("fused", "fused atomic"):
        _assert_close(*runs[what], runs["split"], what + " vs split")
    _assert_equal(_run(ins, grad, sched, "fused"), fused, "ordered build, second run")


@pytest.mark.parametrize("shape, schedule_name", GPU_FUSED_CASES, ids=["N4096-groups", "M-gt-N"])
def test_final_semaphore_counts_on_gpu(shape, schedule_name):
    """After each backward phase every semaphore of the ordered build holds (key blocks of its
    source) x THREADS: every block of every chain added and released once, in every group
    (the short last one too) and for sources of both lengths (M > N)."""
    sched = named_schedule(schedule_name, shape[1])
    ins, grad = _inputs(shape, seed=1)
    _, rec = _dkv_grids(ins, grad, sched)
    res = check_semaphores(rec.dkv, sched, has_image=shape[5] > 0)
    assert res["ok"], res
    assert res["multiples"] and res["total"] == res["expected_total"] > 0 and res["wrong_tiles"] == 0, res
    # the atomic build has no semaphores: nothing recorded as ordered
    _, rec = _dkv_grids(ins, grad, sched, deterministic=False)
    assert rec.dkv and not any(a["DETERMINISTIC"] for a in rec.dkv)


def test_two_streams_run_the_fused_backward_at_once_on_gpu():
    """Two clips' forward and backward on two CUDA streams, enqueued back to back so that their
    kernels overlap on the device (checked with events): each result bitwise the same as the
    same clip run alone (separate semaphores and partials per call, blocks of two grids
    interleaved on the SMs)."""
    shape = GPU_GROUPS_SHAPE
    sched = named_schedule("videobooth", shape[1])
    clips = [_inputs(shape, seed) for seed in (2, 3)]
    alone = [_run(ins, grad, sched, "fused") for ins, grad in clips]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    overlapped = False
    for _round in range(3):
        leaves = [_leaves(ins) for ins, _ in clips]
        base = torch.cuda.Event(enable_timing=True)
        base.record()
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        outs, marks = [], []
        for s, lv in zip(streams, leaves):
            with torch.cuda.stream(s):
                outs.append(_forward(lv, sched, "fused"))
        for s, out, (_, grad) in zip(streams, outs, clips):
            with torch.cuda.stream(s):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out.backward(grad)
                end.record()
                marks.append((start, end))
        torch.cuda.synchronize()
        (a0, a1), (b0, b1) = [(base.elapsed_time(x), base.elapsed_time(y)) for x, y in marks]
        overlapped |= b0 < a1 and a0 < b1
        for i, (out, lv) in enumerate(zip(outs, leaves)):
            _assert_equal((out.detach(), _grads(lv)), alone[i], f"stream {i}, round {_round}")
    assert overlapped, "the two backward passes never overlapped on the device: the test did not test concurrency"


@pytest.mark.parametrize("build", ["split", "fused"])
def test_cuda_graph_capture_and_replay_on_gpu(build):
    """Forward and backward captured in a CUDA graph (static inputs, as torch.cuda.graphs asks:
    warmed up on a side stream first), replayed twice on new inputs copied in: each replay
    bitwise the eager result (the semaphores' zero fill and the partials are part of the graph,
    not left over from the capture)."""
    shape = GPU_GRAPH_SHAPE
    sched = named_schedule("videobooth", shape[1])
    ins, grad = _inputs(shape, seed=4)
    leaves = _leaves(ins)
    static_grad = grad.clone()

    def step():
        out = _forward(leaves, sched, build)
        out.backward(static_grad)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    static_grads = [t.grad for t in leaves]
    assert all(g is not None for g in static_grads)
    for seed in (5, 6):
        new, new_grad = _inputs(shape, seed)
        with torch.no_grad():
            for t, x in zip(leaves, new):
                t.copy_(x)
            static_grad.copy_(new_grad)
        graph.replay()
        torch.cuda.synchronize()
        eager = _run(new, new_grad, sched, build)
        _assert_equal((static_out.detach().clone(), [g.clone() for g in static_grads]), eager,
                      f"{build}: replay on inputs {seed}")
    del graph
