"""Real-launch compile report: what a forward+backward call would compile on a GPU, without one.

The Triton interpreter runs the kernels' Python, not the compiler. This module runs the fused
op's real host code on real-size tensors in host memory (never read: no kernel runs), records
every launch it makes (kernel, grid, arguments; :mod:`vb_kernels.impl.fused.launch`), specialises
each launch from its actual arguments exactly as Triton's launcher does (a pointer or an integer
is marked divisible by 16 only when it is; an integer equal to 1 becomes a constant) and builds
it for a GPU target with the ptxas and cuobjdump that ship with Triton. Per kernel it reports:
registers and spill bytes (``ptxas -v``), shared memory, MMA kind and wgmma shapes, cp.async and
TMA counts, scalar 16-bit global loads, and SASS instructions of the inner loop.

    python -m vb_kernels.impl.fused.aot --head-dim 40 80 160 --tokens 4096 --dtype bf16
    python -m vb_kernels.impl.fused.aot --layout strided --markdown

Run without TRITON_INTERPRET (the interpreter does not compile).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

LAYOUTS = ("processor", "heads_first", "strided", "padded")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_KIND = {"_fwd_kernel": "fwd", "_bwd_dq_kernel": "dq", "_bwd_dkv_kernel": "dkv", "_bwd_dkvq_kernel": "dkv", "_bwd_reduce_kernel": "reduce",
         "_bwd_delta_kernel": "delta", "_bwd_dq_reduce_kernel": "dqsum"}


def make_tensors(batch: int, frames: int, tokens: int, heads: int, head_dim: int, image_tokens: int,
                 dtype, layout: str = "processor"):
    """(q, k, v, k_img, v_img) in host memory, uninitialised, laid out as a caller passes them.

    ``processor``: each of q/k/v is ``to_q(x).view(B, F, N, H, D)`` (contiguous BFNHD, head
    stride D), as the diffusers processor passes them. ``heads_first``: (B, F, H, N, D) storage
    seen as BFNHD (token stride D, head stride N*D). ``strided``: q/k/v sliced from one packed
    projection (B, F, N, 3, H, D) (token stride 3*H*D). Image tokens (B, M, H, D) contiguous
    (``strided``: sliced from a packed (B, M, 2, H, D)). ``padded``: every tensor the first D
    columns of a (..., 2D) buffer, as ``vb_kernels.testing.make_inputs(strided=True)`` leaves
    them on a GPU (the GPU tests' layout).
    """
    import torch

    b, f, n, h, d, m = batch, frames, tokens, heads, head_dim, image_tokens
    if layout == "processor":
        q, k, v = (torch.empty(b, f, n, h, d, dtype=dtype) for _ in range(3))
        ki, vi = (torch.empty(b, m, h, d, dtype=dtype) for _ in range(2))
    elif layout == "heads_first":
        q, k, v = (torch.empty(b, f, h, n, d, dtype=dtype).transpose(2, 3) for _ in range(3))
        ki, vi = (torch.empty(b, h, m, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    elif layout == "strided":
        qkv = torch.empty(b, f, n, 3, h, d, dtype=dtype)
        q, k, v = qkv.unbind(3)
        kvi = torch.empty(b, m, 2, h, d, dtype=dtype)
        ki, vi = kvi.unbind(2)
    elif layout == "padded":
        q, k, v = (torch.empty(b, f, n, h, 2 * d, dtype=dtype)[..., :d] for _ in range(3))
        ki, vi = (torch.empty(b, m, h, 2 * d, dtype=dtype)[..., :d] for _ in range(2))
    else:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return (q, k, v, ki, vi) if m else (q, k, v, None, None)


def record_launches(q, k, v, k_img, v_img, schedule=None, scale=None, backward: bool = True,
                    deterministic: bool = True, arch: int = 90):
    """Run the fused op's host code (forward, then backward) with every launch recorded, not run.

    Returns a list of (kernel, grid, (), kwargs: every argument by name), in launch order, with the tiles and the
    backward build a CUDA launch on ``sm_<arch>`` would take. The tensors may live in host memory;
    nothing reads their contents."""
    import math

    import torch

    from ...schedule import Schedule
    from . import function
    from .launch import cuda_tiles, intercept

    schedule = schedule or Schedule.videobooth(q.shape[1])
    scale = scale or 1.0 / math.sqrt(q.shape[-1])
    calls = []
    def record(kern, grid, args, kwargs):  # every argument by name (a Launch passes them positionally)
        calls.append((kern, grid, (), {**dict(zip(kern.arg_names, args)), **kwargs}))

    with cuda_tiles(arch), intercept(record):
        out, lse, u, lse1 = function.fused_fwd(q, k, v, k_img, v_img, schedule, scale)
        if backward:
            dout = torch.empty_like(out)
            function.fused_bwd(dout, q, k, v, k_img, v_img, out, lse, u, lse1, schedule, scale, None, deterministic)
    return calls


def _target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def bind_launch(kernel, args, kwargs, arch: int = 90):
    """Triton's own launch binding of one recorded launch for ``sm_<arch>`` (the code
    ``kernel[grid](...)`` runs before it compiles): (backend, kwargs, bound args, specialisation,
    options). The specialisation (which integers are divisible by 16, which pointers aligned) is
    what makes two launches compile to the same binary."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    bound_args, specialization, options = binder(*args, **kwargs)
    return backend, kwargs, bound_args, specialization, options


