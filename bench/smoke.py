"""The GPU run's smoke stage: every backward build checked in seconds, before anything is timed.

    python -m bench.smoke --out DIR            # on the GPU machine (bench.gpu_run's stage after warm)
    python -m bench.smoke --out DIR --dry-run  # tiny shapes on CPU through Triton's interpreter (CI)

Checks, in this order (``plan``), each at a small shape (B1 F3 N300 H2 D40 M77) and at the
512 px U-Net's top level cut to 8 frames (B1 F8 N4096 H8 D40 M4096), bf16, the paper's schedule:
- ``split``, ``fused`` (ordered dQ adds), ``fused_atomic`` (``deterministic=False``): forward and
  backward, the output and all five gradients against an oracle (the float64 reference at the
  small shape, SDPA in fp32 at N 4096, where the float64 scores would not fit) and against the
  split pair's gradients, DESIGN.md's tolerances (x5 for 16-bit gradients, as tests/). The fused
  build's final semaphore counts are checked too (:func:`check_semaphores`). The ordered build
  runs under ``launch.debug_constants(POLL_LIMIT=1 << 20)``: a wait that never passes traps
  after about a million polls (well under a second) instead of 2^28 (minutes).
- ``stress``: the ordered build with ``STALL_NS=20000`` as well (the last warp of every dK/dV
  block sleeps 20 us before each poll, so its block's other warps pass the wait, add and release
  first: the schedule the old equality rule would deadlock on): bitwise the same output and
  gradients as without the stall, and the same semaphore counts.

The split pair and the atomic build never wait, so they run with the default constants (the
binaries the headline stage times). Each distinct debug value is its own binary: bench.warm
compiles them with the rest (``smoke_calls``).

How a trap or a hang is kept from taking the stage with it: the checks run in a worker process
(``--worker``) that reports each one on its stdout; this process (the supervisor) writes the
verdict file ``smoke.json`` before the first check ("running") and again, atomically (a temp
file, then ``os.replace``), after each one, so a trap that kills the CUDA context still leaves
the checks done so far on disk. A worker that reports a trap (the CUDA context is then lost)
exits, one that dies mid-check is recorded as a ``trap`` (a CUDA launch failure in its stderr)
or ``crash``, one silent for ``--silence`` seconds as a ``hang`` (it is killed); a fresh worker
then runs the checks left. Checks the budget (``--budget``, 20 s) does not reach are ``cut``.

In the interpreter (``--dry-run``) the shapes are tiny, fp32 (no bf16 there), and the debug
constants are not applied (no ``nanosleep`` or inline PTX there: POLL_LIMIT and STALL_NS are
compiled-only); the stress check is then a plain bitwise repeat, and the JSON says so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 20.0
POLL_LIMIT = 1 << 20  # polls before the ordered wait traps: about a second at most
STALL_NS = 20000  # the stress build: the last warp of every dK/dV block polls 20 us late
SCHEDULE = "videobooth"
# (B, F, N, H, D, M): on a GPU (bf16), and in the interpreter (fp32; N 300 takes minutes there)
SHAPES = {"small": (1, 3, 300, 2, 40, 77), "n4096": (1, 8, 4096, 8, 40, 4096)}
DRY_SHAPES = {"small": (1, 3, 17, 2, 40, 9), "n4096": (1, 3, 20, 1, 40, 24)}  # n4096: M > N here
# builds: (name, bwd_build, deterministic dQ, debug constants)
BUILDS = (("split", "split", True, {}), ("fused", "fused", True, {"POLL_LIMIT": POLL_LIMIT}),
          ("fused_atomic", "fused", False, {}))
STRESS = {"POLL_LIMIT": POLL_LIMIT, "STALL_NS": STALL_NS}
SILENCE_S = 8.0  # a worker silent this long on a GPU is hung (the poll limit traps in about 1 s)
STARTUP_S = 30.0  # a worker's imports and CUDA context, before its first report line
DRY_SILENCE_S = 900.0  # the interpreter: a check takes up to minutes on a loaded 2-core machine
GRAD_FACTOR_16BIT = 5  # gradients in fp16 / bf16: 5x the output's tolerance (as tests/)
NAMES = ("q", "k", "v", "k_img", "v_img")
EVENT = "@@smoke "  # the worker's report lines start with this
TRAP_WORDS = ("illegal instruction", "unspecified launch failure", "trap")


def plan(dry: bool = False) -> list[dict]:
    """The checks, in run order: per shape, each build then the stress run."""
    shapes = DRY_SHAPES if dry else SHAPES
    checks = []
    for key, shape in shapes.items():
        for name, build, det, debug in BUILDS:
            checks.append(dict(name=f"{key}.{name}", shape=key, dims=list(shape), build=build, deterministic=det,
                               debug={} if dry else dict(debug), kind="grads"))
        checks.append(dict(name=f"{key}.stress", shape=key, dims=list(shape), build="fused", deterministic=True,
                           debug={} if dry else dict(STRESS), kind="stress"))
    return checks


def smoke_calls() -> list[tuple]:
    """The smoke stage's triton calls on a GPU, as bench.warm's calls (backward build, schedule
    name, shape, dtype, with backward, deterministic dQ, source, debug constants): contiguous
    inputs (``make_inputs``' default, bench.warm's "bench" layout), the paper's schedule."""
    import torch

    calls = []
    for c in plan(dry=False):
        runs = [c["debug"]] if c["kind"] == "grads" else [{"POLL_LIMIT": POLL_LIMIT}, c["debug"]]
        calls += [(c["build"], SCHEDULE, tuple(c["dims"]), torch.bfloat16, True, c["deterministic"], "bench", d)
                  for d in runs]
    return calls


