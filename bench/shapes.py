"""The benchmark registry: named shapes, schedules, and which rows the suite runs.

A :class:`Case` is one call of the op (B, F, N, H, D, M and a schedule); a :class:`Row` is a
case timed with one backend, mode and dtype. :func:`op_rows` lists the rows of
``bench_attention.py``; the default GPU subset is documented there and in docs/bench.md, and
``--bench-full`` (or ``BENCH_FULL=1``) gives the whole grid. Shapes come from DESIGN.md
sections 1 and 4.
"""
from __future__ import annotations

from dataclasses import dataclass

from vb_kernels import Schedule

# ---- schedules (DESIGN.md section 2) --------------------------------------------------------
# name -> (constructor name on vb_kernels.Schedule, its extra argument or None, image_everywhere)
SCHEDULES = {
    "videobooth": ("videobooth", None, False),
    "first": ("first", None, False),
    "window2": ("window", 2, False),
    "window4": ("window", 4, False),
    "keyframes4": ("keyframes", 4, False),
    "keyframes8": ("keyframes", 8, False),
    "videobooth+img": ("videobooth", None, True),  # image tokens prepended to every frame's keys
}


def make_schedule(name: str, num_frames: int) -> Schedule:
    """The :class:`vb_kernels.Schedule` registered under ``name`` for ``num_frames`` frames."""
    ctor, arg, image_everywhere = SCHEDULES[name]
    build = getattr(Schedule, ctor)
    sched = build(num_frames) if arg is None else build(num_frames, arg)
    return sched.with_image_everywhere() if image_everywhere else sched


# ---- cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of the op: frames (B, F, N, H, D), image tokens (B, M, H, D) or none (m=None)."""

    set: str  # shape set: vb256, vb512, dit, sched, bank, long, smoke
    name: str  # what the shape is (U-Net level, DiT head dim, ...)
    b: int
    f: int
    n: int
    h: int
    d: int
    m: int | None
    schedule: str = "videobooth"

    @property
    def id(self) -> str:
        m = "none" if self.m is None else self.m
        return f"{self.set}.{self.name}.B{self.b}F{self.f}N{self.n}H{self.h}D{self.d}M{m}.{self.schedule}"

    def shape(self) -> dict:
        return {"B": self.b, "F": self.f, "N": self.n, "H": self.h, "D": self.d, "M": self.m}

    def flops(self) -> int:
        """DESIGN.md section 4: 4*B*H*D * (sum over frames of N * keys_f, plus phase 1).

        Keys are counted as the literal concatenation (a duplicated reference counts twice),
        so every backend is credited with the same work and TFLOP/s compare like for like.
        Phase 1 is each keyframe's N queries over its M image + N own keys.
        """
        sched = make_schedule(self.schedule, self.f)
        m = self.m or 0
        phase2 = sum(sched.keys_per_frame(self.n, m))
        phase1 = len(sched.keyframes) * (m + self.n)
        return 4 * self.b * self.h * self.d * self.n * (phase2 + phase1)


# U-Net attn1 sites (DESIGN.md section 1): 8 heads, B=1 clip of F=16 frames, and the image
# prompt's latent runs through the same U-Net, so M = N at every level.
UNET_LEVELS = {  # name: (tokens per frame at 256 px, head dim)
    "down0-up3": (1024, 40),
    "down1-up2": (256, 80),
    "down2-up1": (64, 160),
    "mid": (16, 160),
}


