"""Backward of the VideoBooth attention op: gradients of every backend against float64
autograd of the reference, determinism, the value refresh, and a drop-in training check."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from attention_cases import (GPU_DETERMINISM_SHAPE, GPU_FP32_HEAD_DIMS, GPU_GRAD_CASES, GPU_GRAD_SHAPES, SCHEDULES,
                             gpu_fp32_shape, named_schedule, needs_cuda)
from vb_kernels import Schedule, videobooth_attention
from vb_kernels.testing import TOLERANCE, make_inputs, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "k_img", "v_img")


def _grads(backend, ins, schedule, grad_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    out = videobooth_attention(*leaves, schedule=schedule, backend=backend)
    out.backward(grad_out.to(out.dtype))
    # an input the schedule never reads gets None from autograd and zeros from the fused op
    return out, [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t))
                 for t in leaves]


def _check_grads(backend, schedule, shape, dtype, seed=0):
    b, f, n, h, d, m = shape
    torch.manual_seed(seed)
    ins = make_inputs(b, f, n, h, d, m, dtype=dtype, device=DEV, strided=True)
    grad_out = torch.randn(b, f, n, h, d, device=DEV)
    out, grads = _grads(backend, ins, schedule, grad_out)
    ref_out, ref_grads = _grads("reference", [None if t is None else t.double() for t in ins],
                                schedule, grad_out.double())
    assert rel_err(out, ref_out) < TOLERANCE[dtype]
    for name, g, r in zip(NAMES, grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape and g.dtype == dtype, name
        tol = TOLERANCE[dtype] * (5 if dtype != torch.float32 else 1)
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
def test_gradients_match_reference_on_every_schedule(backend, schedule_name):
    if backend == "flex" and DEV == "cpu":
        pytest.skip("FlexAttention has no backward on CPU (torch raises NotImplementedError); "
                    "flex gradients are tested on a GPU")
    _check_grads(backend, named_schedule(schedule_name, 4), (1, 4, 17, 2, 40, 9), torch.float32)


@pytest.mark.parametrize("shape", [
    (1, 3, 17, 1, 72, None),   # no image: phase 1 is the keyframe's self-attention
    (1, 3, 17, 1, 40, 0),      # M = 0 is the same as no image
    (1, 1, 20, 2, 40, 7),      # F = 1
    (2, 3, 33, 1, 16, 40),     # M > N, odd N across three tiles
    (1, 2, 9, 1, 80, 5),       # head dim split 64 + 16
    (1, 2, 9, 1, 160, 5),      # head dim split 128 + 32
], ids=lambda s: "B{}F{}N{}H{}D{}M{}".format(*s))
@pytest.mark.parametrize("schedule_name", ["videobooth", "random1"])
def test_triton_gradients_odd_shapes(shape, schedule_name):
    _check_grads("triton", named_schedule(schedule_name, shape[1]), shape, torch.float32)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_lse_is_differentiable(backend):
    """Merging partial attentions goes through the LSE: its gradient must flow on every backend."""
    torch.manual_seed(0)
    sched = named_schedule("random1", 3)
    ins = make_inputs(1, 3, 17, 2, 40, 9, device=DEV)
    w_out, w_lse = torch.randn(1, 3, 17, 2, 40, device=DEV), torch.randn(1, 3, 17, 2, device=DEV)
    grads = {}
    for be, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in ins]
        out, lse = videobooth_attention(*leaves, schedule=sched, backend=be, return_lse=True)
        ((out * w_out.to(dtype)).sum() + (lse * w_lse).sum()).backward()
        grads[be if dtype == torch.float32 else "ref"] = [
            t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    for name, g, r in zip(NAMES, grads[backend], grads["ref"]):
        assert rel_err(g, r) < 1e-5, (name, rel_err(g, r))
    if backend == "triton":  # the LSE alone also carries a gradient
        leaves = [t.detach().requires_grad_() for t in ins]
        _, lse = videobooth_attention(*leaves, schedule=sched, backend="triton", return_lse=True)
        lse.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_unread_keyframe_is_skipped_exactly():
    """A keyframe no frame reads changes nothing: phase 1 skips it, gradients stay exact."""
    sched = Schedule([[0, 0], [0, 1], [1, 1]], keyframes=(0, 2))  # frame 2 is read by nobody
    assert [f for f, _ in sched.plan(True)[0].rows] == [0]
    _check_grads("triton", sched, (1, 3, 17, 1, 40, 5), torch.float32)


def test_triton_gradients_fp16():
    _check_grads("triton", named_schedule("keyframes2", 3), (1, 3, 17, 2, 40, 9), torch.float16)


def test_gradient_flows_through_the_value_refresh():
    """dV of the keyframe reaches only through U (phase 1), and the image gets gradient only
    through U when image_everywhere is off: both must be nonzero and match the reference."""
    sched = Schedule.first(3)
    _check_grads("triton", sched, (1, 3, 17, 1, 16, 5), torch.float32)
    torch.manual_seed(0)
    ins = make_inputs(1, 3, 17, 1, 16, 5, device=DEV)
    _, grads = _grads("triton", ins, sched, torch.randn(1, 3, 17, 1, 16, device=DEV))
    assert grads[2][:, 0].abs().sum() > 0 and grads[4].abs().sum() > 0
    assert grads[2][:, 1:].abs().sum() == 0  # frames 1, 2 are never read under "first"


def test_backward_is_deterministic():
    torch.manual_seed(0)
    ins = make_inputs(1, 4, 33, 2, 40, 9, device=DEV, strided=True)
    g = torch.randn(1, 4, 33, 2, 40, device=DEV)
    sched = named_schedule("random2", 4)
    _, first = _grads("triton", ins, sched, g)
    _, second = _grads("triton", ins, sched, g)
    for a, b in zip(first, second):
        assert a is None or torch.equal(a, b)


def test_poisoned_gradients_are_all_written(monkeypatch):
    from vb_kernels.impl.fused import function

    monkeypatch.setattr(function, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    monkeypatch.setattr(function, "_alloc_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    _check_grads("triton", named_schedule("random0", 3), (1, 3, 17, 1, 40, 5), torch.float32)


@pytest.mark.parametrize("schedule, shape, tiles", [
    (Schedule.videobooth(4), (1, 4, 9, 1, 40, 5), None),        # frame 3 unread; image read in phase 1 only
    (Schedule.keyframes(4, 2), (1, 4, 9, 1, 16, None), None),   # two U slots: dV of keyframes zeroed by phase 2
    (Schedule([[0], [0], [0]], (0, 2)), (1, 3, 9, 1, 16, 3), None),  # keyframe 2 unread, never refreshed
    (Schedule.videobooth(3), (1, 3, 9, 1, 160, 5), "dkv=16,64,4,1;dkvq=16,64,4,1"),  # dK and dV in two launches (PART)
], ids=["videobooth", "keyframes2", "unread-keyframe", "split-parts"])
def test_gradients_are_written_without_fills(monkeypatch, schedule, shape, tiles):
    """The backward allocates dK, dV and the image gradients unfilled: phase 2 writes every
    element (zeros for unread frames, unread image tokens and the keyframes' own V), phase 1
    adds. NaN-poisoned buffers show any element left unwritten."""
    from vb_kernels.impl.fused import function

    monkeypatch.setattr(function, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    monkeypatch.setattr(function, "_alloc_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    if tiles:
        monkeypatch.setenv("VB_TILES", tiles)
    _check_grads("triton", schedule, shape, torch.float16 if tiles else torch.float32)


@pytest.mark.parametrize("schedule, shape, tiles", [
    (Schedule.videobooth(5), (1, 5, 9, 2, 40, 5), "readers=2"),      # the anchor's 5 readers: 3 chunks
    (Schedule.videobooth(5).with_image_everywhere(), (1, 5, 9, 1, 16, 7), "readers=1"),  # image + anchor
    (Schedule.keyframes(6, 2), (1, 6, 9, 1, 16, 4), "readers=1"),    # phase 1 splits the image too (adds)
    (Schedule.videobooth(4), (1, 4, 9, 1, 160, 5), "readers=2;dkv=16,64,4,1;dkvq=16,64,4,1"),  # with split dK/dV launches
], ids=["anchor", "image-everywhere", "phase1", "split-parts"])
def test_split_readers_match_reference_and_are_deterministic(monkeypatch, schedule, shape, tiles):
    """Targets read by many rows split into chunks (fp32 partials + an ordered reduction):
    gradients equal the float64 reference, every buffer (partials too) is written (NaN poison),
    the reduction runs, and two runs give the same bits."""
    from vb_kernels.impl.fused import function, launch

    monkeypatch.setattr(function, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    monkeypatch.setattr(function, "_alloc_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    monkeypatch.setenv("VB_TILES", tiles)
    names = []

    def run(kern, grid, args, kwargs):
        names.append(kern.__name__)
        kern[grid](*args, **kwargs)

    dtype = torch.float16 if shape[4] == 160 else torch.float32
    with launch.intercept(run):
        _check_grads("triton", schedule, shape, dtype)
    assert "_bwd_reduce_kernel" in names, names
    torch.manual_seed(1)
    ins = make_inputs(*shape, dtype=dtype, device=DEV)
    g = torch.randn(*shape[:5], device=DEV)
    first, second = _grads("triton", ins, schedule, g)[1], _grads("triton", ins, schedule, g)[1]
    assert all(a is None or torch.equal(a, b) for a, b in zip(first, second))


def test_chunk_targets_keeps_readers_in_order_heaviest_first():
    from vb_kernels.schedule import chunk_targets

    _, p2 = Schedule.videobooth(7).with_image_everywhere().plan(True)
    targets = p2.targets()
    chunks, reductions = chunk_targets(targets, 3)
    assert all(len(rd) <= 3 for _, rd, _ in chunks)
    lengths = [len(rd) for _, rd, _ in chunks]
    assert lengths == sorted(lengths, reverse=True)  # heaviest first, unread (0 readers) last
    for src, readers in targets:  # each target's chunks, by slot, are its readers in row order
        parts = sorted((p, rd) for s, rd, p in chunks if s == src)
        assert tuple(r for _, rd in parts for r in rd) == readers
        split = [red for red in reductions if red[0] == src]
        if len(readers) > 3:
            (_, first, count), = split
            assert [p for p, _ in parts] == list(range(first, first + count)) and count == -(-len(readers) // 3)
        else:
            assert not split and [p for p, _ in parts] == [-1]
    assert chunk_targets(targets, None) == (tuple((s, rd, -1) for s, rd in targets), ())


def test_reader_cap_splits_only_small_grids():
    from vb_kernels.impl.fused.backward import reader_cap

    cpu = torch.device("cpu")
    counts = (16,) + (1,) * 14 + (0,)  # the paper's schedule at F = 16: the anchor and 14 previous frames
    # the 64-token level (one key block, B*H = 16): the anchor's programs would trail -> capped
    assert reader_cap(counts, 1, 16, True, cpu, None) == 4
    # the 4096-token level (64 key blocks): plenty of work per SM -> one program per target
    assert reader_cap(counts, 64, 16, True, cpu, None) is None
    assert reader_cap(counts, 1, 16, False, cpu, None) is None  # interpreter tiles: never unless forced
    assert reader_cap(counts, 64, 16, False, cpu, "readers=2") == 2
    assert reader_cap((2, 1), 1, 1, True, cpu, "readers=2") is None  # nothing above the cap


def _dkv_balance():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "tools" / "dkv_balance.py"
    spec = importlib.util.spec_from_file_location("dkv_balance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_balances_the_dkv_launch_in_the_model():
    """tools/dkv_balance.py's greedy model: the split brings the 64-token level's dK/dV launch
    from about 4.4x its ideal to within 15%, and leaves large levels alone."""
    mod = _dkv_balance()
    small = mod.balance(Schedule.videobooth(16), 64, 2, 8, 40, 132)
    assert small["unsplit"] > 4 and small["split"] < 1.15 and small["cap"] == 4
    large = mod.balance(Schedule.videobooth(16), 4096, 2, 8, 40, 132)
    assert large["cap"] is None and large["split"] == large["unsplit"] < 1.02


@pytest.mark.parametrize("n_chains, key_blocks, group", [(272, 32, 16), (7, 3, 2), (5, 4, 16), (1, 1, 2)])
def test_launch_order_runs_each_chain_in_key_block_order(n_chains, key_blocks, group):
    """The fused pass's grouped launch order: every (chain, key block) once; within a chain the
    key blocks in order (a wait only ever targets an earlier program), one group apart."""
    from vb_kernels.impl.fused.backward import launch_order

    order = launch_order(n_chains, key_blocks, group)
    assert sorted(order) == [(c, j) for c in range(n_chains) for j in range(key_blocks)]
    at = {cj: i for i, cj in enumerate(order)}
    for c in range(n_chains):
        size = min(group, n_chains - c // group * group)
        assert all(at[c, j] - at[c, j - 1] == size for j in range(1, key_blocks))


def test_order_group_keeps_a_few_steps_between_key_blocks():
    from vb_kernels.impl.fused.backward import order_group

    cpu = torch.device("cpu")  # a CPU tensor under cuda_tiles(): 132 SMs
    assert [order_group(n_qt, True, cpu) for n_qt in (64, 16, 4, 1)] == [16, 48, 64, 64]
    assert order_group(64, False, cpu) == 2  # the interpreter: its tests cross groups


def test_grouped_order_hides_the_ordered_adds_in_the_model():
    """tools/dkv_balance.py --order at N = 4096 with a release latency of 2 steps: launched key
    blocks fastest, the chain's blocks start together and the ordered adds cost over 10% against
    atomic ones (the model's positive control); in the grouped order under 2%."""
    mod = _dkv_balance()
    steps, key_blocks, n_qt = mod.chain_steps(Schedule.videobooth(16), 4096, 2, 8, 40)
    group = min(len(steps), mod.order_group(n_qt, True, torch.device("cpu")))
    span = {(g, o): mod.ordered_makespan(steps, key_blocks, 132, g, 2.0, 0.2, o)
            for g in (None, group) for o in (True, False)}
    assert span[None, True] > 1.1 * span[None, False]
    assert span[group, True] < 1.02 * span[group, False]


# ---- the fused backward (issue 20): dK, dV and dQ in one KV-major pass ----------------------------
def _sems(monkeypatch):
    """Record the fused backward's semaphore buffers (regions of the call's workspace, zeroed
    through function._init_semaphores before each phase)."""
    from vb_kernels.impl.fused import function

    made = []

    def init(sem):
        sem.zero_()
        made.append(sem)

    monkeypatch.setattr(function, "_init_semaphores", init)
    return made


@pytest.mark.parametrize("schedule_name, shape, dtype", [
    ("random2", (1, 4, 33, 2, 40, 9), torch.float32),
    ("videobooth", (1, 5, 20, 1, 80, 7), torch.float16),
], ids=["fp32", "fp16"])
def test_fused_backward_is_bit_identical_across_runs(monkeypatch, schedule_name, shape, dtype):
    monkeypatch.setenv("VB_BWD", "fused")
    torch.manual_seed(0)
    ins = make_inputs(*shape, dtype=dtype, device=DEV, strided=True)
    g = torch.randn(*shape[:5], device=DEV)
    sched = named_schedule(schedule_name, shape[1])
    runs = [_grads("triton", ins, sched, g)[1] for _ in range(2)]
    for other in runs[1:]:
        assert all(a is None or torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("schedule", [Schedule.videobooth(4), Schedule.keyframes(5, 2).with_image_everywhere()],
                         ids=["videobooth", "keyframes-image-everywhere"])
def test_dq_contributions_are_added_in_key_block_order(monkeypatch, schedule):
    """Every (source slot, batch*head, row, query tile) semaphore ends at (key blocks of that
    source) x THREADS: each key block added once, and the order check inside the kernel
    checked that block j found exactly j blocks done (the interpreter runs the grid in order);
    slots beyond a row's sources stay 0."""
    from vb_kernels.impl.fused.forward import block_config

    monkeypatch.setenv("VB_BWD", "fused")
    sems = _sems(monkeypatch)
    b, f, n, h, d, m = 1, schedule.num_frames, 37, 2, 40, 21
    torch.manual_seed(0)
    ins = make_inputs(b, f, n, h, d, m, device=DEV)
    _grads("triton", ins, schedule, torch.randn(b, f, n, h, d, device=DEV))
    cfg = block_config(d, torch.device(DEV), "dkvq", n_queries=n, n_keys=max(n, m), elem_bytes=4)
    threads, n_qt = 32 * cfg["num_warps"], -(-n // cfg["BLOCK_M"])
    blocks = {-1: -(-m // cfg["BLOCK_N"])}  # image tokens, then frames
    phase1, phase2 = schedule.plan(True)
    assert len(sems) == (2 if phase1.rows else 1)
    for sem, plan in zip(sems, (phase2, phase1)):  # phase 2's backward runs first
        slots = max(len(srcs) for _, srcs in plan.rows)
        counts = sem.view(slots, b * h, len(plan.rows), n_qt)
        for r, (_, srcs) in enumerate(plan.rows):
            for s in range(slots):
                want = blocks.get(srcs[s].frame, -(-n // cfg["BLOCK_N"])) * threads if s < len(srcs) else 0
                assert (counts[s, :, r] == want).all(), (r, s, counts[s, :, r], want)


def test_dq_order_assert_fires_when_a_block_is_out_of_order(monkeypatch):
    """Positive control of the order check: semaphores that already count one key block make
    block 0 find a predecessor that did not run, and the interpreter stops there."""
    from vb_kernels.impl.fused import function

    if DEV != "cpu":
        pytest.skip("the order assert is the interpreter's (on a GPU the block would wait)")
    monkeypatch.setenv("VB_BWD", "fused")
    monkeypatch.setattr(function, "_init_semaphores", lambda sem: sem.fill_(32))
    ins = make_inputs(1, 3, 17, 1, 40, 5, device=DEV)
    with pytest.raises(Exception, match="Assume failed"):  # the order check (backward.py, _dq_partial)
        _grads("triton", ins, Schedule.videobooth(3), torch.randn(1, 3, 17, 1, 40, device=DEV))


@pytest.mark.parametrize("shape, dtype, tiles", [
    ((1, 3, 17, 1, 72, None), torch.float32, None),      # no image, head dim 64 + 16 (8 masked)
    ((2, 3, 33, 1, 16, 40), torch.float32, None),        # M > N, odd N across tiles
    ((1, 2, 9, 1, 80, 5), torch.float16, None),          # 64 + 32 chunks
    ((1, 3, 9, 1, 160, 5), torch.float16, "dkvq=16,64,4,1"),  # dK and dV in two launches (PART): dQ in the dK one
    ((1, 5, 9, 2, 40, 5), torch.float32, "readers=2"),   # split targets: chunks of readers, partial dK/dV
], ids=["D72-noimg", "M>N", "D80-fp16", "D160-parts", "split-targets"])
def test_forced_fused_backward_on_odd_shapes_writes_everything(monkeypatch, shape, dtype, tiles):
    """VB_BWD=fused at every head dim (VB_BWD=auto takes it at D <= 64 only), with every
    allocated buffer NaN-poisoned: the gradients equal the float64 oracle's."""
    from vb_kernels.impl.fused import function

    monkeypatch.setenv("VB_BWD", "fused")
    if tiles:
        monkeypatch.setenv("VB_TILES", tiles)
    monkeypatch.setattr(function, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    monkeypatch.setattr(function, "_alloc_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    _check_grads("triton", named_schedule("random1" if shape[1] >= 3 else "videobooth", shape[1]), shape, dtype)


@pytest.mark.parametrize("schedule_name", ["videobooth", "random1"])
def test_atomic_dq_matches_reference(monkeypatch, schedule_name):
    """deterministic=False: dQ by atomic adds into one zeroed slot; gradients as the oracle's."""
    monkeypatch.setenv("VB_BWD", "fused")
    torch.manual_seed(0)
    shape = (1, 4, 17, 2, 40, 9)
    ins = make_inputs(*shape, device=DEV, strided=True)
    g = torch.randn(*shape[:5], device=DEV)
    sched = named_schedule(schedule_name, 4)
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    videobooth_attention(*leaves, schedule=sched, backend="triton", deterministic=False).backward(g)
    _, ref = _grads("reference", [t.double() for t in ins], sched, g.double())
    for name, t, r in zip(NAMES, leaves, ref):
        assert rel_err(t.grad, r) < TOLERANCE[torch.float32], name
    with pytest.raises(TypeError, match="deterministic: expected a bool"):
        videobooth_attention(*ins, schedule=sched, backend="triton", deterministic="yes")


def _recorder(names):
    def run(kern, grid, args, kwargs):
        names.append(kern.__name__)
        kern[grid](*args, **kwargs)
    return run


def test_default_build_is_the_split_pair_until_a_gpu_result_says_otherwise(monkeypatch):
    """VB_BWD unset is auto, and auto is the build that has run on a GPU: the split pair at every
    head dim, in the interpreter, on CUDA and for the compile report's sm_90 target, while
    choice.FUSED_VERIFIED holds no committed result. With an entry for a device class, auto takes
    the fused build there, at the head dims it covers, from Hopper on only, and says which file
    let it."""
    from vb_kernels.impl.fused import aot, backward, choice, launch

    monkeypatch.delenv("VB_BWD", raising=False)
    assert choice.FUSED_VERIFIED == {}  # nothing committed yet: when a GPU result lands, cite it here
    names = []
    for d in (40, 80):
        names.clear()
        with launch.intercept(_recorder(names)):
            _check_grads("triton", named_schedule("videobooth", 3), (1, 3, 9, 1, d, 5), torch.float32)
        assert "_bwd_dq_kernel" in names and "_bwd_delta_kernel" not in names, (d, names)
    tensors = aot.make_tensors(1, 3, 64, 1, 40, 16, torch.float16, "processor")
    for arch in (80, 90):
        assert "_bwd_dq_kernel" in {kern.__name__ for kern, *_ in aot.record_launches(*tensors, arch=arch)}, arch
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    capability = launch._capability.__wrapped__
    assert backward.auto_build(40, cpu) == "split"
    monkeypatch.setitem(choice.FUSED_VERIFIED, "H100", (64, "bench/results/nvidia-h100/bwd_builds.md"))
    monkeypatch.setattr(choice, "device_name", lambda device: "NVIDIA H100 80GB HBM3" if device.type == "cuda" else None)
    for arch, d, want in ((90, 40, "fused"), (90, 64, "fused"), (90, 80, "split"), (80, 40, "split"),
                          (100, 40, "fused")):
        monkeypatch.setattr(launch, "_capability", lambda device, arch=arch: arch)
        assert backward.auto_build(d, gpu) == want, (arch, d)
    assert choice.fused_verified(40, 90, "NVIDIA H100 80GB HBM3") == "bench/results/nvidia-h100/bwd_builds.md"
    assert choice.fused_verified(40, 90, "NVIDIA H200") is None  # another device class: its own result
    assert backward.auto_build(40, cpu) == "split"  # the interpreter is no device class
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert capability(torch.device("cuda", 0)) == 89


def test_build_per_call_and_per_block(monkeypatch):
    """The build a call takes: its bwd_build keyword, else the innermost backward_build block
    (kept for the backward, which runs after the block), else VB_BWD, else auto. Bad names get
    an error that lists the choices."""
    import vb_kernels
    from vb_kernels.impl.fused import launch

    monkeypatch.setenv("VB_BWD", "split")
    sched = named_schedule("videobooth", 3)
    ins = make_inputs(1, 3, 9, 1, 40, 5, device=DEV, dtype=torch.float32)
    names = []

    def kernels(call):
        names.clear()
        leaves = [t.detach().clone().requires_grad_() for t in ins]
        with launch.intercept(_recorder(names)):
            out = call(leaves)
            out.sum().backward()  # outside any block the call opened
        return "fused" if "_bwd_delta_kernel" in names else "split" if "_bwd_dq_kernel" in names else None

    attend = functools.partial(videobooth_attention, schedule=sched, backend="triton")
    assert kernels(lambda x: attend(*x)) == "split"  # VB_BWD
    assert kernels(lambda x: attend(*x, bwd_build="fused")) == "fused"  # the keyword

    def scoped(x, build="fused", **kw):
        with vb_kernels.backward_build(build):
            return attend(*x, **kw)
    assert kernels(scoped) == "fused"  # the block, though backward() runs after it
    assert kernels(lambda x: scoped(x, bwd_build="split")) == "split"  # the keyword wins over the block

    def nested(x):
        with vb_kernels.backward_build("split"):
            with vb_kernels.backward_build("fused"):
                first = attend(*x)
            return first + attend(*x)  # back in the outer block
    kernels(nested)  # one call of each build: as many fused phases (delta) as split ones (dq)
    assert names.count("_bwd_delta_kernel") == names.count("_bwd_dq_kernel") > 0, names
    with pytest.raises(ValueError, match="bwd_build: expected one of 'auto', 'split', 'fused', got 'fast'"):
        attend(*ins, bwd_build="fast")
    with pytest.raises(ValueError, match="backward_build: expected one of"):
        with vb_kernels.backward_build("sideways"):
            pass
    assert vb_kernels.BWD_BUILDS == ("auto", "split", "fused")


@pytest.mark.parametrize("schedule_name", ["videobooth", "keyframes2"])
def test_split_build_still_matches_reference(monkeypatch, schedule_name):
    """VB_BWD=split runs the 7-matmul pair (Q-major dQ + KV-major dK/dV), VB_BWD=fused the 5-matmul
    pass (Delta kernel, KV-major dK/dV/dQ, dQ reduction), VB_BWD=auto (the default) is split."""
    from vb_kernels.impl.fused import launch

    monkeypatch.setenv("VB_BWD", "split")
    names = []

    def run(kern, grid, args, kwargs):
        names.append(kern.__name__)
        kern[grid](*args, **kwargs)

    with launch.intercept(run):
        _check_grads("triton", named_schedule(schedule_name, 4), (1, 4, 17, 2, 40, 9), torch.float32)
    assert "_bwd_dq_kernel" in names and "_bwd_dq_reduce_kernel" not in names
    names.clear()
    monkeypatch.setenv("VB_BWD", "fused")
    with launch.intercept(run):
        _check_grads("triton", named_schedule(schedule_name, 4), (1, 4, 17, 2, 40, 9), torch.float32)
    assert "_bwd_dq_kernel" not in names and {"_bwd_delta_kernel", "_bwd_dq_reduce_kernel"} <= set(names)
    for d, want in ((40, "_bwd_dq_kernel"), (80, "_bwd_dq_kernel")):  # auto: split (nothing verified yet)
        names.clear()
        monkeypatch.setenv("VB_BWD", "auto")
        with launch.intercept(run):
            _check_grads("triton", named_schedule(schedule_name, 4), (1, 4, 9, 1, d, 5), torch.float32)
        assert want in names, (d, names)
    monkeypatch.setenv("VB_BWD", "sideways")
    with pytest.raises(ValueError, match="VB_BWD: expected one of 'auto', 'split', 'fused', got 'sideways'"):
        _check_grads("triton", named_schedule(schedule_name, 4), (1, 4, 9, 1, 40, 5), torch.float32)


def test_frame_without_keys_is_rejected_at_the_door():
    ins = make_inputs(1, 2, 8, 1, 16, None, device=DEV)
    with pytest.raises(ValueError, match="frame 1 has no keys"):
        videobooth_attention(*ins, schedule=Schedule([[0], [-1]]), backend="triton")


class _TinyAttention(torch.nn.Module):
    """Projections + op + output projection: the shape of an attn1 layer."""

    def __init__(self, dim=32, heads=2, backend="reference", schedule=None):
        super().__init__()
        self.heads, self.backend, self.schedule = heads, backend, schedule
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_k_img, self.to_v_img = (torch.nn.Linear(dim, dim, bias=False) for _ in range(2))
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x, img):  # x: (B, F, N, C), img: (B, M, C)
        b, f, n, c = x.shape
        split = lambda t: t.view(*t.shape[:-1], self.heads, c // self.heads)  # noqa: E731
        out = videobooth_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)),
                                   split(self.to_k_img(img)), split(self.to_v_img(img)),
                                   schedule=self.schedule, backend=self.backend)
        return self.to_out(out.reshape(b, f, n, c))


def test_drop_in_training_matches_reference():
    """A few AdamW steps with backend="triton" end where backend="reference" ends."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 32, device=DEV)
    img = torch.randn(2, 5, 32, device=DEV)
    target = torch.randn(2, 3, 9, 32, device=DEV)
    sched = Schedule.keyframes(3, 2)
    models = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        model = _TinyAttention(backend=backend, schedule=sched).to(DEV)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x, img), target).backward()
            opt.step()
        models[backend] = model
    for (name, p_ref), (_, p_tri) in zip(models["reference"].named_parameters(),
                                         models["triton"].named_parameters()):
        assert rel_err(p_tri, p_ref) < 1e-5, name


def test_torch_compile_fullgraph_with_the_custom_op():
    """The op is a registered custom op, so a module calling it compiles without graph breaks."""
    torch.manual_seed(0)
    model = _TinyAttention(backend="triton", schedule=Schedule.videobooth(3)).to(DEV)
    x = torch.randn(1, 3, 9, 32, device=DEV, requires_grad=True)
    img = torch.randn(1, 5, 32, device=DEV)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = compiled(x, img)
    # nothing on the op's path for dynamo to warn about (it warned about functools.lru_cache)
    assert not [w for w in seen if "lru_cache" in str(w.message)], [str(w.message)[:200] for w in seen]
    out.square().sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    eager = model(x, img)
    eager.square().sum().backward()
    assert rel_err(out, eager) < 1e-6 and rel_err(g_compiled, x.grad) < 1e-6


@needs_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize("build", ["split", "fused"])
def test_backward_is_bitwise_deterministic_over_100_runs_on_gpu(monkeypatch, build):
    """Issue 20: 100 backward runs under real concurrency (every SM busy: the U-Net's 512 px top
    level, 16 frames, the paper's schedule, bf16) give the same bits. The fused build's dQ
    contributions meet in the ordered partials (semaphores), where a race would show."""
    monkeypatch.setenv("VB_BWD", build)
    torch.manual_seed(0)
    shape = GPU_DETERMINISM_SHAPE
    ins = make_inputs(*shape, dtype=torch.bfloat16, device=DEV, strided=True)
    g = torch.randn(*shape[:5], device=DEV)
    sched = named_schedule("videobooth", shape[1])
    first = _grads("triton", ins, sched, g)[1]
    for run in range(99):
        grads = _grads("triton", ins, sched, g)[1]
        for name, a, b in zip(NAMES, first, grads):
            assert a is None or torch.equal(a, b), (build, run, name)


@needs_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize("d", GPU_FP32_HEAD_DIMS)
def test_fp32_gradients_at_full_tiles_on_gpu(d):
    """fp32 takes its own (smaller) tiles: N large enough that none shrinks to the sequence."""
    _check_grads("triton", named_schedule("videobooth", 3), gpu_fp32_shape(d, True), torch.float32)


@needs_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize("impl, schedule_name, dtype", GPU_GRAD_CASES,
                         ids=[f"{i}-{s}-{str(d)[6:]}" for i, s, d in GPU_GRAD_CASES])
def test_gradients_on_gpu(monkeypatch, impl, schedule_name, dtype):
    """Every schedule and 16-bit dtype for both triton backward builds (the fused one has run on
    no GPU yet), FlexAttention on two (attention_cases.GPU_GRAD_CASES)."""
    if impl != "flex":
        monkeypatch.setenv("VB_BWD", impl)
    for shape in GPU_GRAD_SHAPES:
        _check_grads("flex" if impl == "flex" else "triton", named_schedule(schedule_name, shape[1]), shape, dtype)


@pytest.mark.parametrize("schedule_name, shape, dtype", [
    ("videobooth", (1, 3, 150, 2, 40, 70), torch.float16),   # U-Net head dim, tails in every tile kind
    ("keyframes2", (1, 5, 97, 1, 64, 130), torch.float16),   # phase 1, M > N
    ("random2", (2, 4, 65, 1, 40, 0), torch.float32),        # fp32 tiles, no image
    ("keyframes2", (1, 5, 70, 1, 128, 90), torch.float16),   # one 128 chunk, split targets reduced
    ("videobooth", (1, 3, 33, 2, 160, 0), torch.float16),    # 128 + 32 chunks, dK and dV in two launches
], ids=["D40-fp16", "D64-fp16-phase1", "D40-fp32", "D128-fp16", "D160-fp16"])
@pytest.mark.parametrize("build", ["split", "fused"])
def test_gpu_default_tiles_match_reference(monkeypatch, schedule_name, shape, dtype, build):
    """The tiles a CUDA launch takes by default (``_TILES``, shrunk to the sequence), run through
    the interpreter: its block sizes are the GPU's (warps and stages aside), so a default tile
    that breaks the masking or the tails fails here before it reaches a GPU."""
    from vb_kernels.impl.fused import launch

    if DEV != "cpu":
        pytest.skip("on a GPU the default tiles are what every other test runs")
    monkeypatch.setenv("VB_BWD", build)
    with launch.cuda_tiles():
        _check_grads("triton", named_schedule(schedule_name, shape[1]), shape, dtype)
