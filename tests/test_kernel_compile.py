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


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VB_TILES", "VB_BWD")}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def _reports(tmp_path, *arg_lists, **env) -> list[list[dict]]:
    """Run one report per argument list, in parallel subprocesses; their rows, in order."""
    procs = []
    for i, args in enumerate(arg_lists):
        out = tmp_path / f"report{i}.json"
        procs.append((out, subprocess.Popen([sys.executable, "-m", "vb_kernels.impl.fused.aot", "--json", str(out), *args],
                                            cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
    # the default build: the split pair at every head dim until a GPU result lets auto take the
    # fused one (vb_kernels/impl/fused/choice.py); dkv: one dK/dV launch; dv + dk: the two halves
    # of a split launch, D > 128
    for d in {r["head_dim"] for r in rows}:
        kinds = {r["kernel"] for r in rows if r["head_dim"] == d}
        assert kinds in ({"fwd", "dq", "dkv"}, {"fwd", "dq", "dv", "dk"}), (d, kinds)
    for r in rows:
        name = f"D={r['head_dim']} {r['dtype']} {r['layout']} {r['kernel']} phase {r['phase']}"
        assert r["scalar16"] == 0, f"{name}: {r['scalar16']} scalar 16-bit global loads (unaligned tile loads)"
        if r["kernel"] in ("delta", "dqsum"):  # the fused build's row-wise kernels: no MMA, no loop
            assert r["spill"] == 0, f"{name}: {r['spill']} bytes of register spills"
            continue
        assert r["cp_async"] + r["tma"] > 0, f"{name}: no cp.async / TMA: the tile loads are not pipelined"
        assert r["spill"] == 0, f"{name}: {r['spill']} bytes of register spills"
        assert r["mma"] == "wgmma", f"{name}: {r['mma']}, expected Hopper's warpgroup MMA"
        assert r["loop_insts"] > 0, f"{name}: no inner MMA loop found in the SASS"
        assert r["ctas_per_sm"] >= 1, f"{name}: one CTA does not fit an SM"


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
    d40, d80, small, ieee, tf32, split = _reports(
        tmp_path, ("--head-dim", "40", "--dtype", "fp16", "--tokens", "4096"),
        ("--head-dim", "80", "--dtype", "bf16", "--layout", "strided", "--tokens", "1024"),
        ("--head-dim", "160", "--dtype", "bf16", "--tokens", "16"), fp32, (*fp32, "--tf32"),
        # few programs per key tile: the reader cap splits the anchor frame, whose partial dK/dV
        # the reduction adds (at a one-chunk head dim it once failed to compile)
        ("--head-dim", "64", "--dtype", "bf16", "--tokens", "128", "--batch", "1", "--heads", "2"))
    _check_rows(d40 + d80)
    assert all(r["spill"] == 0 and r["scalar16"] == 0 for r in small), small
    assert "reduce" in {r["kernel"] for r in split}, split
    assert all(r["spill"] == 0 and r["scalar16"] == 0 for r in split), split
    _check_targets(d40 + d80)
    assert {r["mma"] for r in ieee} == {"none"} and {r["mma"] for r in tf32} == {"wgmma"}, (ieee, tf32)


def test_fused_backward_compiles_as_designed(tmp_path):
    """VB_BWD=fused at the U-Net's largest level (D=40, N=4096, fp16): Delta, one KV-major pass,
    the dQ reduction. The pass is pipelined (cp.async), runs Hopper's wgmma, takes one
    exponential per score (the split pair takes two), spills nothing, and its loop is leaner per
    score than the split pair's dq + dK/dV loops together. Its deterministic build adds dQ with
    float atomics only inside the ordered window (after the acquire wait for the previous key
    block, before its own release); the atomic build's adds are outside any window (the positive
    control of that check)."""
    det, atomic = _reports(tmp_path, ("--head-dim", "40", "--dtype", "fp16", "--tokens", "4096"),
                                  ("--head-dim", "40", "--dtype", "fp16", "--tokens", "4096", "--atomic"),
                                  VB_BWD="fused")
    split = _reports(tmp_path, ("--head-dim", "40", "--dtype", "fp16", "--tokens", "4096"), VB_BWD="split")[0]
    split_loop = sum(r["per64"] for r in split if r["kernel"] in ("dq", "dkv") and r["phase"] == 2)
    for rows, build in ((det, "deterministic"), (atomic, "atomic")):
        kinds = {r["kernel"] for r in rows}
        assert kinds == {"fwd", "delta", "dkv", "dqsum"}, (build, kinds)
        for r in rows:
            assert r["scalar16"] == 0 and r["spill"] == 0, (build, r)
        (dkv,) = [r for r in rows if r["kernel"] == "dkv" and r["phase"] == 2]
        assert dkv["cp_async"] > 0 and dkv["mma"] == "wgmma" and dkv["loop_insts"] > 0, (build, dkv)
        assert dkv["mufu_per_score"] == 1, (build, dkv["mufu_per_score"])
        assert dkv["per64"] < split_loop, (build, dkv["per64"], split_loop)
    for r in det:
        assert r["unordered_adds"] == 0, r
    det_dkv = [r for r in det if r["kernel"] == "dkv"]
    assert all(r["atomics"] > 2 for r in det_dkv), det_dkv  # the dQ adds and the semaphore
    # the ordered wait passes at count >= target (an equality poll can miss it and spin: issue 33)
    assert all(r["poll_rule"] == "ge" for r in det_dkv), [r["poll_rule"] for r in det_dkv]
    assert all(r["poll_rule"] == "" for r in atomic), [r["poll_rule"] for r in atomic]
    # the deterministic build is within 10% of the atomic one per tile (the wait and release)
    assert all(r["per64"] <= 1.1 * next(a for a in atomic if a["kernel"] == "dkv" and a["phase"] == r["phase"])["per64"]
               for r in det_dkv), det_dkv
    assert all(r["unordered_adds"] > 0 for r in atomic if r["kernel"] == "dkv"), atomic
    # issue 20's static goal: the deterministic pass's loop per 128x64 score tile at most twice
    # the forward's (478 against 239 under triton 3.8: exactly at the goal, so a compiler or a
    # change that moves it shows here first)
    fwd = {r["phase"]: r["per64"] for r in det if r["kernel"] == "fwd"}
    assert all(r["per64"] <= 2.0 * fwd[r["phase"]] for r in det_dkv), (det_dkv, fwd)
    assert sum(r["mufu_per_score"] for r in split if r["kernel"] in ("dq", "dkv") and r["phase"] == 2) == 2


@pytest.mark.slow
def test_real_launch_compile_all_head_dims(tmp_path):
    """Every SD/DiT head dim, the default builds' kernels: aligned, pipelined, no spills, item-2
    targets. Each layout once and each dtype once (processor bf16, strided fp16; two reports in
    parallel): fp16 and bf16 give the same per-tile counts, spills and registers at every head
    dim here (checked 2026-12-06, strided layout, 37 kernels), and the other two pairs cost 65 s
    of the CPU suite's 10 minutes."""
    dims = ("--head-dim", "40", "64", "72", "80", "128", "160")
    for rows in _reports(tmp_path, (*dims, "--dtype", "bf16", "--layout", "processor"),
                         (*dims, "--dtype", "fp16", "--layout", "strided")):
        _check_rows(rows)
        _check_targets(rows)


def test_ctas_per_sm_follows_the_occupancy_rule():
    """The compile report's CTAs per SM: registers per warp in units of 256, then shared memory
    (228 KiB on sm_90, 164 KiB on sm_80, 1 KiB reserved per CTA), threads and the 32-CTA cap."""
    from vb_kernels.impl.fused.aot import ctas_per_sm

    assert ctas_per_sm(255, 61440, 8) == 1  # the forward: 256 registers x 256 threads fill the file
    assert ctas_per_sm(251, 37376, 4) == 2  # the dK/dV pass at (64, 64, 4, 2)
    assert ctas_per_sm(168, 24832, 4) == 3  # 168 x 32 = 21 units of 256: 12 warps
    assert ctas_per_sm(32, 0, 4) == 16 and ctas_per_sm(32, 0, 1) == 32  # threads, then the CTA cap
    assert ctas_per_sm(64, 100000, 4) == 2 and ctas_per_sm(64, 100000, 4, arch=80) == 1  # shared memory
    assert ctas_per_sm(64, 240000, 4) == 0  # does not fit


def test_unordered_float_atomics_reads_the_windows():
    """The check behind "no dQ add outside the ordered path": float atomics count unless an
    acquire load (the wait) opened a window that no release atomic has closed since."""
    from vb_kernels.impl.fused.aot import unordered_float_atomics as count
    add = "@%p1 atom.global.gpu.relaxed.add.v4.f32 {%r1, %r2, %r3, %r4}, [ %rd1 + 0 ], {%r5, %r6, %r7, %r8};"
    wait = "ld.global.acquire.gpu.b32 %r9, [%rd2];"
    release = "@%p2 atom.global.gpu.release.add.u32 %r10, [ %rd2 + 0 ], %r11;"
    assert count("\n".join([wait, add, add, release])) == 0
    assert count("\n".join([add, wait, add, release, add])) == 2  # before the wait, after the release
    assert count("\n".join([wait, add, release] * 3)) == 0
    assert count("\n".join(["red.global.add.f32 [%rd1], %f1;", release])) == 1
    assert count("\n".join([wait, release, "atom.global.add.u32 %r1, [%rd1], 1;"])) == 0  # integer: the count


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


def test_poll_rules_reads_the_compare_after_the_acquire_load():
    """poll_rules finds the semaphore poll's compare (the load's register against the target),
    across .loc lines; a compare of another register, or none, is not a poll."""
    from vb_kernels.impl.fused.aot import poll_rules

    load = "ld.global.acquire.gpu.b32 %r677, [%rd249];"
    loc = "\t.loc\t1 190 12 // backward.py:190:12"
    assert poll_rules("\n".join([load, loc, "setp.ge.s32 p_wait, %r677, %r678;"])) == "ge"
    assert poll_rules("\n".join([load, "setp.eq.s32 p_wait, %r677, %r678;"])) == "eq"
    assert poll_rules("\n".join([load, "setp.eq.s32 %p1, %r5, %r678;"])) == ""
    assert poll_rules("setp.ge.s32 p_wait, %r677, %r678;") == ""


def test_no_kernel_takes_more_than_about_30_parameters():
    """The host layer passes each tensor as one (pointer, strides) operand and groups the
    schedule's tables and the dimensions into tuples (issue 33): no @triton.jit function of the
    fused op takes more than 32 parameters (the dK/dV kernel took 102, passed positionally)."""
    import ast

    folder = os.path.join(ROOT, "vb_kernels", "impl", "fused")
    counts = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                    counts[f"{name}:{node.name}"] = len(node.args.args)
    assert len(counts) > 20, counts  # the kernels and their helpers were found
    assert max(counts.values()) <= 32, {k: n for k, n in counts.items() if n > 32}
