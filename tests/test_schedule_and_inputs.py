"""Schedules as data, and bad input rejected at the door with the argument named."""
from __future__ import annotations


import pytest
import torch

from vb_kernels import Schedule, videobooth_attention
from vb_kernels.testing import make_inputs


def test_named_schedules_follow_design():
    assert Schedule.videobooth(4).refs == ((0, 0), (0, 0), (0, 1), (0, 2))
    assert Schedule.videobooth(4).keyframes == (0,)
    assert Schedule.first(3).refs == ((0,), (0,), (0,))
    assert Schedule.window(4, 2).refs == ((0, -1), (0, -1), (0, 1), (1, 2))
    kf = Schedule.keyframes(7, 3)
    assert kf.keyframes == (0, 3, 6)
    assert kf.refs == ((0, 0), (0, 0), (0, 1), (3, 2), (3, 3), (3, 4), (6, 5))
    assert Schedule.videobooth(1).refs == ((0, 0),)


def test_plan_counts_duplicates_and_routes_keyframe_values():
    p1, p2 = Schedule.keyframes(5, 2).with_image_everywhere().plan(has_image=True)
    assert [frame for frame, _ in p1.rows] == [0, 2, 4]
    assert all(srcs[0].frame == -1 for _, srcs in p1.rows)  # phase 1 reads the image first
    frame1 = p2.rows[1][1]  # refs [0, 0] -> image, then frame 0 twice via U slot 0
    assert [(s.frame, s.value_slot, s.count) for s in frame1] == [(-1, -1, 1), (0, 0, 2)]
    frame3 = p2.rows[3][1]  # refs [2, 2]: keyframe 2 (slot 1)
    assert [(s.frame, s.value_slot, s.count) for s in frame3] == [(-1, -1, 1), (2, 1, 2)]
    targets = {t.frame: [r for r, _ in rd] for t, rd in p2.targets()}
    assert targets[-1] == [0, 1, 2, 3, 4] and targets[0] == [0, 1] and targets[2] == [2, 3]


def test_schedule_equality_and_immutability():
    assert Schedule.videobooth(3) == Schedule([[0, 0], [0, 0], [0, 1]])
    assert hash(Schedule.videobooth(3)) == hash(Schedule([[0, 0], [0, 0], [0, 1]]))
    with pytest.raises(AttributeError):
        Schedule.videobooth(3).refs = ()


