"""Forward of the VideoBooth attention op: every backend against the float64 reference."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention_cases import (GPU_BF16_CASES, GPU_BF16_SHAPE, GPU_FP32_HEAD_DIMS, GPU_HEAD_DIMS, SCHEDULES,
                             gpu_fp32_shape, gpu_head_dim_shape, named_schedule, needs_cuda, oracle)
from vb_kernels import Schedule, videobooth_attention
from vb_kernels.testing import TOLERANCE, make_inputs, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]


def _check(backend, schedule, shape, dtype, strided=True, seed=0):
    b, f, n, h, d, m = shape
    torch.manual_seed(seed)
    ins = make_inputs(b, f, n, h, d, m, dtype=dtype, device=DEV, strided=strided)
    out, lse = videobooth_attention(*ins, schedule=schedule, backend=backend, return_lse=True)
    ref, ref_lse = oracle(*ins, schedule=schedule, return_lse=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert lse.shape == (b, f, n, h) and lse.dtype == torch.float32
    assert rel_err(out, ref) < TOLERANCE[dtype], rel_err(out, ref)
    assert rel_err(lse, ref_lse) < TOLERANCE[torch.float32] * 10, rel_err(lse, ref_lse)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("backend", ["sdpa", "flex", "triton"])
def test_backend_matches_reference_on_every_schedule(backend, schedule_name, dtype):
    _check(backend, named_schedule(schedule_name, 4), (2, 4, 17, 2, 40, 9), dtype)


# (B, F, N, H, D, M): N not a multiple of the tile, M = 0 / None / != N, F = 1, SD head dims.
ODD_SHAPES = [
    (1, 3, 1, 2, 16, 5),
    (1, 2, 17, 1, 72, 0),
    (1, 3, 63, 1, 40, 17),
    (1, 1, 17, 2, 80, None),
    (2, 2, 9, 1, 160, 33),
    (1, 3, 20, 1, 128, 20),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "B{}F{}N{}H{}D{}M{}".format(*s))
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_odd_shapes(backend, shape, dtype):
    for name in ("videobooth", "random1"):
        _check(backend, named_schedule(name, shape[1]), shape, dtype)


def test_flex_odd_shapes():
    for shape in ODD_SHAPES[:3]:
        _check("flex", named_schedule("random2", shape[1]), shape, torch.float32)


def test_contiguous_inputs_and_custom_scale():
    torch.manual_seed(1)
    ins = make_inputs(1, 3, 17, 2, 40, 7, device=DEV)
    sched = Schedule.keyframes(3, 2)
    out = videobooth_attention(*ins, schedule=sched, scale=0.3, backend="triton")
    ref = videobooth_attention(*[t.double() for t in ins], schedule=sched, scale=0.3, backend="reference")
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_auto_backend_is_sdpa_on_cpu_and_triton_on_cuda():
    from vb_kernels.api import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    # what the fused kernels do not take falls back to sdpa instead of raising
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), torch.float16, last_dim_contiguous=False) == "sdpa"


def test_scale_accepts_numpy_and_python_reals():
    import numpy as np
    ins = make_inputs(1, 2, 8, 1, 16, None, device=DEV)
    a = videobooth_attention(*ins, scale=np.float32(0.25), backend="sdpa")
    b = videobooth_attention(*ins, scale=0.25, backend="sdpa")
    assert torch.equal(a, b)


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Every output element must be written by a kernel: NaN-filled buffers must not survive."""
    from vb_kernels.impl.fused import function

    def poisoned(*args, **kw):
        return torch.full(*args, float("nan"), **kw)

    monkeypatch.setattr(function, "_alloc", poisoned)
    monkeypatch.setattr(function, "_alloc_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
    _check("triton", named_schedule("random0", 3), (1, 3, 33, 2, 40, 5), torch.float32)
    _check("triton", named_schedule("keyframes2", 3), (1, 3, 17, 1, 16, None), torch.float16)


def test_tilings_other_than_the_default_agree(monkeypatch):
    monkeypatch.setenv("VB_TILES", "fwd=32,16,4,1;dq=32,16,4,1;dkv=16,32,4,1")
    _check("triton", named_schedule("random1", 3), (1, 3, 63, 1, 40, 21), torch.float32)


class _OpLog(TorchDispatchMode):
    """Records every ATen op (and the shapes of what it returns) run under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # On CPU the Triton interpreter emulates device memory by copying each kernel argument
        # to a host buffer and back; those copies do not exist on a GPU and are not ours.
        if any("triton/runtime/interpreter" in fr.filename.replace("\\", "/")
               for fr in traceback.extract_stack()):
            return out
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor)]
        self.calls.append((str(func.overloadpacket), shapes))
        return out


def test_triton_path_allocates_no_concatenated_or_repeated_kv():
    """The fused forward runs no ATen op but allocations, and allocates exactly out, lse, U and
    lse1: no torch.cat, no index/repeat/expand copy, no W table, no contiguous() of an input."""
    b, f, n, h, d, m = 1, 4, 17, 2, 40, 9
    ins = make_inputs(b, f, n, h, d, m, device=DEV, strided=True)
    sched = Schedule.keyframes(4, 2)  # two keyframes, so U has 2 of the 4 frames
    from vb_kernels.impl.fused.function import fused_fwd

    sched.fused_tables(True, ins[0].device)  # the schedule's index tables: built once, at first use
    with _OpLog() as outer:  # the public call: nothing but allocations and launches
        videobooth_attention(*ins, schedule=sched, backend="triton")
    # eager: the host functions directly (allocations only); compiled: the custom op
    allocs = {"aten.empty", "aten.empty_like", "aten.empty_strided"}  # (the LSEs: token-contiguous strides)
    assert {name for name, _ in outer.calls} <= {"videobooth.fused_fwd", "aten.detach"} | allocs
    with _OpLog() as log:  # what runs inside it: allocations and Triton launches only
        fused_fwd(*ins, sched, d ** -0.5)
    ops = {name for name, _ in log.calls}
    assert ops <= allocs, ops
    allocated = sorted(s for _, shapes in log.calls for s in shapes)
    assert allocated == sorted([(b, f, n, h, d), (b, f, n, h), (b, 2, n, h, d), (b, 2, n, h)])


def test_reference_equals_transcription_of_original_code():
    """The reference backend equals a line-by-line transcription of the original code's
    attention for the paper's schedule (DESIGN.md section 2): heads folded into the batch,
    ``former_frame_index``, the anchor repeated per frame, torch.cat, baddbmm + softmax."""
    from einops import rearrange

    torch.manual_seed(3)
    b, f, n, h, d, m = 2, 5, 12, 2, 16, 7
    q, k, v, k_img, v_img = make_inputs(b, f, n, h, d, m, dtype=torch.float64)
    scale = d ** -0.5

    def head_to_batch_dim(x):  # (b*f, n, h*d) -> (b*f*h, n, d), as diffusers' Attention
        return rearrange(x, "bf n (h d) -> (bf h) n d", h=h)

    def attention(query, key, value):  # get_attention_scores + bmm
        scores = torch.baddbmm(torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype),
                               query, key.transpose(-1, -2), beta=0, alpha=scale)
        return torch.bmm(scores.softmax(dim=-1), value)

    query = rearrange(q, "b f n h d -> (b f) n (h d)")
    key = rearrange(k, "b f n h d -> (b f) n (h d)")
    value = rearrange(v, "b f n h d -> (b f) n (h d)")
    key_img = rearrange(k_img, "b m h d -> b m (h d)")
    value_img = rearrange(v_img, "b m h d -> b m (h d)")
    video_length = f

    # first frame's values refreshed from [exemplar; first frame]
    query_first = rearrange(query, "(b f) n c -> b f n c", f=video_length)[:, 0]
    key_first = torch.cat([key_img, rearrange(key, "(b f) n c -> b f n c", f=video_length)[:, 0]], dim=1)
    value_first = torch.cat([value_img, rearrange(value, "(b f) n c -> b f n c", f=video_length)[:, 0]], dim=1)
    value_first = attention(head_to_batch_dim(query_first), head_to_batch_dim(key_first),
                            head_to_batch_dim(value_first))
    value_first = rearrange(value_first, "(b h) n d -> b n (h d)", h=h)
    value = rearrange(value, "(b f) n c -> b f n c", f=video_length).clone()
    value[:, 0] = value_first
    value = rearrange(value, "b f n c -> (b f) n c")

    # sparse-causal attention: first frame + former frame
    former_frame_index = torch.arange(video_length) - 1
    former_frame_index[0] = 0
    key = rearrange(key, "(b f) n c -> b f n c", f=video_length)
    key = torch.cat([key[:, [0] * video_length], key[:, former_frame_index]], dim=2)
    key = rearrange(key, "b f n c -> (b f) n c")
    value = rearrange(value, "(b f) n c -> b f n c", f=video_length)
    value = torch.cat([value[:, [0] * video_length], value[:, former_frame_index]], dim=2)
    value = rearrange(value, "b f n c -> (b f) n c")
    hidden = attention(head_to_batch_dim(query), head_to_batch_dim(key), head_to_batch_dim(value))
    original = rearrange(hidden, "(b f h) n d -> b f n h d", b=b, f=f, h=h)

    ours = videobooth_attention(q, k, v, k_img, v_img, schedule=Schedule.videobooth(f), backend="reference")
    assert rel_err(ours, original) < 1e-12


@needs_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize("backend, schedule_name", GPU_BF16_CASES, ids=[f"{b}-{s}" for b, s in GPU_BF16_CASES])
def test_bf16_on_gpu(backend, schedule_name):
    _check(backend, named_schedule(schedule_name, GPU_BF16_SHAPE[1]), GPU_BF16_SHAPE, torch.bfloat16)


def test_bf16_is_gpu_only():
    if torch.cuda.is_available():
        pytest.skip("GPU present: bf16 is covered by test_bf16_on_gpu")
    pytest.skip("the Triton interpreter has no bfloat16 (a bf16 tl.dot multiplies bit patterns); "
                "bf16 is tested on a GPU only")


@needs_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize("d", GPU_HEAD_DIMS)
def test_head_dims_fp16_on_gpu(d):
    _check("triton", named_schedule("random1", 4), gpu_head_dim_shape(d), torch.float16)


@needs_cuda()
@pytest.mark.gpu
@pytest.mark.parametrize("d", GPU_FP32_HEAD_DIMS)
def test_fp32_at_full_tiles_on_gpu(d):
    """fp32 takes its own tiles (twice the bytes): they must fit the device's shared memory."""
    _check("triton", named_schedule("random1", 4), gpu_fp32_shape(d, False), torch.float32)


@needs_cuda()
@pytest.mark.gpu
def test_int64_output_offsets_on_gpu():
    """F*N*H*D of one clip above 2**31: the output and LSE row offsets must be int64."""
    b, f, n, h, d = 1, 128, 4096, 32, 128  # 2**31 elements per tensor
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    q = torch.randn(b, f, n, h, d, device="cuda", dtype=torch.float16)
    k = torch.randn_like(q)
    out = videobooth_attention(q, k, k, schedule=Schedule([[0]] * f, keyframes=()), backend="triton")
    ref = videobooth_attention(q[:, -1:], k[:, :1], k[:, :1], schedule=Schedule([[0]], keyframes=()),
                               backend="sdpa")
    assert rel_err(out[:, -1:], ref) < 5e-3


@needs_cuda()
@pytest.mark.gpu
def test_int64_offsets_on_gpu():
    """Element offsets above 2**31: the last frame of a strided q starts past int32 range."""
    b, f, n, h, d = 1, 64, 4096, 8, 128
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    q = torch.randn(b, f, n, h, 1100, device="cuda", dtype=torch.float16)[..., :d]  # 2.3e9 elements
    assert q.storage_offset() + (f - 1) * q.stride(1) > 2**31
    k, v = (torch.randn(b, f, n, h, d, device="cuda", dtype=torch.float16) for _ in range(2))
    out = videobooth_attention(q, k, v, schedule=Schedule([[0]] * f, keyframes=()), backend="triton")
    ref = videobooth_attention(q[:, -1:].contiguous(), k[:, :1], v[:, :1],
                               schedule=Schedule([[0]], keyframes=()), backend="reference")
    assert rel_err(out[:, -1:], ref) < 5e-3


def test_interpreter_version_check_names_the_fix():
    """triton <= 3.6's interpreter cannot run the kernels' loops with numpy >= 2.4: the first call
    says so and names the fix, instead of an InterpreterError from inside a kernel."""
    from vb_kernels.impl.fused.launch import check_interpreter

    for ok in (("3.8.0", "2.4.6"), ("3.7.1", "2.4.6"), ("3.6.0", "2.3.5"), ("3.6.0+git1a2b", "1.26.4")):
        check_interpreter(*ok)
    with pytest.raises(RuntimeError, match=r"triton 3\.6\.0's interpreter .* numpy 2\.4\.6 .* numpy<2\.4 or triton>=3\.7"):
        check_interpreter("3.6.0", "2.4.6")
    with pytest.raises(RuntimeError, match="numpy 2.5.0rc1"):
        check_interpreter("3.5.1", "2.5.0rc1")
