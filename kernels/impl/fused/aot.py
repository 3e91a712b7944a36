"""Compile the fused kernels for a GPU target on a machine without a GPU.

The Triton interpreter runs the kernels' Python, not the compiler: code that the interpreter
accepts can still fail to compile (a non-constexpr global, a type mismatch between branches).
This builds TTIR -> TTGIR -> PTX -> cubin for a given SM with Triton's bundled ptxas, so the CPU
test suite catches those, and prints what a kernel engineer looks at first (shared memory, wgmma
use). Run without TRITON_INTERPRET:

    python -m kernels.impl.fused.aot --arch 90 --dtype fp16 --head-dim 40 80 160
"""
from __future__ import annotations

import argparse
import os
import sys

_POINTERS_I32 = {"row_qframe", "n_src", "src_frame", "src_vslot", "tgt_frame", "tgt_vslot", "n_rd", "rd_row"}
_POINTERS_F32 = {"src_logw", "rd_logw", "LSE", "DLSE", "DELTA"}
_POINTERS_DATA = {"Q", "K", "V", "U", "KI", "VI", "O", "DO", "DQ", "DK", "DV", "DU", "DKI", "DVI"}
_FLOATS = {"qk_scale", "scale"}


def compile_kernel(fn, dtype: str, head_dim: int, arch: int, kernel: str, tokens: int | None = None, **flags):
    elem_bytes = 4 if dtype == "fp32" else 2
    """Compile one @triton.jit kernel of this package for ``cuda:arch``; returns the CompiledKernel."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .forward import block_config

    cfg = block_config(head_dim, torch.device("cuda"), kernel, n_queries=tokens, n_keys=tokens,
                       elem_bytes=elem_bytes)
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    consts = {"HEAD_DIM": head_dim, **cfg, **flags}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _POINTERS_DATA:
            sig[name] = "*" + dtype
        elif name in _POINTERS_F32:
            sig[name] = "*fp32"
        elif name in _POINTERS_I32:
            sig[name] = "*i32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:  # strides and sizes
            sig[name] = "i32"
    # What a launch on ordinary tensors specialises on: 16-byte aligned pointers and strides
    # divisible by 16 (without these hints the build is the unaligned, unpipelined variant).
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if name not in consts and (sig[name].startswith("*") or name.startswith("stride_"))}
    src = ASTSource(fn, sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _registers(ptx: str, arch: int) -> str:
    """Registers and spill bytes from ``ptxas -v`` (Triton's bundled ptxas), or '' if absent."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(arch)
        ptxas = tool.path if hasattr(tool, "path") else tool[0]
    except Exception:  # noqa: BLE001 - informational only, across Triton versions
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([ptxas, "-v", f"-arch={sm}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'} B" if regs else ""


def kernels():
    from .backward import _bwd_dkv_kernel, _bwd_dq_kernel
    from .forward import _fwd_kernel
    return [("fwd", _fwd_kernel, "fwd", {"HAS_IMG": True}),
            ("bwd_dq", _bwd_dq_kernel, "dq", {"HAS_IMG": True, "HAS_DLSE": True, "ACCUMULATE": True}),
            ("bwd_dkv", _bwd_dkv_kernel, "dkv", {"ACCUMULATE": True})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100), 90 (H100/H200)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--head-dim", type=int, nargs="+", default=[40, 64, 80, 128, 160])
    p.add_argument("--tokens", type=int, default=None, help="tokens per frame (small N shrinks the tiles)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    for d in args.head_dim:
        for name, fn, kernel, flags in kernels():
            k = compile_kernel(fn, args.dtype, d, args.arch, kernel, args.tokens, **flags)
            ptx = k.asm["ptx"]
            mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "none")
            print(f"sm_{args.arch} {args.dtype} D={d:<3} N={args.tokens or 'big'} {name:<8} shared={k.metadata.shared:>6} B  "
                  f"mma={mma:<5} {_registers(ptx, args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
