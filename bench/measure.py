"""How one benchmark row is measured (DESIGN.md section 4), shared by the op and model rows.

For a row (case, backend, mode, dtype):
1. Inputs: seeded random tensors for the case (``vb_kernels.testing.make_inputs``; never zeros),
   built once per (case, dtype, mode) and shared by the backends of that case.
2. First call: compiles what compiles (Triton, FlexAttention), and its output (and gradients in
   fwd+bwd) is checked against an oracle on the same inputs: the reference backend in float64
   where it is small, else SDPA in float32. A benchmark never times a wrong result.
3. Peak memory (CUDA): ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what is
   allocated before the call (the inputs, the upstream gradient, the module's weights).
4. Time: on CUDA ``triton.testing.do_bench`` (median, its warm-up excluded, L2 flushed between
   calls); on CPU the ``perf_counter`` median of 1 to 5 pytest-benchmark rounds (a smoke run:
   the interpreter's time means nothing). The median goes to ``extra_info["median_ms"]``.
5. ``extra_info``: shape, schedule, backend, mode, dtype, median ms, peak MiB, FLOPs, TFLOP/s,
   % of the bf16 matmul peak measured once per session, device, versions, commit.
"""
from __future__ import annotations

import copy
import functools
import gc
import os
import platform
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import torch

from vb_kernels.testing import TOLERANCE, make_inputs, rel_err

from . import backends
from .models import ModelCase
from .shapes import Row, make_schedule

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REPO = Path(__file__).resolve().parent.parent
GRAD_TOLERANCE_FACTOR = 4  # gradients go through two more matmuls; tests/ hold the tight checks
GPU_ROUNDS = 3  # pytest-benchmark's own (synchronised, host-timed) rounds on CUDA, for its table
CPU_BUDGET_S = 0.2  # CPU rounds: as many as fit (1 to 5) by the warm-up call's time
ORACLE_F64_BYTES = 1 << 28  # reference in float64 while its score tensor stays under 256 MiB

if torch.cuda.is_available():
    # FlexAttention compiles once per shape; dynamo's default limit (8 recompiles) would make
    # later shapes fall back to slow eager flex silently. Fail instead of falling back.
    import torch._dynamo

    for _name, _value in (("recompile_limit", 4096), ("accumulated_recompile_limit", 65536),
                          ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, _name):
            setattr(torch._dynamo.config, _name, _value)


# ---- parametrisation --------------------------------------------------------------------------
def full_grid(config) -> bool:
    """``--bench-full`` or ``BENCH_FULL=1``: the whole grid instead of the default GPU subset."""
    return config.getoption("--bench-full", default=False) or os.environ.get("BENCH_FULL") == "1"


def params(rows: list[Row]) -> list:
    """pytest params: smoke rows marked ``smoke``; rows this machine cannot run (no CUDA, a
    package missing) skipped with the reason, decided at collection.

    GPU rows carry no ``gpu`` mark on purpose: ``pytest -m gpu`` is the GPU test run, and
    must not pull in minutes of benchmarks; ``pytest bench -m "not smoke"`` selects them.
    """
    cuda = torch.cuda.is_available()
    out = []
    for row in rows:
        marks = [pytest.mark.smoke] if row.smoke else []
        reason = backends.skip_reason(row, cuda)
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        out.append(pytest.param(row, id=row.id, marks=marks))
    return out


# ---- the session: device, versions, commit, matmul peak ------------------------------------
def _commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without .git (the GPU machine)
        return os.environ["BENCH_COMMIT"]
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Device and versions, recorded in every row."""
    import triton

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({_cpu_name()})",
        "device_type": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "commit": _commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def matmul_peak() -> dict:
    """bf16 matmul rate of this device, measured now: the ceiling TFLOP/s are read against.

    CUDA: an 8192^3 product of random bf16 matrices, ``do_bench`` median. CPU: 512^3, best of 3
    (only so the smoke run fills the column; the CPU rows are fp32).
    """
    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 512
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to("cuda" if cuda else "cpu", torch.bfloat16) for _ in range(2))
    if cuda:
        from triton.testing import do_bench

        ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    else:
        a @ b
        ms = min(_wall_ms(lambda: a @ b) for _ in range(3))
    return {"tflops": 2 * n**3 / ms / 1e9, "n": n, "dtype": "bf16", "ms": ms}


def _wall_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ---- workloads ------------------------------------------------------------------------------
class BackwardMissing(Exception):
    """The backend's output carries no autograd graph: it has no backward (yet)."""


