"""The fused kernels as a real launch compiles them (sm_90, no GPU needed).

`python -m vb_kernels.impl.fused.aot` runs the op's host code on real-size tensors in host memory,
records every launch of a forward+backward call and compiles each one for sm_90 specialised from
its actual arguments, the way Triton's launcher does. These tests hold the result to what a
Hopper kernel needs: vector global loads (no scalar 16-bit loads), cp.async or TMA pipelining,
warpgroup MMA, no register spills, and the issue-11 targets for the inner loop and the backward
tiles. The compile runs in a subprocess: the test session imports Triton in interpreter mode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VB_TILES")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _reports(tmp_path, *arg_lists) -> list[list[dict]]:
    """Run one report per argument list, in parallel subprocesses; their rows, in order."""
    procs = []
    for i, args in enumerate(arg_lists):
        out = tmp_path / f"report{i}.json"
        procs.append((out, subprocess.Popen([sys.executable, "-m", "vb_kernels.impl.fused.aot", "--json", str(out), *args],
                                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    results = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.read_text()))
    return results


def _report(tmp_path, *args) -> list[dict]:
    return _reports(tmp_path, args)[0]


def _check_rows(rows: list[dict]) -> None:
    # dkv: one dK/dV launch; dv + dk: the two halves of a split launch (D > 128)
    for d in {r["head_dim"] for r in rows}:
        kinds = {r["kernel"] for r in rows if r["head_dim"] == d}
        assert kinds in ({"fwd", "dq", "dkv"}, {"fwd", "dq", "dv", "dk"}), (d, kinds)
    for r in rows:
        name = f"D={r['head_dim']} {r['dtype']} {r['layout']} {r['kernel']} phase {r['phase']}"
        assert r["scalar16"] == 0, f"{name}: {r['scalar16']} scalar 16-bit global loads (unaligned tile loads)"
        assert r["cp_async"] + r["tma"] > 0, f"{name}: no cp.async / TMA: the tile loads are not pipelined"
        assert r["spill"] == 0, f"{name}: {r['spill']} bytes of register spills"
        assert r["mma"] == "wgmma", f"{name}: {r['mma']}, expected Hopper's warpgroup MMA"
        assert r["loop_insts"] > 0, f"{name}: no inner MMA loop found in the SASS"


def _check_targets(rows: list[dict]) -> None:
    """Item 2 of issue 11: D=40 forward <= 260 SASS instructions per 64 keys; no m64n8/n16
    wgmma in dq or dK/dV at D = 80 and 160."""
    for r in rows:
        if r["head_dim"] == 40 and r["kernel"] == "fwd":
            assert r["per64"] <= 260, f"D=40 fwd: {r['per64']} SASS instructions per 64 keys"
        if r["head_dim"] in (80, 160) and r["kernel"] in ("dq", "dkv", "dk", "dv"):
            narrow = {s: n for s, n in r["wgmma"].items() if s.startswith(("m64n8k", "m64n16k"))}
            assert not narrow, f"D={r['head_dim']} {r['kernel']}: narrow wgmma {narrow}"


def test_real_launch_compile_fast(tmp_path):
    """Default CI: the largest U-Net level (D=40, N=4096, processor layout, fp16), D=80 in bf16
    from a strided (packed qkv) view, D=160 at the 16-token mid block; and fp32: IEEE dots (FMA,
    no tensor-core MMA) by default, TF32 wgmma only after the PyTorch opt-in
    (``torch.set_float32_matmul_precision("high")``)."""
    fp32 = ("--head-dim", "64", "--dtype", "fp32", "--tokens", "256", "--forward-only")
    d40, d80, small, ieee, tf32 = _reports(
        tmp_path, ("--head-dim", "40", "--dtype", "fp16", "--tokens", "4096"),
        ("--head-dim", "80", "--dtype", "bf16", "--layout", "strided", "--tokens", "1024"),
        ("--head-dim", "160", "--dtype", "bf16", "--tokens", "16"), fp32, (*fp32, "--tf32"))
    _check_rows(d40 + d80)
    assert all(r["spill"] == 0 and r["scalar16"] == 0 for r in small), small
    _check_targets(d40 + d80)
    assert {r["mma"] for r in ieee} == {"none"} and {r["mma"] for r in tf32} == {"wgmma"}, (ieee, tf32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["processor", "strided"])
def test_real_launch_compile_all_head_dims(tmp_path, dtype, layout):
    """Every SD/DiT head dim, fwd / dq / dkv: aligned, pipelined, no spills, item-2 targets."""
    rows = _report(tmp_path, "--head-dim", "40", "64", "72", "80", "128", "160", "--dtype", dtype,
                   "--layout", layout)
    _check_rows(rows)
    _check_targets(rows)


def test_unaligned_strides_fall_back_to_align_1():
    """ALIGN is a fact checked on the host: a stride that is not a multiple of 16 bytes turns it
    off (the kernels then read element by element, still correct)."""
    import torch

    from vb_kernels.impl.fused.forward import launch_strides

    q = torch.empty(1, 2, 4, 3, 40, dtype=torch.float16)
    al, strides = launch_strides((q, 4), (None, 3))
    assert al == 8 and list(strides) == [s // 8 for s in q.stride()[:4]] + [0, 0, 0]
    odd = torch.empty(1, 2, 4, 3, 44, dtype=torch.float16)[..., :40]  # head stride 44: 88 bytes
    al, strides = launch_strides((q, 4), (odd, 4))
    assert al == 1 and list(strides) == list(q.stride()[:4]) + list(odd.stride()[:4])
    assert launch_strides((q.float(), 4))[0] == 4
