"""What each backend keeps for backward, at the real size of the VideoBooth 256 px U-Net,
measured on meta tensors (no compute): the fused op saves inputs, output, LSE and U only."""
import pytest
import torch

from vb_kernels import Schedule, videobooth_attention
from vb_kernels.testing import fused_saved_bytes, saved_tensor_bytes

# DESIGN.md section 1: attn1 sites of the 256 px U-Net (N tokens per frame, head dim), B=1, F=16.
SITES = [(1024, 40), (256, 80), (64, 160), (16, 160)]


@pytest.mark.parametrize("n, d", SITES)
def test_fused_saves_no_concatenated_kv(n, d):
    b, f, h, m = 1, 16, 8, n
    ins = [torch.empty(b, f, n, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    ins += [torch.empty(b, m, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    sched = Schedule.videobooth(f)
    fused, count = fused_saved_bytes(*ins, sched)
    elem = 2  # bf16
    frames = b * f * n * h * d * elem
    expected = (3 * frames + 2 * b * m * h * d * elem      # q, k, v, k_img, v_img (inputs)
                + frames + b * f * n * h * 4                # out, lse (fp32)
                + b * 1 * n * h * d * elem + b * 1 * n * h * 4)  # U and its LSE (one keyframe)
    assert (fused, count) == (expected, 9)
    ref, _ = saved_tensor_bytes(videobooth_attention, *ins, schedule=sched, backend="reference")
    assert ref > fused


def test_eager_fused_path_saves_through_saved_tensor_hooks():
    """The eager path (autograd.Function, no dispatcher) keeps the same nine tensors as the custom
    op, all through save_for_backward, so saved-tensor hooks (activation offloading) see them."""
    from vb_kernels.impl.fused import function, launch

    b, f, n, h, d, m = 1, 4, 16, 2, 16, 8
    ins = [torch.randn(b, f, n, h, d, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    ins += [torch.randn(b, m, h, d, dtype=torch.float16, requires_grad=True) for _ in range(2)]
    seen = []
    with launch.intercept(lambda *a: None), torch.autograd.graph.saved_tensors_hooks(
            lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        function._FusedAttention.apply(*ins, Schedule.videobooth(f), d ** -0.5, False, True, "split")
    assert sorted(seen) == sorted([(b, f, n, h, d)] * 4 + [(b, m, h, d)] * 2 + [(b, f, n, h), (b, 1, n, h, d),
                                                                                (b, 1, n, h)])