# ---- the fused build's semaphores --------------------------------------------------------------
class LaunchRecorder:
    """A :func:`vb_kernels.impl.fused.launch.intercept` hook that launches each kernel as
    ``launch`` would and keeps what a check reads afterwards: every kernel's name, and for each
    dK/dV launch (``_bwd_dkv*``) :func:`dkv_launch_info`. A launch with ordered dQ adds is
    waited for (a device synchronisation) and its semaphores copied at once: the counts are
    final when its last program has released, and the next phase may reuse (and re-zero) the
    memory. ``on_launch(name)``: called before each launch (the worker's progress report)."""

    def __init__(self, on_launch=None):
        self.names: list[str] = []
        self.dkv: list[dict] = []
        self.on_launch = on_launch

    def __call__(self, kernel, grid, args, kwargs):
        name = getattr(kernel, "__name__", type(kernel).__name__)
        if self.on_launch is not None:
            self.on_launch(name)
        kernel[grid](*args, **kwargs)
        self.names.append(name)
        if name.startswith("_bwd_dkv"):
            info = dkv_launch_info(name, launch_args(kernel, args, kwargs), grid)
            if info["ordered"]:
                sem = info["sem"]
                if sem.is_cuda:
                    import torch

                    torch.cuda.synchronize(sem.device)
                info["sem"] = sem.detach().clone()
            self.dkv.append(info)


def launch_args(kernel, args, kwargs) -> dict:
    """A launch's arguments by name (positional or keyword, else the parameter's default)."""
    import inspect

    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    values.update(kwargs)
    fn = getattr(kernel, "fn", None)
    if fn is not None:
        for p in inspect.signature(fn).parameters.values():
            if p.name not in values and p.default is not inspect.Parameter.empty:
                values[p.name] = p.default
    return values


