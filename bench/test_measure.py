"""Self-checks of the suite's machinery (bench/measure.py, shapes.py, backends.py): the FLOPs
formula, the registry's sizes, and that a row xfails, skips or fails for the right reasons."""
from __future__ import annotations

import types

import pytest
import torch

from bench import backends, measure
from bench.models import model_rows
from bench.shapes import Case, Row, op_rows, smoke_cases, vb_cases

pytestmark = pytest.mark.smoke


def test_flops_follow_design_formula():
    # videobooth, F=3: phase 2 keys 2N per frame (frame 0 reads [0, 0]); phase 1: keyframe 0 over M + N.
    case = Case("smoke", "vb", 1, 3, 16, 2, 16, 16, "videobooth")
    assert case.flops() == 4 * 1 * 2 * 16 * 16 * (3 * 32 + 32)
    # window2 without image: frame 0 reads itself, 1 reads [0], 2.. read two frames; phase 1 over N.
    case = Case("smoke", "w", 1, 4, 8, 1, 16, None, "window2")
    assert case.flops() == 4 * 16 * 8 * (8 * (1 + 1 + 2 + 2) + 8)
    assert measure.row_flops(case, "fwd+bwd") == int(3.5 * case.flops())


def test_registry_has_the_issue_shapes_and_a_bounded_default():
    assert [c.n for c in vb_cases(512)] == [4096, 1024, 256, 64]
    assert [(c.n, c.d) for c in vb_cases(256)] == [(1024, 40), (256, 80), (64, 160), (16, 160)]
    default, full = op_rows(), op_rows(full=True)
    assert len({r.id for r in full}) == len(full)  # ids are unique
    assert set(default) <= set(full) and len(default) < len(full) / 3
    cases = {r.case for r in full}
    assert {c.f for c in cases if c.set == "long"} == {8, 16, 32, 64}
    assert {c.m for c in cases if c.set == "bank"} == {16, 64, 256, 1024}
    assert {c.d for c in cases if c.set == "dit"} == {64, 72, 128}
    assert {r.backend for r in model_rows() if not r.smoke} == {"reference", "sdpa", "flex", "triton"}


def test_gpu_rows_skip_on_cpu_with_a_reason():
    row = Row(vb_cases(256)[0], "triton", "fwd", "bf16")
    assert "GPU row" in backends.skip_reason(row, cuda=False)
    assert "needs a CUDA GPU" in backends.skip_reason(Row(smoke_cases()[0], "sdpa-flash", "fwd", "fp32"), cuda=False)
    assert backends.skip_reason(Row(smoke_cases()[0], "triton", "fwd+bwd", "fp32"), cuda=False) is None


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("backward kernel not written yet")


def _fake(monkeypatch, fn):
    monkeypatch.setitem(backends._FACTORIES, "triton", lambda: fn)
    return types.SimpleNamespace(group=None, extra_info={})


def test_a_missing_backward_is_an_xfail_with_its_reason(monkeypatch):
    bench = _fake(monkeypatch, lambda q, k, v, k_img=None, v_img=None, *, schedule=None: _NoBackward.apply(q))
    with pytest.raises(pytest.xfail.Exception, match="backward kernel not written yet"):
        measure.measure_row(bench, Row(smoke_cases()[0], "triton", "fwd+bwd", "fp32"), {"tflops": 1.0})
    bench = _fake(monkeypatch, lambda q, k, v, k_img=None, v_img=None, *, schedule=None: q.detach().clone())
    with pytest.raises(pytest.xfail.Exception, match="no autograd graph"):
        measure.measure_row(bench, Row(smoke_cases()[0], "triton", "fwd+bwd", "fp32"), {"tflops": 1.0})


def test_a_wrong_result_fails_instead_of_being_timed(monkeypatch):
    reference = backends.attention("reference")
    bench = _fake(monkeypatch, lambda *a, **kw: reference(*a, **kw) * 1.01)
    with pytest.raises(AssertionError, match="output off the oracle"):
        measure.measure_row(bench, Row(smoke_cases()[0], "triton", "fwd", "fp32"), {"tflops": 1.0})


def test_a_refused_sdpa_kernel_is_a_skip():
    err = RuntimeError("No available kernel. Aborting execution.")
    assert "sdpa-cudnn" in backends.refuses_shape("sdpa-cudnn", err)
    assert backends.refuses_shape("triton", err) is None
    assert backends.refuses_shape("sdpa-flash", RuntimeError("illegal memory access")) is None