class Workload:
    """The inputs of one case in one dtype, and how to run them through an attention callable.

    Op cases: ``inputs`` = (q, k, v, k_img, v_img). Model cases: a seeded module and its
    forward's inputs. ``grad_out`` (fwd+bwd only) is the upstream gradient of the output.
    """

    def __init__(self, case, dtype: torch.dtype, device: str, grad: bool):
        gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
        self.case = case
        self.schedule = make_schedule(case.schedule, case.f)
        if isinstance(case, ModelCase):
            self.module, self.inputs = case.build(dtype, device, gen, grad)
        else:
            self.module = None
            self.inputs = make_inputs(case.b, case.f, case.n, case.h, case.d, case.m, dtype=dtype,
                                      device=device, requires_grad=grad, generator=gen)
        out_shape = self.inputs[0].shape  # q for the op, x for the blocks
        self.grad_out = torch.randn(out_shape, generator=gen).to(device, dtype) if grad else None

    def forward(self, attention) -> torch.Tensor:
        if self.module is None:
            return attention(*self.inputs, schedule=self.schedule)
        return self.module(*self.inputs, attention=attention, schedule=self.schedule)

    def leaves(self) -> list[torch.Tensor]:
        """What a backward fills: inputs that require grad, then trainable weights."""
        params = [] if self.module is None else [p for p in self.module.parameters() if p.requires_grad]
        return [t for t in self.inputs if t is not None and t.requires_grad] + params

    def input_bytes(self) -> int:
        held = [t for t in self.inputs if t is not None]
        held += [] if self.module is None else list(self.module.parameters())
        return sum(t.numel() * t.element_size() for t in held)

    def upcast(self, dtype: torch.dtype) -> "Workload":
        """The same values in ``dtype`` (the oracle's inputs)."""
        other = copy.copy(self)
        other.inputs = tuple(None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
                             for t in self.inputs)
        other.module = None if self.module is None else copy.deepcopy(self.module).to(dtype)
        other.grad_out = None if self.grad_out is None else self.grad_out.to(dtype)
        return other


