"""Compile a GPU run's triton kernels in parallel into Triton's cache before it times or tests them.

Every triton call of the smoke stage (``bench.smoke.smoke_calls``: each backward build at two
shapes, the ordered build also with the smoke's debug constants, a short poll limit and the
stress test's stalled warp, each its own binary), of the headline benchmark rows (the 8
VideoBooth U-Net shapes, bf16, fwd and fwd+bwd, with each backward build: ``bench_calls``) and
of ``pytest tests -m gpu`` (``tests/attention_cases.gpu_triton_calls``) is run through the op's
real host code with every launch recorded
(:func:`vb_kernels.impl.fused.aot.record_launches`: host tensors laid out as the benches and the
tests lay them out on the GPU), bound as Triton's launcher binds it, and each distinct binary
compiled for sm_90 (``--arch``) by ``--workers`` processes at once into Triton's cache, where the
launches find them (the cache key is the same: ``tests/test_gpu_run.py`` checks it). Why: the
GPU tests alone launch about 210 distinct binaries (phases, builds, dtypes, head dims, the
schedules' specialisations) at 1-3 s of compile each, one after another, against the 120 s
bench.gpu_run gives them; the headline rows' compiles came out of their timing budget.

    python -m bench.warm --workers 32          # on the GPU machine (bench.gpu_run's first stage)
    python -m bench.warm --dry-run             # record and count only (any machine)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launcher_kwargs(kernel, kwargs: dict) -> dict:
    """A launch's keywords as ``JITFunction.run`` completes them before it binds them (triton 3.6
    to 3.8): the debug flag and the instrumentation mode (part of the options, so of the cache
    key: with TRITON_DEBUG=1 the launcher looks up debug binaries)."""
    from triton import knobs

    return dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                instrumentation_mode=knobs.compilation.instrumentation_mode)


def bench_calls() -> list[tuple]:
    """The headline rows' triton calls, forward and backward (the fwd rows launch the same
    forward): the split build, then the fused build with ordered and with atomic dQ adds. A call
    here and in :func:`gpu_test_calls` is (backward build, schedule name, shape (B, F, N, H, D, M),
    dtype, with backward, deterministic dQ, source[, debug constants]); source ``"bench"``:
    contiguous inputs, bench.shapes' schedules; ``"tests"``: strided inputs, the tests'
    schedules; debug constants: ``launch.debug_constants``' keywords for the call (the smoke's)."""
    import torch

    from .shapes import vb_cases

    cases = vb_cases(256) + vb_cases(512)
    calls = []
    for build, deterministic in (("split", True), ("fused", True), ("fused", False)):
        calls += [(build, c.schedule, (c.b, c.f, c.n, c.h, c.d, c.m), torch.bfloat16, True, deterministic, "bench")
                  for c in cases]
    return calls


def _attention_cases():
    """tests/attention_cases.py, the GPU tests' cases (tests/ is not a package)."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import attention_cases
    return attention_cases


def gpu_test_calls() -> list[tuple]:
    """The GPU tests' triton calls (``tests/attention_cases.gpu_triton_calls``), as :func:`bench_calls`."""
    return [(*call, "tests") for call in _attention_cases().gpu_triton_calls()]


def smoke_calls() -> list[tuple]:
    """The smoke stage's triton calls (``bench.smoke.smoke_calls``), as :func:`bench_calls`."""
    from .smoke import smoke_calls as calls

    return calls()


def all_calls() -> list[tuple]:
    """In order of first use in bench.gpu_run: the smoke stage's, the headline rows', the GPU tests'."""
    return smoke_calls() + bench_calls() + gpu_test_calls()


def _schedule(name: str, frames: int, source: str):
    if source == "bench":
        from .shapes import make_schedule
        return make_schedule(name, frames)
    return _attention_cases().named_schedule(name, frames)


