"""Bit-for-bit check of the fused op across a change, through Triton's interpreter.

    TRITON_INTERPRET=1 python tools/bitcheck.py --save /tmp/before     # at the old commit
    TRITON_INTERPRET=1 python tools/bitcheck.py --compare /tmp/before  # at the new one

Runs the triton backend's forward and backward (both builds, ordered and atomic dQ adds, every
named schedule, with and without image tokens, split readers, phase 1, a gradient of the LSE,
fp32 and fp16, head dims 40 to 160) on fixed random inputs, and saves every output and gradient;
``--compare`` reruns them and reports each tensor that differs in any bit. A refactor of the host
layer or of the kernels' arguments must leave every one identical.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

CASES = [
    # (name, (B, F, N, H, D, M), dtype, schedule, build, deterministic, VB_TILES, lse grad)
    ("paper-fp32-d40", (1, 3, 37, 2, 40, 19), "float32", "videobooth", "split", True, None, False),
    ("paper-fp32-d40-fused", (1, 3, 37, 2, 40, 19), "float32", "videobooth", "fused", True, None, True),
    ("paper-fp32-d40-atomic", (1, 3, 37, 2, 40, 19), "float32", "videobooth", "fused", False, None, False),
    ("keyframes-fp16-d64-fused", (1, 5, 21, 1, 64, 30), "float16", "keyframes2", "fused", True, None, False),
    ("keyframes-fp16-d64-split", (1, 5, 21, 1, 64, 30), "float16", "keyframes2", "split", True, None, True),
    ("window-fp32-d72-fused", (2, 4, 19, 1, 72, 0), "float32", "window2", "fused", True, None, False),
    ("window-fp32-d80-split", (1, 4, 19, 1, 80, 11), "float32", "window2", "split", True, None, False),
    ("everywhere-fp16-d160", (1, 3, 17, 1, 160, 9), "float16", "everywhere", "split", True, None, False),
    ("readers-fp32-d40-split", (1, 6, 33, 1, 40, 13), "float32", "first", "split", True, "readers=2", False),
    ("readers-fp32-d40-fused", (1, 6, 33, 1, 40, 13), "float32", "first", "fused", True, "readers=2", True),
    ("plain-fp32-d40-fused", (1, 3, 40, 2, 40, 0), "float32", "plain", "fused", True, None, False),
]


def schedule(name: str, frames: int):
    from vb_kernels import Schedule

    return {"videobooth": Schedule.videobooth(frames), "first": Schedule.first(frames),
            "window2": Schedule.window(frames, 2), "keyframes2": Schedule.keyframes(frames, 2),
            "everywhere": Schedule.videobooth(frames).with_image_everywhere(),
            "plain": Schedule([[max(f - 1, 0)] for f in range(frames)], keyframes=())}[name]


@contextlib.contextmanager
def tiles(value):
    old = os.environ.get("VB_TILES")
    if value is None:
        os.environ.pop("VB_TILES", None)
    else:
        os.environ["VB_TILES"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VB_TILES", None)
        else:
            os.environ["VB_TILES"] = old


def run_case(case) -> dict:
    import torch

    from vb_kernels import backward_build, videobooth_attention

    name, (b, f, n, h, d, m), dtype, sched, build, det, vb_tiles, lse_grad = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    dt = getattr(torch, dtype)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dt).requires_grad_()

    q, k, v = rnd(b, f, n, h, d), rnd(b, f, n, h, d), rnd(b, f, n, h, d)
    ki, vi = (rnd(b, m, h, d), rnd(b, m, h, d)) if m else (None, None)
    g = torch.randn(b, f, n, h, d, generator=gen).to(dt)
    with tiles(vb_tiles), backward_build(build):
        out, lse = videobooth_attention(q, k, v, ki, vi, schedule=schedule(sched, f), backend="triton",
                                        return_lse=True, deterministic=det)
        loss = (out.float() * g.float()).sum()
        if lse_grad:
            loss = loss + (lse * torch.linspace(-1, 1, lse.numel()).view(lse.shape)).sum()
        loss.backward()
    res = {"out": out.detach(), "lse": lse.detach()}
    for label, t in (("dq", q), ("dk", k), ("dv", v), ("dk_img", ki), ("dv_img", vi)):
        if t is not None:
            res[label] = t.grad
    return res


def bits(t):
    """The tensor's bytes (NaNs compare equal to the same NaN, -0 differs from 0)."""
    return t.detach().contiguous().view(-1).view(__import__("torch").uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="DIR", help="write every case's outputs to DIR")
    mode.add_argument("--compare", metavar="DIR", help="compare every case's outputs with DIR's, bit for bit")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (before triton is imported)", file=sys.stderr)
        return 2
    import torch

    folder = args.save or args.compare
    os.makedirs(folder, exist_ok=True)
    bad = 0
    for case in CASES:
        res = run_case(case)
        path = os.path.join(folder, f"{case[0]}.pt")
        if args.save:
            torch.save(res, path + ".tmp")
            os.replace(path + ".tmp", path)
            print(f"saved {case[0]}: {', '.join(res)}", flush=True)
            continue
        old = torch.load(path)
        diff = [k for k in old if k not in res or not torch.equal(bits(old[k]), bits(res[k]))]
        diff += [k for k in res if k not in old]
        bad += bool(diff)
        print(f"{case[0]}: {'identical' if not diff else 'DIFFERS in ' + ', '.join(diff)} ({len(res)} tensors)",
              flush=True)
    if args.compare:
        print(f"{len(CASES) - bad} of {len(CASES)} cases bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