def run_once(w: Workload, attention, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One call: (output, gradients of ``w.leaves()``; empty in fwd mode)."""
    for t in w.leaves():
        t.grad = None
    if mode == "fwd":
        with torch.no_grad():
            return w.forward(attention), []
    out = w.forward(attention)
    if not out.requires_grad:
        raise BackwardMissing("its output has no autograd graph (no backward yet)")
    out.backward(w.grad_out)
    return out.detach(), [t.grad for t in w.leaves()]


class Step:
    """The timed callable: clear the gradients, then one forward (and backward)."""

    def __init__(self, w: Workload, attention, mode: str):
        self.w, self.attention, self.mode = w, attention, mode

    def clear(self) -> None:
        for t in self.w.leaves():
            t.grad = None

    def step(self) -> None:
        if self.mode == "fwd":
            with torch.no_grad():
                self.w.forward(self.attention)
        else:
            self.w.forward(self.attention).backward(self.w.grad_out)

    def __call__(self) -> None:
        self.clear()
        self.step()


def _op_case(case):
    return case.op_case() if isinstance(case, ModelCase) else case


def oracle_spec(case, device: str) -> tuple[torch.dtype, str]:
    """(dtype, backend) of the oracle: reference in float64 while small, else SDPA in float32."""
    c = _op_case(case)
    keys = max(make_schedule(c.schedule, c.f).keys_per_frame(c.n, c.m or 0) + [c.n + (c.m or 0)])
    small = c.b * c.f * c.h * c.n * keys * 8 <= ORACLE_F64_BYTES
    return (torch.float64, "reference") if small or device == "cpu" else (torch.float32, "sdpa")


@functools.lru_cache(maxsize=1)
def prepared(case, dtype: str, mode: str, device: str):
    """(workload, oracle output, oracle gradients, oracle name) for the backends of one case.

    Cached for one case at a time: rows are ordered backend-innermost, so the inputs and the
    oracle are built once per (case, dtype, mode), and the last case's tensors are freed when the
    next one arrives.
    """
    w = Workload(case, DTYPES[dtype], device, grad=mode != "fwd")
    o_dtype, o_backend = oracle_spec(case, device)
    out, grads = run_once(w.upcast(o_dtype), backends.attention(o_backend), mode)
    return w, out, grads, f"{o_backend} {str(o_dtype).removeprefix('torch.')}"


def check(row: Row, out, grads, ref_out, ref_grads) -> dict:
    """Relative errors against the oracle; fails the row when over DESIGN.md's tolerance."""
    tol = TOLERANCE[DTYPES[row.dtype]]
    errs = {"rel_err": rel_err(out, ref_out)}
    if ref_grads:
        errs["rel_err_grad"] = max(rel_err(g, r) for g, r in zip(grads, ref_grads))
    assert errs["rel_err"] <= tol, f"{row.backend}: output off the oracle: rel err {errs['rel_err']:.3g} > {tol}"
    if ref_grads:
        gtol = GRAD_TOLERANCE_FACTOR * tol
        assert errs["rel_err_grad"] <= gtol, (
            f"{row.backend}: gradients off the oracle: rel err {errs['rel_err_grad']:.3g} > {gtol}")
    return errs


def peak_mib(step: Step) -> float | None:
    """Peak device memory of one call beyond what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    step.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def row_flops(case, mode: str) -> int:
    """DESIGN.md FLOPs of the attention (+ the block's matmuls for model rows). fwd+bwd counts
    the attention as 3.5x its forward (2 matmuls forward, 5 backward) and matmuls as 3x."""
    op = _op_case(case).flops()
    lin = case.linear_flops() if isinstance(case, ModelCase) else 0
    return op + lin if mode == "fwd" else int(3.5 * op) + 3 * lin


def _time(benchmark, step: Step, first_call_s: float) -> tuple[float | None, str]:
    if torch.cuda.is_available():
        from triton.testing import do_bench

        ms = do_bench(step, warmup=25, rep=100, return_mode="median")

        def synced():
            step()
            torch.cuda.synchronize()
        benchmark.pedantic(synced, rounds=GPU_ROUNDS, iterations=1)
        return ms, "triton.testing.do_bench median (warm-up excluded)"
    # Smoke run: the interpreter's calls take up to a second, the reference's a millisecond;
    # the median of a few rounds keeps one descheduled call from reading as a 100x slowdown.
    rounds = max(1, min(5, int(CPU_BUDGET_S / max(first_call_s, 1e-6))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=int(rounds > 1))
    ms = benchmark.stats.stats.median * 1e3 if benchmark.stats else None
    return ms, f"perf_counter median of {rounds} round(s) after the checked warm-up call"


def _measure(benchmark, row: Row, device: str) -> dict:
    """Steps 1-4 of the module docstring; returns what they found for ``extra_info``."""
    w, ref_out, ref_grads, oracle = prepared(row.case, row.dtype, row.mode, device)
    step = Step(w, backends.attention(row.backend), row.mode)
    try:
        t0 = time.perf_counter()
        out, grads = run_once(w, step.attention, row.mode)
        first_call_s = time.perf_counter() - t0
    except NotImplementedError as e:
        pytest.xfail(f"{row.backend} {row.mode}: not implemented ({e})")
    except BackwardMissing as e:
        pytest.xfail(f"{row.backend} {row.mode}: {e}")
    except RuntimeError as e:
        reason = backends.refuses_shape(row.backend, e)
        if reason is None:
            raise
        pytest.skip(reason)
    errs = check(row, out, grads, ref_out, ref_grads)
    del out, grads
    mem = peak_mib(step)
    ms, timer = _time(benchmark, step, first_call_s)
    step.clear()
    return {"median_ms": ms, "timer": timer, "peak_mib": mem, "input_mib": w.input_bytes() / 2**20,
            "oracle": oracle, **errs}


def measure_row(benchmark, row: Row, peak: dict) -> None:
    """Check, then measure one row and record it in ``benchmark.extra_info`` (module docstring)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    benchmark.group = f"{row.case.id} {row.mode} {row.dtype}"
    oom = None
    try:
        found = _measure(benchmark, row, device)
    except torch.cuda.OutOfMemoryError as e:
        oom = str(e).splitlines()[0]
    if oom is not None:
        # Out of the except block, the frames that held the tensors are gone: free the cache too.
        prepared.cache_clear()
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory on this device: {oom}")

    case = row.case
    flops = row_flops(case, row.mode)
    ms = found["median_ms"]
    tflops = flops / ms / 1e9 if ms else None
    benchmark.extra_info.update({
        "kind": "model" if isinstance(case, ModelCase) else "op",
        "model": getattr(case, "model", None),
        "set": case.set, "case": case.id, "name": case.name, "shape": case.shape(),
        "schedule": case.schedule, "backend": row.backend, "mode": row.mode, "dtype": row.dtype,
        **found,
        "flops": flops, "tflops": tflops,
        "matmul_peak_tflops": peak["tflops"],
        "pct_matmul_peak": 100 * tflops / peak["tflops"] if tflops else None,
        **environment(),
    })