def dkv_launch_info(name: str, v: dict, grid) -> dict:
    """What the checks read of one dK/dV launch, from its arguments by name: the grid, tiles,
    threads, build constants, the launch order's counts and, where it adds dQ in key-block order
    (``ordered``), its semaphores with their layout (rows, query tiles, batch*heads), the token
    counts N and M and the phase's rows (query frames). Two argument layouts: the fused pass
    ``_bwd_dkvq_kernel`` taking ``dqp`` = (partials, semaphores, strides, rows, query tiles,
    batch*heads), ``dims`` = (H, N, M) and ``readers`` = (row query frames, ...); or one
    ``_bwd_dkv_kernel`` with ``FUSED_DQ`` taking ``SEM``, ``n_rows``, ``n_qt``, ``n_bh``, ``N``,
    ``M`` and ``row_qframe`` by name."""
    info = {"kernel": name, "grid": tuple(grid), "ordered": False, "sem": None}
    for key in ("BLOCK_N", "BLOCK_M", "THREADS", "PART", "DETERMINISTIC", "POLL_LIMIT", "STALL_NS", "n_chain",
                "group"):
        info[key] = v.get(key)
    if "dqp" in v:
        _, sem, _, n_rows, n_qt, n_bh = v["dqp"]
        _, n, m = v["dims"]
        rows = v["readers"][0]
        ordered = bool(v.get("DETERMINISTIC"))
    else:
        sem, n_rows, n_qt, n_bh, n, m, rows = (v.get(k) for k in ("SEM", "n_rows", "n_qt", "n_bh", "N", "M",
                                                                    "row_qframe"))
        ordered = bool(v.get("FUSED_DQ")) and bool(v.get("DETERMINISTIC"))
    # a D > 128 phase launches dV (PART 1: no dQ) and dK (PART 2: every dQ add) separately
    ordered &= v.get("PART", 0) != 1
    info.update(ordered=ordered, n_rows=n_rows, n_qt=n_qt, n_bh=n_bh, N=n, M=m,
                row_qframe=[int(x) for x in rows.cpu().tolist()] if rows is not None else None)
    if ordered:
        info["sem"] = sem
    return info