def binaries(calls=None, arch: int = 90, sms: int | None = None) -> list:
    """The distinct binaries of ``calls`` (default: :func:`all_calls`: the smoke stage's, the
    headline rows', then the GPU tests'), in that order, each once: a list of (key, kernel,
    args, kwargs, bound launch). ``sms``: the device's SM count, which decides the reader split of small grids (default: 132, an H100
    SXM's or an H200's)."""
    import contextlib
    from unittest import mock

    from vb_kernels.impl.fused import aot, backward
    from vb_kernels.impl.fused.launch import debug_constants

    found = {}
    old = os.environ.get("VB_BWD")
    sm_count = mock.patch.object(backward, "_sm_count", lambda device: sms) if sms else contextlib.nullcontext()
    try:
        with sm_count:
            for call in all_calls() if calls is None else calls:
                build, schedule, shape, dtype, backward_too, deterministic, source = call[:7]
                debug = call[7] if len(call) > 7 else {}
                os.environ["VB_BWD"] = build
                b, f, n, h, d, m = shape
                # host tensors with the strides the benches (contiguous) and the tests give on a GPU
                layout = "padded" if source == "tests" else "processor"
                with debug_constants(**debug):  # the smoke's constants: launch() adds them to the kwargs
                    launches = aot.record_launches(
                        *aot.make_tensors(b, f, n, h, d, m, dtype, layout),
                        schedule=_schedule(schedule, f, source), backward=backward_too,
                        deterministic=deterministic, arch=arch)
                for kern, _grid, args, kwargs in launches:
                    bound = aot.bind_launch(kern, args, launcher_kwargs(kern, kwargs), arch)
                    # the binary: the specialisation, the constexprs and the launch options; not the
                    # values of runtime arguments passed by keyword (tensors, sizes: the
                    # specialisation holds what the binary depends on of them)
                    runtime = {p.name for p in kern.params if not p.is_constexpr}
                    key = (kern.__name__, repr(bound[3]),
                           repr(sorted((k, v) for k, v in bound[1].items() if k not in runtime)))
                    found.setdefault(key, (key, kern, args, kwargs, bound))
    finally:
        if old is None:
            os.environ.pop("VB_BWD", None)
        else:
            os.environ["VB_BWD"] = old
    return list(found.values())  # first use first: the smoke's binaries, the headline's, the tests'


_FOUND: list = []  # a worker's binaries, recorded once by its initializer


def _record_in_worker(calls, arch: int, sms) -> None:
    _FOUND[:] = binaries(calls, arch, sms)


def _compile_one(i: int, arch: int) -> float:
    """In a worker (a fresh process): compile binary ``i`` of the recorded list; its seconds."""
    from vb_kernels.impl.fused import aot

    _key, kern, args, kwargs, bound = _FOUND[i]
    t0 = time.perf_counter()
    aot.compile_launch(kern, args, kwargs, arch, bound=bound)
    return time.perf_counter() - t0


def warm(workers: int, budget_s: float, arch: int = 90, dry: bool = False, calls=None, limit=None,
         sms: int | None = None) -> dict:
    """Compile the binaries of ``calls`` (default: the GPU tests') with ``workers`` processes,
    within ``budget_s`` seconds (then the workers stop: what they compiled stays in the cache);
    ``limit``: the first that many only."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    found = binaries(calls, arch, sms)
    res = {"binaries": len(found), "kernels": sorted({k[0] for k, *_ in found}),
           "record_s": round(time.perf_counter() - t0, 1)}
    if dry:
        return res
    workers = max(1, min(workers, len(found)))
    took = []
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_record_in_worker, initargs=(calls, arch, sms))
    # in order of first use: the smoke's and the headline's binaries are ready first; a cut leaves
    # the tests' last
    order = list(range(len(found)))[:limit]
    pending = {ex.submit(_compile_one, i, arch) for i in order}
    deadline = t0 + budget_s
    try:
        while pending and time.perf_counter() < deadline:
            finished, pending = wait(pending, timeout=max(0.0, deadline - time.perf_counter()),
                                     return_when=FIRST_COMPLETED)
            took += [fut.result() for fut in finished]
    finally:
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        if pending:  # budget spent: stop the workers (what they compiled is in the cache)
            for p in procs:
                p.terminate()
    res.update(workers=workers, compiled=len(took), seconds=round(time.perf_counter() - t0, 1),
               compile_s_each=round(sum(took) / len(took), 2) if took else None)
    if pending:
        res["cut"] = f"budget of {budget_s:.0f} s spent"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(32, os.cpu_count() or 1),
                    help="compile processes (default: one per CPU, at most 32: each holds torch and triton, "
                         "about 0.5 GB)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds, then the workers still running stop")
    ap.add_argument("--arch", type=int, default=90,
                    help="the target's compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--dry-run", action="store_true", help="record and count the binaries, compile none")
    ap.add_argument("--limit", type=int, help="compile only the first N binaries (in order of first use)")
    ap.add_argument("--json", type=Path, help="write the result here too")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers: expected at least 1, got {a.workers}")
    os.environ.pop("TRITON_INTERPRET", None)  # compiled binaries, not the interpreter
    if a.limit is not None and a.limit < 1:
        ap.error(f"--limit: expected at least 1, got {a.limit}")
    import torch

    # the SM count of the GPU the tests will run on (it decides the reader split of small grids)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else None
    res = warm(a.workers, a.budget, a.arch, a.dry_run, limit=a.limit, sms=sms)
    print(json.dumps(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
