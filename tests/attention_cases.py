"""Cases shared by the attention tests: named and random schedules, the oracle call."""
from __future__ import annotations

import random

import torch

from vb_kernels import Schedule, videobooth_attention
from vb_kernels.testing import upcast


def random_schedule(n_frames: int, n_refs: int, seed: int) -> Schedule:
    """A hand-built-looking table: duplicated refs, -1 slots, random keyframes."""
    rng = random.Random(seed)
    refs = []
    for _ in range(n_frames):
        row = [rng.choice([-1] + list(range(n_frames))) for _ in range(n_refs)]
        if all(r < 0 for r in row):
            row[rng.randrange(n_refs)] = rng.randrange(n_frames)
        if rng.random() < 0.5:  # force a duplicate
            row[-1] = next(r for r in row if r >= 0)
        refs.append(row)
    keyframes = rng.sample(range(n_frames), k=rng.randint(0, min(2, n_frames)))
    return Schedule(refs, keyframes, image_everywhere=rng.random() < 0.5, name=f"random{seed}")


def named_schedule(name: str, n_frames: int) -> Schedule:
    if name == "videobooth":
        return Schedule.videobooth(n_frames)
    if name == "first":
        return Schedule.first(n_frames)
    if name == "window2":
        return Schedule.window(n_frames, 2)
    if name == "keyframes2":
        return Schedule.keyframes(n_frames, 2)
    if name == "image_everywhere":
        return Schedule.videobooth(n_frames).with_image_everywhere()
    if name == "no_keyframes":  # the unconditional pass of classifier-free guidance
        return Schedule(Schedule.videobooth(n_frames).refs, keyframes=())
    if name.startswith("random"):
        return random_schedule(n_frames, 3, int(name[len("random"):]))
    raise KeyError(name)


SCHEDULES = ["videobooth", "first", "window2", "keyframes2", "image_everywhere", "no_keyframes",
             "random0", "random1", "random2"]


def oracle(q, k, v, k_img, v_img, schedule, **kw):
    """The reference backend in float64 on upcast inputs."""
    return videobooth_attention(*upcast(q, k, v, k_img, v_img), schedule=schedule, backend="reference", **kw)


def needs_cuda():
    import pytest
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- the GPU tests' cases, as data --------------------------------------------------------------
# The GPU tests (pytest -m gpu) parametrise over these, and `python -m bench.warm` (bench.gpu_run's
# first stage) compiles every kernel binary their triton calls launch, in parallel, into Triton's
# cache before pytest runs them one after another.
GPU_GRAD_SHAPES = [(2, 5, 257, 4, 80, 77), (1, 3, 1024, 2, 40, 1024), (1, 2, 64, 8, 160, 0)]
# every schedule and 16-bit dtype for both triton backward builds; FlexAttention, a baseline whose
# every schedule is a new compile, on two of them in bf16 (what the benches time)
GPU_GRAD_CASES = [(impl, s, dt) for impl in ("split", "fused") for s in SCHEDULES
                  for dt in (torch.float16, torch.bfloat16)]
GPU_GRAD_CASES += [("flex", s, torch.bfloat16) for s in ("videobooth", "keyframes2")]
GPU_DETERMINISM_SHAPE = (2, 16, 1024, 8, 40, 1024)  # the U-Net's 512 px top level: every SM busy
GPU_FP32_HEAD_DIMS = (40, 80, 128, 160)
GPU_HEAD_DIMS = (40, 64, 72, 80, 128, 160, 256)
GPU_BF16_SHAPE = (2, 5, 257, 4, 80, 77)
# the forward in bf16: every schedule for sdpa and triton; FlexAttention on the same two as above
# (its forward is checked on every schedule on the CPU, in fp32 and fp16)
GPU_BF16_CASES = [(b, s) for b in ("sdpa", "triton") for s in SCHEDULES]
GPU_BF16_CASES += [("flex", s) for s in ("videobooth", "keyframes2")]


def gpu_fp32_shape(d: int, backward: bool) -> tuple:
    """fp32 at full tiles (N large enough that no tile shrinks to the sequence)."""
    return (1, 3, 300, 2, d, 257) if backward else (1, 4, 300, 2, d, 257)


def gpu_head_dim_shape(d: int) -> tuple:
    return (1, 4, 1000, 2, d, 300)


# tests/test_gpu_fused_backward.py: what only a GPU can get wrong in the fused backward.
# N 4096 with several launch groups and a short last one: phase 2 has B*H*targets = 9 * 4 = 36
# chains at 16 per group on 132 SMs (order_group), so groups of 16, 16 and 4 (the test checks it
# from the recorded grid); the image tokens longer than the frames (M > N), read by every frame
GPU_GROUPS_SHAPE = (1, 3, 4096, 9, 40, 300)
GPU_M_GT_N_SHAPE = (1, 3, 300, 2, 40, 700)
GPU_FUSED_CASES = [(GPU_GROUPS_SHAPE, "videobooth"), (GPU_M_GT_N_SHAPE, "image_everywhere")]
GPU_FUSED_BUILDS = [("split", True), ("fused", True), ("fused", False)]  # (build, deterministic dQ)
GPU_GRAPH_SHAPE = GPU_GRAD_SHAPES[1]  # CUDA-graph capture: the binaries test_gradients_on_gpu launches


def gpu_triton_calls() -> list[tuple]:
    """(backward build, schedule name, shape (B, F, N, H, D, M), dtype, with backward,
    deterministic dQ) of every triton call the GPU tests make (the int64-offset tests aside:
    2**31-element tensors); "auto": the default build (VB_BWD unset)."""
    calls = [(impl, s, shape, dt, True) for impl, s, dt in GPU_GRAD_CASES if impl != "flex"
             for shape in GPU_GRAD_SHAPES]
    calls += [(build, "videobooth", GPU_DETERMINISM_SHAPE, torch.bfloat16, True) for build in ("split", "fused")]
    calls += [("auto", "videobooth", gpu_fp32_shape(d, True), torch.float32, True) for d in GPU_FP32_HEAD_DIMS]
    calls += [("auto", "random1", gpu_fp32_shape(d, False), torch.float32, False) for d in GPU_FP32_HEAD_DIMS]
    calls += [("auto", s, GPU_BF16_SHAPE, torch.bfloat16, False) for b, s in GPU_BF16_CASES if b == "triton"]
    calls += [("auto", "random1", gpu_head_dim_shape(d), torch.float16, False) for d in GPU_HEAD_DIMS]
    calls = [(*call, True) for call in calls]
    calls += [(build, s, shape, torch.bfloat16, True, det) for shape, s in GPU_FUSED_CASES
              for build, det in GPU_FUSED_BUILDS]
    calls += [(build, "videobooth", GPU_GRAPH_SHAPE, torch.bfloat16, True, True) for build in ("split", "fused")]
    return calls