def vb_cases(px: int) -> list[Case]:
    """The VideoBooth U-Net table at 256 px (N 1024..16) or 512 px (N 4096..64)."""
    scale = (px // 256) ** 2
    return [Case(f"vb{px}", lvl, 1, 16, n * scale, 8, d, n * scale) for lvl, (n, d) in UNET_LEVELS.items()]


DIT_HEADS = {64: 16, 72: 16, 128: 16}  # head dim -> heads (C = 1024, 1152 as DiT-XL/Latte, 2048)


def dit_cases(ns=(256, 1024, 4096)) -> list[Case]:
    """DiT-style cross-frame attention: head dims 64, 72, 128; image tokens M = N."""
    return [Case("dit", f"D{d}", 1, 16, n, h, d, n) for d, h in DIT_HEADS.items() for n in ns]


_TOP = dict(b=1, n=1024, h=8, d=40)  # the 256 px U-Net's top level, where attention costs most


def sched_cases(names=("first", "window2", "window4", "keyframes4", "keyframes8")) -> list[Case]:
    """Other schedules on the 256 px top level (videobooth itself is in the vb256 set)."""
    return [Case("sched", s, f=16, m=_TOP["n"], schedule=s, **_TOP) for s in names]


def bank_cases(ms=(16, 64, 256, 1024)) -> list[Case]:
    """Image everywhere: the image tokens are keys of every frame, with compact banks M."""
    return [Case("bank", f"M{m}", f=16, m=m, schedule="videobooth+img", **_TOP) for m in ms]


def long_cases(fs=(8, 16, 32, 64), schedules=("videobooth", "window2", "window4", "keyframes4", "keyframes8")) -> list[Case]:
    """Long horizon: the 256 px top level over F frames, per schedule."""
    return [Case("long", s, f=f, m=_TOP["n"], schedule=s, **_TOP) for s in schedules for f in fs]


def smoke_cases() -> list[Case]:
    """Tiny shapes for the CPU smoke run (Triton interpreter): odd N, M != N, D not a power of 2."""
    return [
        Case("smoke", "vb", 1, 3, 16, 2, 16, 16, "videobooth"),
        Case("smoke", "odd", 1, 3, 33, 2, 40, 8, "videobooth+img"),
        Case("smoke", "window", 1, 4, 16, 2, 16, 8, "window2"),
        Case("smoke", "keyframes", 1, 5, 17, 2, 24, None, "keyframes4"),
    ]


# ---- backends, modes, dtypes ------------------------------------------------------------------
GPU_BACKENDS = ("reference", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "flash-attn", "xformers", "triton")
CPU_BACKENDS = ("reference", "sdpa", "flex", "triton")
MODEL_BACKENDS = ("reference", "sdpa", "flex", "triton")  # sdpa: PyTorch picks, as a model would
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Row:
    """One benchmark row: a case (or model case) with a backend, a mode and a dtype."""

    case: Case
    backend: str
    mode: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.case.id}-{self.backend}-{self.mode}-{self.dtype}"

    def __repr__(self) -> str:  # what pytest-benchmark's JSON shows under "params"
        return f"Row({self.id})"

    @property
    def smoke(self) -> bool:
        return self.case.set == "smoke"


def grid(cases, backends, modes, dtypes) -> list[Row]:
    # Backend innermost: consecutive rows share one case's inputs and oracle (cached).
    return [Row(c, be, mo, dt) for c in cases for dt in dtypes for mo in modes for be in backends]


def op_rows(full: bool = False) -> list[Row]:
    """Every row of bench_attention.py. GPU rows skip on a CPU machine; smoke rows run anywhere.

    Default GPU subset (about 340 rows that run on an H100; each set can be picked with -k):
      vb256, vb512: every U-Net level, videobooth, fwd and fwd+bwd, bf16; vb256 also fp16 fwd.
      sched: first, window{2,4}, keyframes{4,8} at the 256 px top level, fwd and fwd+bwd, bf16.
      bank:  image everywhere, M in {16, 64, 256, 1024}, fwd, bf16.
      dit:   D in {64, 72, 128}, N in {1024, 4096} fwd; N = 4096 fwd+bwd; bf16.
      long:  F in {8, 16, 32, 64} with window4 and keyframes8, fwd, bf16.
    Full grid (``full=True``): every set, schedule, M, F, N, both modes, fp16 and bf16.
    """
    rows = grid(smoke_cases(), CPU_BACKENDS, MODES, ("fp32",))
    be = GPU_BACKENDS
    if full:
        cases = (vb_cases(256) + vb_cases(512) + sched_cases() + bank_cases() + dit_cases()
                 + long_cases())
        return rows + grid(cases, be, MODES, ("bf16", "fp16"))
    rows += grid(vb_cases(256) + vb_cases(512), be, MODES, ("bf16",))
    rows += grid(vb_cases(256), be, ("fwd",), ("fp16",))
    rows += grid(sched_cases(), be, MODES, ("bf16",))
    rows += grid(bank_cases(), be, ("fwd",), ("bf16",))
    rows += grid(dit_cases((1024, 4096)), be, ("fwd",), ("bf16",))
    rows += grid(dit_cases((4096,)), be, ("fwd+bwd",), ("bf16",))
    rows += grid(long_cases(schedules=("window4", "keyframes8")), be, ("fwd",), ("bf16",))
    return rows
