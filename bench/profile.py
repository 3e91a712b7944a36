"""Run one benchmark case a few times, for Nsight Systems and Nsight Compute.

    python -m bench.profile --list                          # the case ids
    python -m bench.profile --case vb512.down0-up3 --backend triton --mode fwd --dtype bf16

Warm-up calls (compilation, autotuning) run first, outside any range. Then profiling is
switched on (``cudaProfilerStart``) and ``--iters`` calls run, each inside the NVTX range
``profile`` (domain ``videobooth``), the op inside ``op.<backend>``; the triton backend adds
``vb.phase1.refresh`` and ``vb.phase2.cross_frame`` (``.bwd`` in the backward), and model cases
add their block ranges (``attn1.*``, ``dit.*``). Command lines (docs/bench.md):

    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \\
        -o prof python -m bench.profile --case ... --backend triton
    ncu --nvtx --nvtx-include "videobooth@profile/" --set full -o prof \\
        python -m bench.profile --case ... --backend triton --iters 1

(fwd+bwd: the backward runs on PyTorch's autograd thread, outside this thread's ``profile``
range; add ``--nvtx-push-pop-scope process`` to ncu.)

On a machine without CUDA it runs the case through the Triton interpreter and prints times
(a dry run of the entry point; NVTX is a no-op there).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # as conftest.py: before anything imports triton's jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vb_kernels.profiling import nvtx_range  # noqa: E402

from . import backends  # noqa: E402
from .measure import DTYPES, Step, Workload  # noqa: E402
from .models import model_rows  # noqa: E402
from .shapes import MODES, op_rows  # noqa: E402


def all_cases() -> dict:
    """Every case of the full grid (op and model), by id."""
    return {row.case.id: row.case for row in op_rows(full=True) + model_rows(full=True)}


def find_case(query: str):
    """The case whose id is ``query``, or the only one containing it."""
    cases = all_cases()
    if query in cases:
        return cases[query]
    hits = [c for cid, c in cases.items() if query in cid]
    if len(hits) != 1:
        listing = "\n  ".join(c.id for c in hits) or "(none; see --list)"
        sys.exit(f"--case {query!r} matches {len(hits)} cases, expected one:\n  {listing}")
    return hits[0]


class _Ranged:
    """The backend's callable inside an NVTX range named after it."""

    def __init__(self, name: str):
        self.name, self.fn = f"op.{name}", backends.attention(name)

    def __call__(self, *args, **kwargs):
        with nvtx_range(self.name):
            return self.fn(*args, **kwargs)


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the case ids and exit")
    ap.add_argument("--case", help="a case id of bench/shapes.py or bench/models.py, or a unique part of one")
    ap.add_argument("--backend", default="triton", choices=backends.NAMES)
    ap.add_argument("--mode", default="fwd", choices=MODES)
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=tuple(DTYPES))
    ap.add_argument("--iters", type=int, default=3, help="profiled calls (1 is plenty for ncu)")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled calls before them")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(all_cases()))
        return []
    if not args.case:
        ap.error("--case is required (see --list)")
    case = find_case(args.case)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    step = Step(Workload(case, DTYPES[args.dtype], device, grad=args.mode != "fwd"), _Ranged(args.backend), args.mode)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.profiler.start()
    times = []
    for _ in range(args.iters):
        step.clear()
        t0 = time.perf_counter()
        with nvtx_range("profile"):
            step.step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.profiler.stop()
    print(f"{case.id} {args.backend} {args.mode} {args.dtype} on {device}: "
          + ", ".join(f"{t:.3f}" for t in times) + " ms (wall clock, synchronised)")
    return times


if __name__ == "__main__":
    main()