@pytest.mark.parametrize("build, exc, match", [
    (lambda: Schedule([]), ValueError, "refs: expected at least one frame"),
    (lambda: Schedule([[0, 1], [0]]), ValueError, "rectangular"),
    (lambda: Schedule([[0], [2]]), ValueError, r"refs\[1\]: expected frame ids in \[0, 1\] or -1, got 2"),
    (lambda: Schedule([[0], [-2]]), ValueError, r"refs\[1\]"),
    (lambda: Schedule([[0]], keyframes=(1,)), ValueError, r"keyframes: expected frame ids in \[0, 0\], got 1"),
    (lambda: Schedule("abc"), TypeError, "refs"),
    (lambda: Schedule.videobooth(0), ValueError, "num_frames"),
    (lambda: Schedule.window(4, 0), ValueError, "k: expected"),
    (lambda: Schedule.keyframes(4, 0), ValueError, "m: expected"),
])
def test_bad_schedules(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def _ins(**over):
    q, k, v, ki, vi = make_inputs(1, 3, 8, 2, 16, 5)
    args = dict(q=q, k=k, v=v, k_img=ki, v_img=vi)
    args.update(over)
    return args


@pytest.mark.parametrize("over, kw, exc, match", [
    (dict(k=torch.randn(1, 3, 9, 2, 16)), {}, ValueError, r"k: expected shape \(1, 3, 8, 2, 16\)"),
    (dict(q=torch.randn(3, 8, 2, 16)), {}, ValueError, r"q: expected shape \(B, F, N, H, D\)"),
    (dict(q="nope"), {}, TypeError, "q: expected a torch.Tensor"),
    (dict(v=torch.randn(1, 3, 8, 2, 16, dtype=torch.float64)), {}, TypeError, "v: expected dtype torch.float32"),
    (dict(q=torch.randn(1, 3, 8, 2, 264), k=torch.randn(1, 3, 8, 2, 264), v=torch.randn(1, 3, 8, 2, 264),
          k_img=None, v_img=None), {}, ValueError, "D=264"),
    (dict(q=torch.randn(1, 3, 8, 2, 12), k=torch.randn(1, 3, 8, 2, 12), v=torch.randn(1, 3, 8, 2, 12),
          k_img=None, v_img=None), {}, ValueError, "D=12"),
    (dict(q=torch.randn(1, 0, 8, 2, 16), k=torch.randn(1, 0, 8, 2, 16), v=torch.randn(1, 0, 8, 2, 16)),
     {}, ValueError, "non-empty clip"),
    (dict(v_img=None), {}, ValueError, "both tensors or both None, got only k_img"),
    (dict(k_img=torch.randn(1, 5, 3, 16)), {}, ValueError, r"k_img: expected shape \(1, M, 2, 16\)"),
    (dict(v_img=torch.randn(1, 6, 2, 16)), {}, ValueError, r"v_img: expected shape \(1, 5, 2, 16\)"),
    (dict(k_img=torch.randn(1, 5, 2, 16, dtype=torch.float16)), {}, TypeError, "k_img: expected dtype"),
    ({}, dict(schedule=Schedule.videobooth(4)), ValueError, "schedule: expected a schedule of F=3"),
    ({}, dict(schedule=[[0]]), TypeError, "schedule: expected a vb_kernels.Schedule"),
    ({}, dict(scale=-1.0), ValueError, "scale: expected a finite float > 0"),
    ({}, dict(backend="cuda"), ValueError, "backend: expected one of"),
    ({}, dict(backend="triton", schedule=Schedule([[0], [-1], [1]])), ValueError, "frame 1 has no keys"),
])
def test_bad_inputs_name_the_argument(over, kw, exc, match):
    with pytest.raises(exc, match=match):
        videobooth_attention(**_ins(**over), **kw)


def test_triton_rejects_float64_and_non_contiguous_last_dim():
    args = _ins()
    with pytest.raises(TypeError, match="q: backend 'triton' expects float16, bfloat16 or float32"):
        videobooth_attention(*[t.double() for t in args.values()], backend="triton")
    args["k"] = torch.randn(1, 3, 8, 16, 2).transpose(-1, -2)
    with pytest.raises(ValueError, match="k: backend 'triton' expects the last dim contiguous"):
        videobooth_attention(**args, backend="triton")


def test_image_tokens_optional_everywhere():
    args = _ins(k_img=None, v_img=None)
    out = videobooth_attention(**args, backend="sdpa")
    out0 = videobooth_attention(**_ins(k_img=torch.randn(1, 0, 2, 16), v_img=torch.randn(1, 0, 2, 16),
                                       q=args["q"], k=args["k"], v=args["v"]), backend="sdpa")
    assert torch.equal(out, out0)


def test_tables_refuse_a_first_build_inside_cuda_graph_capture(monkeypatch):
    """Device tables are copied host-to-device at their first use, which a CUDA graph capture
    forbids: a first build during capture says what to do; tables built before are reused."""
    import vb_kernels.schedule as S

    plan = Schedule.window(5, 3).plan(True)[1]
    built = plan.tables("cpu")  # a build outside capture (CPU stands in for the device here)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert plan.tables("cpu") is built  # cached: no copy, no error
    with pytest.raises(RuntimeError, match="CUDA graph is being captured.*run the op once"):
        S._plan_tables(plan, torch.device("cuda", 0), 2)