def compile_launch(kernel, args, kwargs, arch: int = 90, bound=None):
    """Compile one recorded launch for ``sm_<arch>`` as :func:`bind_launch` specialises it
    (``bound``: its result, when the caller has it). Returns the CompiledKernel."""
    import triton
    from triton.compiler import ASTSource

    backend, kwargs, bound_args, specialization, options = bound or bind_launch(kernel, args, kwargs, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=_target(arch), options=options.__dict__)


@functools.lru_cache(maxsize=None)
def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} does not ship with this Triton ({path})")
    return path


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) from ``ptxas -v`` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([_tool("ptxas"), "-v", f"-arch={sm}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else 0


def sass_lines(cubin: bytes) -> list[str]:
    """The SASS of a cubin (``cuobjdump -sass``), one string per instruction or label."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr[-2000:]}")
    return res.stdout.splitlines()


_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)")
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")


def inner_loops(lines: list[str]) -> list[list[str]]:
    """Instructions of each innermost SASS loop that holds an MMA (a backward branch, holding no
    other MMA loop: the fused backward's semaphore poll is a loop inside its main loop, and is
    counted as part of it), in program order. NOPs (padding) are not counted."""
    insns = []  # (address, text)
    for line in lines:
        ins = _INSN.match(line)
        if ins:
            insns.append((int(ins.group(1), 16), ins.group(2)))
    loops = []
    for addr, text in insns:
        br = _BRANCH.search(text)
        if br and int(br.group(1), 16) < addr:
            loops.append((int(br.group(1), 16), addr))

    def body(a, b):
        return [t for addr, t in insns if a <= addr <= b and not t.startswith("NOP")]

    mma_loops = [(a, b) for a, b in loops if any(_MMA.search(t) for t in body(a, b))]
    innermost = [(a, b) for a, b in mma_loops
                 if not any((c, d) != (a, b) and a <= c and d <= b for c, d in mma_loops)]
    return [body(a, b) for a, b in innermost]


def steady_loops(loops: list[list[str]]) -> list[list[str]]:
    """The loops that run over full tiles. The kernels run a source's full key tiles unmasked and
    its partial last tile in a separate, masked loop (``attend_source``, ``_dq_source``), whose
    row mask becomes FSEL instructions; that tail runs at most once per source (never when the
    tile divides the sequence), so it is not the loop the cost per key is read from. Loops with
    no FSEL, when there are any; else all of them."""
    unmasked = [body for body in loops if not any(t.split()[0] == "FSEL" or
                                                  (t.startswith("@") and t.split()[1] == "FSEL") for t in body)]
    return unmasked or loops


# Per-SM limits of the occupancy estimate (sm_80 and sm_90 alike, CUDA occupancy calculator):
# registers, shared memory (228 KiB on Hopper, 164 KiB on A100: the smaller is taken below sm_90),
# threads, resident CTAs; registers are allocated per warp in units of 256.
_SM_REGS, _SM_THREADS, _SM_CTAS, _REG_UNIT = 65536, 2048, 32, 256
_SM_SHARED = {90: 233472, 80: 167936}
_CTA_RESERVED_SHARED = 1024


def ctas_per_sm(regs: int, shared: int, num_warps: int, arch: int = 90) -> int:
    """Resident CTAs per SM that registers, shared memory and threads allow (the occupancy
    calculator's rule; 0 when one CTA does not fit)."""
    per_warp = -(-max(regs, 1) * 32 // _REG_UNIT) * _REG_UNIT
    by_regs = (_SM_REGS // per_warp) // num_warps
    by_shared = _SM_SHARED.get(arch, _SM_SHARED[80]) // (shared + _CTA_RESERVED_SHARED)
    return min(by_regs, by_shared, _SM_THREADS // (32 * num_warps), _SM_CTAS)


@dataclasses.dataclass
class KernelReport:
    """What one launch compiles to. ``loop_insts``: SASS instructions of the largest innermost MMA
    loop over full tiles (:func:`steady_loops`; one iteration, one warp); ``per64``: warp-instructions per 128 x 64 (query x key)
    score tile divided by 8 (for the forward with 8 warps on 128 queries: SASS instructions per
    64 keys, the issue's measure)."""

    kernel: str
    phase: int
    grid: tuple
    tiles: dict
    regs: int
    spill: int
    shared: int
    mma: str
    wgmma: dict
    cp_async: int
    tma: int
    scalar16: int
    loop_insts: int
    per64: float
    loop_mix: dict
    mufu_per_score: float = 0.0  # MUFU (ex2, rcp, ...) lane-instructions per score in the loop
    atomics: int = 0  # atom./red. instructions in the PTX (the fused backward's dQ adds and semaphore)
    unordered_adds: int = 0  # float atomics outside a wait-release window (:func:`unordered_float_atomics`)
    ctas_per_sm: int = 0  # resident CTAs per SM by registers, shared memory and threads (:func:`ctas_per_sm`)
    poll_rule: str = ""  # how the semaphore polls compare the count with their target (:func:`poll_rules`)

    def row(self) -> dict:
        return dataclasses.asdict(self)


def analyse(kernel, grid, args, kwargs, arch: int = 90, phase: int = 0, bound=None) -> KernelReport:
    """Compile one recorded launch and read what it became (``bound``: its :func:`bind_launch`)."""
    k = compile_launch(kernel, args, kwargs, arch, bound)
    ptx = k.asm["ptx"]
    regs, spill = _ptxas_usage(ptx, arch)
    shapes = Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    mma = "wgmma" if shapes else ("mma.sync" if "mma.sync" in ptx else "none")
    cp_async = len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx))
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    # scalar 16-bit global loads: one element per thread, what an unaligned tile load becomes
    scalar16 = len(re.findall(r"\bld\.global(?:\.(?!v\d)[\w:]+)*\.[bu]16\b", ptx))
    loops = inner_loops(sass_lines(k.asm["cubin"])) if "cubin" in k.asm else []
    body = max(steady_loops(loops), key=len) if loops else []
    # issue slots per 128 x 64 (query x key) tile, in units of 8 warps: the loop body runs on
    # every warp, over BLOCK_M x BLOCK_N scores per iteration (the reductions have no score tile)
    scores = kwargs["BLOCK_M"] * kwargs["BLOCK_N"] if "BLOCK_M" in kwargs and "BLOCK_N" in kwargs else 0
    warps = kwargs.get("num_warps", 4)
    norm = 128 * 64 / scores * warps / 8 if scores else 0.0
    mix = Counter((t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0] for t in body)
    tiles = {key: kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if key in kwargs}
    kind = {1: "dv", 2: "dk"}.get(kwargs.get("PART"), _KIND[kernel.__name__])  # split dK/dV launches
    per_score = mix.get("MUFU", 0) * 32 * warps / scores if scores else 0.0  # lane-instructions per score
    atomics = len(re.findall(r"\b(?:atom|red)\.", ptx))
    return KernelReport(kind, phase, tuple(grid), tiles, regs, spill, k.metadata.shared,
                        mma, dict(shapes), cp_async, tma, scalar16, len(body),
                        round(len(body) * norm, 1), dict(mix.most_common(12)), round(per_score, 2), atomics,
                        unordered_float_atomics(ptx), ctas_per_sm(regs, k.metadata.shared, warps, arch),
                        poll_rules(ptx))


_POLL = re.compile(r"\bld\.global\.acquire\.gpu\.b32\s+(%r\d+),[^\n]*\n(?:\s*\.loc[^\n]*\n)*"
                   r"\s*setp\.(\w+)\.s32\s+[%\w]+,\s*(%r\d+),")


def poll_rules(ptx: str) -> str:
    """The comparisons of the semaphore polls (an acquire load of the count, then a compare with
    the target), e.g. ``"ge"``; empty when the kernel has none. The ordered dQ wait must pass at
    count >= target (``_wait_count``): an ``eq`` poll can miss its target and spin forever."""
    return ",".join(sorted({m.group(2) for m in _POLL.finditer(ptx) if m.group(1) == m.group(3)}))


_ATOMIC = re.compile(r"\b(?:atom|red)\.[\w.:]*")
_ACQUIRE_LOAD = re.compile(r"\bld\.(?:global\.)?acquire\.")
_FLOAT_TYPE = re.compile(r"\.(?:f16|bf16|f32|f64)\b")


def unordered_float_atomics(ptx: str) -> int:
    """Float atomics (the dQ adds) outside an ordered window, in PTX program order: a window opens
    at an acquire load (the semaphore wait) and closes at a release atomic (the block's count).
    The deterministic fused backward must have none (its adds run only after the wait for the
    previous key block, before its own release); the atomic build's adds are all outside."""
    ordered, out = False, 0
    for line in ptx.splitlines():
        if _ACQUIRE_LOAD.search(line):
            ordered = True
        op = _ATOMIC.search(line)
        if op is None:
            continue
        if ".release" in op.group(0):
            ordered = False
        elif _FLOAT_TYPE.search(op.group(0)):
            out += not ordered
    return out


def report(batch=2, frames=16, tokens=4096, heads=8, head_dim=40, image_tokens=None, dtype="fp16",
           layout="processor", arch=90, schedule=None, backward=True, deterministic=True) -> list[KernelReport]:
    """Compile report of every distinct kernel a forward(+backward) call launches for these
    shapes (``image_tokens`` None = ``tokens``; 0 = no image). Launches that compile to the same
    binary (same specialisation) are reported once, with the phase of their first launch."""
    import torch

    m = tokens if image_tokens is None else image_tokens
    tensors = make_tensors(batch, frames, tokens, heads, head_dim, m, getattr(torch, DTYPES[dtype]), layout)
    calls = record_launches(*tensors, schedule=schedule, backward=backward, deterministic=deterministic,
                            arch=arch)
    out, seen = [], set()
    n_fwd = sum(_KIND[kern.__name__] == "fwd" for kern, *_ in calls)
    count = Counter()
    bwd_phase = 2
    for kern, grid, args, kwargs in calls:
        kind = _KIND[kern.__name__]
        count[kind] += 1
        # forward: phase 1 (when there is one) launches first; backward: phase 2 first, and a
        # phase's dK/dV launch(es) and reduction follow its dq launch
        if kind in ("dq", "delta"):  # the first launch of a backward phase (split / fused build)
            bwd_phase = 3 - count[kind]
        phase = (count[kind] if n_fwd == 2 else 2) if kind == "fwd" else bwd_phase
        bound = bind_launch(kern, args, kwargs, arch)  # bound once: the key, then the compile
        key = (kern.__name__, str(bound[3]), str(sorted(bound[4].items())))
        if key not in seen:
            seen.add(key)
            out.append(analyse(kern, grid, args, kwargs, arch, phase, bound))
    return out


def markdown(rows: list[dict]) -> str:
    """A markdown table of report rows (dicts: shape fields + :meth:`KernelReport.row`, as in the
    ``--json`` file); docs/kernels.md's compile table is this, from ``--from-json``."""
    head = ("| D | dtype | layout | kernel | phase | tiles (M, N, warps, stages) | regs | spill B | shared KiB "
            "| MMA (wgmma shapes) | cp.async | TMA | scalar 16-bit loads | SASS / loop | per 128x64 tile "
            "| MUFU / score | atomics (unordered float) | CTAs / SM |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r["tiles"]
        shapes = ", ".join(f"{k} x{v}" for k, v in sorted(r["wgmma"].items())) or r["mma"]
        lines.append(f"| {r['head_dim']} | {r['dtype']} | {r['layout']} | {r['kernel']} | {r['phase']} "
                     f"| {t.get('BLOCK_M')}, {t.get('BLOCK_N')}, {t.get('num_warps')}, {t.get('num_stages')} "
                     f"| {r['regs']} | {r['spill']} | {r['shared'] / 1024:.0f} | {shapes} | {r['cp_async']} | {r['tma']} "
                     f"| {r['scalar16']} | {r['loop_insts']} | {r['per64']:g} | {r.get('mufu_per_score', '')} "
                     f"| {r.get('atomics', '')} ({r.get('unordered_adds', '')}) | {r.get('ctas_per_sm', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100), 90 (H100/H200)")
    p.add_argument("--dtype", nargs="+", default=["fp16"], choices=sorted(DTYPES))
    p.add_argument("--head-dim", type=int, nargs="+", default=[40, 64, 72, 80, 128, 160])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per frame N")
    p.add_argument("--image-tokens", type=int, default=None, help="image tokens M (default N; 0: none)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layout", nargs="+", default=["processor"], choices=LAYOUTS)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--atomic", action="store_true", help="the backward's atomic dQ build (deterministic=False)")
    p.add_argument("--tf32", action="store_true", help="fp32: compile as after torch.set_float32_matmul_precision"
                   "('high') (TF32 dots); default IEEE")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--verbose", action="store_true", help="also print the inner loop's instruction mix")
    p.add_argument("--json", default=None, help="also write every row (shape + report) to this JSON file")
    p.add_argument("--from-json", default=None, help="print the markdown table of a saved --json file and exit")
    args = p.parse_args(argv)
    if args.from_json:
        import json
        with open(args.from_json) as fh:
            rows = json.load(fh)
        keep = [r for r in rows if r["dtype"] in args.dtype and r["layout"] in args.layout]
        print(markdown(keep or rows))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    if args.tf32:
        import torch
        torch.set_float32_matmul_precision("high")
    rows = []
    for dtype in args.dtype:
        for layout in args.layout:
            for d in args.head_dim:
                shape = dict(head_dim=d, dtype=dtype, layout=layout)
                for r in report(args.batch, args.frames, args.tokens, args.heads, d, args.image_tokens, dtype,
                                layout, args.arch, backward=not args.forward_only,
                                deterministic=not args.atomic):
                    rows.append({**shape, **r.row()})
                    if not args.markdown:
                        print(f"sm_{args.arch} {dtype} {layout} D={d:<3} N={args.tokens} {r.kernel:<4} "
                              f"phase={r.phase} tiles={tuple(r.tiles.values())} regs={r.regs} spill={r.spill} B "
                              f"shared={r.shared} B mma={r.mma} {r.wgmma} cp.async={r.cp_async} tma={r.tma} "
                              f"scalar16={r.scalar16} loop={r.loop_insts} per64={r.per64:g} "
                              f"mufu/score={r.mufu_per_score:g} atomics={r.atomics} unordered={r.unordered_adds} "
                              f"ctas/sm={r.ctas_per_sm}", flush=True)
                        if args.verbose:
                            print("    mix:", r.loop_mix)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        import json
        meta = dict(arch=args.arch, tokens=args.tokens, batch=args.batch, frames=args.frames, heads=args.heads,
                    image_tokens=args.image_tokens, triton=_version("triton"), torch=_version("torch"))
        with open(args.json, "w") as fh:
            json.dump([{**meta, **row} for row in rows], fh, indent=1)
    return 0


def _version(mod: str) -> str:
    import importlib
    return importlib.import_module(mod).__version__


if __name__ == "__main__":
    sys.exit(main())