def expected_semaphores(plan_rows, n_bh: int, n_qt: int, n: int, m: int, block_n: int, threads: int):
    """The final count of every semaphore of one backward phase, (slots, batch*head, rows,
    query tiles) int64, from the phase's rows (query frame, sources) alone: a row's slot j
    (its j-th source) is added into by every key block of that source, cdiv(L, BLOCK_N) of them
    (L: M for the image tokens, else N), each block's THREADS threads counting one; slots past a
    row's sources stay 0."""
    import torch

    slots = max(1, max(len(srcs) for _, srcs in plan_rows))
    want = torch.zeros(slots, n_bh, len(plan_rows), n_qt, dtype=torch.int64)
    for i, (_, srcs) in enumerate(plan_rows):
        for j, s in enumerate(srcs):
            length = m if s.frame < 0 else n
            want[j, :, i, :] = -(-length // block_n) * threads
    return want


def check_semaphores(dkv_launches: list[dict], schedule, has_image: bool) -> dict:
    """The fused build's final semaphore counts against :func:`expected_semaphores`, per backward
    phase (phase 2 first, then phase 1, as the backward runs them). ``dkv_launches``:
    :class:`LaunchRecorder`'s ``dkv`` (the counts copied as each ordered launch completed).
    Returns ok, the counts' total against the expected total, how many tiles differ (the first
    one named) and whether every count is a multiple of THREADS."""
    phases = [p for p in reversed(schedule.plan(has_image)) if p.rows]  # phase 2, then phase 1
    ordered = [a for a in dkv_launches if a["ordered"]]
    if len(ordered) != len(phases):
        return {"ok": False, "detail": f"expected {len(phases)} dK/dV launches with ordered dQ adds (one per "
                                       f"backward phase with rows), found {len(ordered)} in {len(dkv_launches)} "
                                       f"dK/dV launches"}
    res = {"ok": True, "tiles": 0, "total": 0, "expected_total": 0, "wrong_tiles": 0, "multiples": True}
    for a, phase in zip(ordered, phases):
        threads = int(a["THREADS"])
        want = expected_semaphores(phase.rows, int(a["n_bh"]), int(a["n_qt"]), int(a["N"]), int(a["M"]),
                                   int(a["BLOCK_N"]), threads)
        qframes = [qf for qf, _ in phase.rows]
        if a["row_qframe"] != qframes:
            return {"ok": False, "detail": f"a dK/dV launch's rows {a['row_qframe']} are not the phase's {qframes} "
                                           "(phases out of order?)"}
        got = a["sem"].cpu().to(dtype=want.dtype)
        if got.numel() != want.numel():
            return {"ok": False, "detail": f"semaphore buffer of {got.numel()} counts, expected {want.numel()} "
                                           f"(slots, batch*head, rows, query tiles = {tuple(want.shape)})"}
        got = got.view(want.shape)
        wrong = (got != want).nonzero()
        res["tiles"] += want.numel()
        res["total"] += int(got.sum())
        res["expected_total"] += int(want.sum())
        res["wrong_tiles"] += len(wrong)
        res["multiples"] &= bool((got % threads == 0).all())
        res.setdefault("threads", threads)
        if len(wrong) and "first_wrong" not in res:
            idx = tuple(int(x) for x in wrong[0])
            res["first_wrong"] = (f"phase rows {qframes}: (slot, batch*head, row, query tile) {idx} counted "
                                  f"{int(got[idx])}, expected {int(want[idx])}")
        res["ok"] &= len(wrong) == 0
    return res


# ---- the worker: runs the checks, reports each on stdout ---------------------------------------
def _emit(event: dict, lock=threading.Lock()) -> None:
    with lock:
        sys.stdout.write(EVENT + json.dumps(event, default=str) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self, dry: bool):
        import torch

        self.torch = torch
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.cache: dict = {}

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def inputs(self, key: str, dims):
        hit = self.cache.get(("in", key))
        if hit is None:
            from vb_kernels import Schedule
            from vb_kernels.testing import make_inputs

            b, f, n, h, d, m = dims
            gen = self.torch.Generator().manual_seed(1234 + sum(dims))  # the same in every worker
            ins = make_inputs(b, f, n, h, d, m, dtype=self.dtype, generator=gen)
            grad = self.torch.randn(b, f, n, h, d, generator=gen)
            hit = self.cache[("in", key)] = (tuple(t.to(self.device) for t in ins), grad.to(self.device, self.dtype),
                                             Schedule.videobooth(f))
        return hit

    def run(self, key, dims, build, deterministic, debug, backend="triton", dtype=None):
        """Forward and backward once: (output, the five gradients, recorder, backward ms)."""
        from vb_kernels import videobooth_attention
        from vb_kernels.impl.fused import launch

        ins, grad, sched = self.inputs(key, dims)
        leaves = [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in ins]
        rec = LaunchRecorder(on_launch=lambda name: _emit({"event": "launch", "kernel": name}))
        kw = dict(bwd_build=build, deterministic=deterministic) if backend == "triton" else {}
        with contextlib.ExitStack() as stack:
            if backend == "triton":
                stack.enter_context(launch.intercept(rec))
                if debug and not self.dry:
                    stack.enter_context(launch.debug_constants(**debug))
            out = videobooth_attention(*leaves, schedule=sched, backend=backend, **kw)
            self.sync()
            t0 = time.perf_counter()
            out.backward(grad.to(out.dtype))
            self.sync()
            ms = (time.perf_counter() - t0) * 1e3
        grads = [t.grad if t.grad is not None else self.torch.zeros_like(t) for t in leaves]
        return out.detach(), grads, rec, ms

    def oracle(self, key, dims):
        """Output and gradients of the oracle: the float64 reference (small shapes), SDPA in fp32 (N 4096)."""
        hit = self.cache.get(("oracle", key))
        if hit is None:
            if key == "small":
                out, grads, _, _ = self.run(key, dims, None, True, {}, backend="reference", dtype=self.torch.float64)
                name = "reference, float64"
            else:
                out, grads, _, _ = self.run(key, dims, None, True, {}, backend="sdpa", dtype=self.torch.float32)
                name = "sdpa, float32"
            hit = self.cache[("oracle", key)] = (out, grads, name)
        return hit

    def cached_run(self, key, dims, build, deterministic, debug):
        tag = ("run", key, build, deterministic, tuple(sorted(debug.items())))
        hit = self.cache.get(tag)
        if hit is None:
            hit = self.cache[tag] = self.run(key, dims, build, deterministic, debug)
        return hit

    def tolerance(self):
        from vb_kernels.testing import TOLERANCE

        tol = TOLERANCE[self.dtype]
        return tol, tol * (1 if self.dtype == self.torch.float32 else GRAD_FACTOR_16BIT)

    def constants_seen(self, rec) -> dict:
        """The debug constants the fused dK/dV launches took (the split pass has none)."""
        seen = {}
        for a in rec.dkv:
            for name in ("POLL_LIMIT", "STALL_NS"):
                if a[name] is not None:
                    seen.setdefault(name, set()).add(int(a[name]))
        return {k: sorted(v) for k, v in seen.items()}

    def check(self, c: dict) -> dict:
        from vb_kernels.testing import rel_err

        key, dims = c["shape"], c["dims"]
        _, _, sched = self.inputs(key, dims)
        res: dict = {}
        problems = []
        if c["kind"] == "grads":
            o_out, o_grads, o_name = self.oracle(key, dims)
            out, grads, rec, ms = self.cached_run(key, dims, c["build"], c["deterministic"], c["debug"])
            tol_out, tol_grad = self.tolerance()
            errs = {"out": rel_err(out, o_out), **{n: rel_err(g, r) for n, g, r in zip(NAMES, grads, o_grads)}}
            res.update(oracle=o_name, rel_err=errs, max_rel_err=max(errs.values()), tolerance=[tol_out, tol_grad],
                       backward_ms=round(ms, 3))
            problems += [f"{n} {e:.3g} vs {o_name} over {tol_out if n == 'out' else tol_grad}"
                         for n, e in errs.items() if not e < (tol_out if n == "out" else tol_grad)]
            if c["build"] != "split":
                s_out, s_grads, _, _ = self.cached_run(key, dims, "split", True, {})
                vs = {"out": rel_err(out, s_out), **{n: rel_err(g, r) for n, g, r in zip(NAMES, grads, s_grads)}}
                res.update(rel_err_vs_split=vs, max_rel_err_vs_split=max(vs.values()))
                problems += [f"{n} {e:.3g} vs the split pair over {tol_grad}" for n, e in vs.items()
                             if not e < tol_grad]
        else:  # stress: the ordered build with a late warp in every block, bitwise as without
            base = {k: v for k, v in c["debug"].items() if k != "STALL_NS"}
            b_out, b_grads, _, b_ms = self.cached_run(key, dims, "fused", True, base)
            out, grads, rec, ms = self.run(key, dims, "fused", True, c["debug"])
            same = {"out": bool(self.torch.equal(out, b_out)),
                    **{n: bool(self.torch.equal(g, r)) for n, g, r in zip(NAMES, grads, b_grads)}}
            res.update(bitwise_equal=same, backward_ms=round(ms, 3), backward_ms_without_stall=round(b_ms, 3),
                       max_rel_err=max([rel_err(out, b_out)] + [rel_err(g, r) for g, r in zip(grads, b_grads)]))
            problems += [f"{n} differs from the run without the stall" for n, ok in same.items() if not ok]
        if c["build"] == "fused" and c["deterministic"]:
            sems = check_semaphores(rec.dkv, sched, True)
            res["semaphores"] = sems
            if not sems["ok"]:
                problems.append(f"semaphores: {sems.get('first_wrong') or sems.get('detail')}")
        res["launch_constants"] = self.constants_seen(rec)
        if c["debug"]:  # the constants reached every dK/dV launch
            for name, value in c["debug"].items():
                if res["launch_constants"].get(name) != [value]:
                    problems.append(f"{name}: dK/dV launches took {res['launch_constants'].get(name)}, not {value}")
        res["status"] = "fail" if problems else "pass"
        if problems:
            res["detail"] = "; ".join(problems)
        return res


def _cuda_fatal(e: BaseException) -> bool:
    msg = f"{type(e).__name__}: {e}".lower()
    return "cuda" in msg or any(w in msg for w in TRAP_WORDS) or type(e).__module__.startswith("triton")


def worker_main(names: list[str], dry: bool) -> int:
    """Run the named checks in order, one report line each; exit 3 after a CUDA error (the
    context is lost: the supervisor starts a fresh worker for the checks left)."""
    import torch
    import triton

    checks = {c["name"]: c for c in plan(dry)}
    w = _Worker(dry)
    cuda = torch.cuda.is_available() and not dry
    _emit({"event": "ready", "device": torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda if cuda else None,
           "interpreter": os.environ.get("TRITON_INTERPRET") == "1"})
    for name in names:
        _emit({"event": "start", "name": name})
        t0 = time.perf_counter()
        fatal = False
        try:
            res = w.check(checks[name])
        except Exception as e:  # noqa: BLE001 - recorded; the supervisor goes on with the others
            fatal = _cuda_fatal(e)
            low = str(e).lower()
            status = "trap" if fatal and any(word in low for word in TRAP_WORDS) else "error"
            res = {"status": status, "detail": f"{type(e).__name__}: {str(e)[:400]}"}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        _emit({"event": "done", "name": name, "result": res})
        if fatal:
            return 3
    return 0


# ---- the supervisor: the verdict file, a worker per run of checks ------------------------------
def write_verdict(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a temp file beside it, then ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)


def verdict(checks: list[dict]) -> tuple[str, str]:
    """(verdict, summary): ``pass`` when every check passed, ``fail`` when one failed, trapped,
    hung, crashed or raised, else ``incomplete`` (cut by the budget)."""
    counts: dict[str, int] = {}
    for c in checks:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    bad = [c["name"] + ": " + c["status"] for c in checks if c["status"] not in ("pass", "cut", "pending", "running")]
    if bad:
        v = "fail"
    elif any(c["status"] in ("pending", "running") for c in checks):
        v = "running"
    elif counts.get("cut"):
        v = "incomplete"
    else:
        v = "pass"
    summary = f"{counts.get('pass', 0)}/{len(checks)} checks passed" + (f"; {', '.join(bad)}" if bad else "") + (
        f"; {counts['cut']} cut by the budget" if counts.get("cut") else "")
    return v, summary


def build_status(checks: list[dict]) -> dict:
    """Per build (split, fused, fused_atomic, stress) the worst status of its checks."""
    rank = ["pass", "pending", "running", "cut", "fail", "error", "crash", "hang", "trap"]
    out: dict[str, str] = {}
    for c in checks:
        b = c["name"].split(".", 1)[1]
        if b not in out or rank.index(c["status"]) > rank.index(out[b]):
            out[b] = c["status"]
    return out


def _kill(proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def supervise(checks: list[dict], out: Path, worker_cmd: list[str], *, budget_s: float = BUDGET_S,
              silence_s: float = SILENCE_S, startup_s: float = STARTUP_S, env: dict | None = None,
              meta: dict | None = None) -> dict:
    """Run ``checks`` through workers (``worker_cmd`` + ``--checks a,b,...``), writing
    ``out/smoke.json`` first and after each check; the worker's stderr goes to ``out/smoke.log``.
    A check without a report line for ``silence_s`` is a hang; a worker gets ``startup_s`` for its
    first line. Returns the final state."""
    out.mkdir(parents=True, exist_ok=True)
    path, log_path = out / "smoke.json", out / "smoke.log"
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    state = {"verdict": "running", "summary": "", "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             **(meta or {}), "checks": [dict(c, status="pending") for c in checks]}
    by_name = {c["name"]: c for c in state["checks"]}

    def save():
        state["verdict"], state["summary"] = verdict(state["checks"])
        state["builds"] = build_status(state["checks"])
        state["seconds"] = round(time.perf_counter() - t_start, 1)
        write_verdict(path, state)

    save()  # before any check: a run that dies at once still leaves a file saying so
    todo = [c["name"] for c in checks]
    workers, t0s = 0, {}
    with open(log_path, "a") as log:
        while todo:
            if time.perf_counter() >= deadline:
                for name in todo:
                    by_name[name].update(status="cut", detail=f"the smoke budget of {budget_s:.0f} s was spent")
                break
            workers += 1
            log.write(f"--- worker {workers}: {','.join(todo)}\n")
            log.flush()
            log_start = log.tell()  # this worker's stderr starts here

            def stderr_tail() -> str:
                log.flush()
                with open(log_path, errors="replace") as f:
                    f.seek(log_start)
                    return f.read()[-4000:].strip()
            proc = subprocess.Popen(worker_cmd + ["--checks", ",".join(todo)], cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=log, start_new_session=True)
            lines: queue.Queue = queue.Queue()

            def read(stream=proc.stdout, q=lines):
                for line in stream:
                    q.put(line)
                q.put(None)

            threading.Thread(target=read, daemon=True).start()
            current, started_any, last_launch = None, False, None
            while True:
                # a worker's start (imports, the CUDA context) may take longer than a check's silence
                limit = silence_s if started_any else max(silence_s, startup_s)
                wait = min(limit, deadline - time.perf_counter())
                try:
                    line = lines.get(timeout=max(0.0, wait))
                except queue.Empty:
                    _kill(proc)
                    hung = time.perf_counter() < deadline
                    if current is not None:
                        c = by_name[current]
                        c.update(status="hang" if hung else "cut",
                                 detail=(f"no progress for {limit:.0f} s (killed)" if hung
                                         else f"the smoke budget of {budget_s:.0f} s ran out during it") +
                                 (f"; last launch: {last_launch}" if last_launch else ""),
                                 seconds=round(time.perf_counter() - t0s.pop(current), 2))
                        todo.remove(current)
                    elif not started_any:  # the worker never started a check
                        for name in todo:
                            by_name[name].update(status="error" if hung else "cut",
                                                 detail=f"the worker did not start within {wait:.0f} s")
                        todo = []
                    break
                if line is None:  # the worker exited
                    rc = proc.wait()
                    if current is not None:
                        c = by_name[current]
                        tail = stderr_tail()
                        trap = any(w in tail.lower() for w in TRAP_WORDS)
                        c.update(status="trap" if trap else "crash",
                                 detail=f"the worker died (exit {rc}) during it" + (
                                     f"; last launch: {last_launch}" if last_launch else "") +
                                 f"; stderr: {tail.splitlines()[-1][:300] if tail else ''}",
                                 seconds=round(time.perf_counter() - t0s.pop(current), 2))
                        todo.remove(current)
                    elif not started_any and todo:  # died before its first check: no retry loop
                        tail = stderr_tail().splitlines()[-1:] or [""]
                        for name in todo:
                            by_name[name].update(status="error", detail=f"the worker exited ({rc}) before the check: "
                                                                        f"{tail[0][:300]}")
                        todo = []
                    break
                if not line.startswith(EVENT):
                    log.write(line)
                    continue
                ev = json.loads(line[len(EVENT):])
                if ev["event"] == "ready":
                    state.update({k: v for k, v in ev.items() if k != "event"})
                elif ev["event"] == "launch":
                    last_launch = ev["kernel"]
                    continue  # progress only: no write
                elif ev["event"] == "start":
                    current, started_any, last_launch = ev["name"], True, None
                    by_name[current]["status"] = "running"
                    t0s[current] = time.perf_counter()
                elif ev["event"] == "done":
                    t0s.pop(ev["name"], None)
                    by_name[ev["name"]].update(ev["result"])
                    todo.remove(ev["name"])
                    current = None
                save()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            if proc.poll() is None:
                _kill(proc)
            save()
    state["workers"] = workers
    save()
    return state


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "triton"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for smoke.json and smoke.log (required unless --worker)")
    ap.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on CPU through Triton's interpreter")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for every check (default {BUDGET_S:.0f})")
    ap.add_argument("--silence", type=float, help="seconds without progress that make a check a hang "
                                                  f"(default {SILENCE_S:.0f}; {DRY_SILENCE_S:.0f} in a dry run)")
    ap.add_argument("--checks", help="comma-separated check names (default: all, in order)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    known = [c["name"] for c in plan(a.dry_run)]
    names = known if not a.checks else [n.strip() for n in a.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"--checks: unknown {unknown}; expected names among {known}")
    if a.worker:
        return worker_main(names, a.dry_run)
    if a.out is None:
        ap.error("--out: expected a folder for smoke.json")
    if not a.budget > 0:
        ap.error(f"--budget: expected a positive number of seconds, got {a.budget}")
    silence = a.silence if a.silence is not None else DRY_SILENCE_S if a.dry_run else SILENCE_S
    if not silence > 0:
        ap.error(f"--silence: expected a positive number of seconds, got {silence}")
    env = dict(os.environ)
    if a.dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env.pop("VB_BWD", None)  # each check names its build
    cmd = [sys.executable, "-m", "bench.smoke", "--worker"] + (["--dry-run"] if a.dry_run else [])
    meta = dict(_versions(), interpreter=a.dry_run, poll_limit=POLL_LIMIT, stall_ns=STALL_NS, schedule=SCHEDULE,
                dtype="float32" if a.dry_run else "bfloat16",
                debug_constants=("not applied: the interpreter has no nanosleep or inline PTX (POLL_LIMIT and "
                                 "STALL_NS are compiled-only); the stress check is a plain bitwise repeat"
                                 if a.dry_run else "applied to the fused ordered build's dK/dV launches"))
    state = supervise([c for c in plan(a.dry_run) if c["name"] in names], a.out, cmd, budget_s=a.budget,
                      silence_s=silence, env=env, meta=meta)
    print(f"[smoke] {state['verdict']}: {state['summary']} ({state['seconds']} s, {a.out / 'smoke.json'})")
    return 0 if state["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
