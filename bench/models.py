"""Model-level rows: one attn1 layer of the VideoBooth U-Net and one DiT spatial block.

Both are self-contained (plain ``torch.nn``, no diffusers, no ``vb/``), so they run on any
machine the op runs on. The attention callable is passed per call, so one module serves every
backend. NVTX ranges (``vb_kernels.profiling.nvtx_range``) name each block and its parts for
Nsight: ``attn1`` > ``attn1.proj`` / ``attn1.op`` / ``attn1.to_out``, ``dit`` > ``dit.adaln`` /
``dit.attn`` (with ``dit.op``) / ``dit.mlp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vb_kernels.profiling import nvtx_range

from .shapes import MODEL_BACKENDS, MODES, Case, Row, grid


class Attn1(nn.Module):
    """attn1 (cross-frame self-attention) of a VideoBooth U-Net block, stage-2 form.

    DESIGN.md section 1: the frames' K/V come from ``to_k_new``/``to_v_new``, the image prompt's
    features from ``to_k_exemplar``/``to_v_exemplar``; ``to_q`` and ``to_out`` stay frozen
    (no weight gradients), as in stage-2 training.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k_new = nn.Linear(dim, dim, bias=False)
        self.to_v_new = nn.Linear(dim, dim, bias=False)
        self.to_k_exemplar = nn.Linear(dim, dim, bias=False)
        self.to_v_exemplar = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.to_q.requires_grad_(False)
        self.to_out.requires_grad_(False)

    def forward(self, x, x_img, *, attention, schedule):
        """x: (B, F, N, C) frame features; x_img: (B, M, C) image-prompt features.
        Returns (B, F, N, C), dtype of x."""
        b, f, n, c = x.shape
        h, d = self.heads, c // self.heads
        with nvtx_range("attn1"):
            with nvtx_range("attn1.proj"):
                q = self.to_q(x).view(b, f, n, h, d)
                k = self.to_k_new(x).view(b, f, n, h, d)
                v = self.to_v_new(x).view(b, f, n, h, d)
                k_img = self.to_k_exemplar(x_img).view(b, -1, h, d)
                v_img = self.to_v_exemplar(x_img).view(b, -1, h, d)
            with nvtx_range("attn1.op"):
                o = attention(q, k, v, k_img, v_img, schedule=schedule)
            with nvtx_range("attn1.to_out"):
                return self.to_out(o.reshape(b, f, n, c))


class DiTBlock(nn.Module):
    """A DiT spatial block (Peebles & Xie 2023): adaLN-Zero modulation, attention, MLP.

    The attention is the cross-frame op over frames, with the image prompt's tokens projected by
    exemplar K/V projections (the DiT variant of VideoBooth's fine path). q/k/v are strided views
    of one fused ``qkv`` projection, as such models produce them.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.to_k_exemplar = nn.Linear(dim, dim)
        self.to_v_exemplar = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        # DiT zero-initialises this Linear (adaLN-Zero). Here it keeps its random init: zero
        # gates would send zero gradients into the attention, and benchmarks never run on zeros.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, x_img, *, attention, schedule):
        """x: (B, F, N, C) frame tokens; c: (B, C) conditioning (timestep + text/image);
        x_img: (B, M, C) image-prompt tokens. Returns (B, F, N, C), dtype of x."""
        b, f, n, dim = x.shape
        h, d = self.heads, dim // self.heads
        with nvtx_range("dit"):
            with nvtx_range("dit.adaln"):
                mod = self.adaLN_modulation(c)[:, None, None]  # (B, 1, 1, 6C)
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
            with nvtx_range("dit.attn"):
                y = self.norm1(x) * (1 + scale_msa) + shift_msa
                q, k, v = self.qkv(y).view(b, f, n, 3, h, d).unbind(3)
                k_img = self.to_k_exemplar(x_img).view(b, -1, h, d)
                v_img = self.to_v_exemplar(x_img).view(b, -1, h, d)
                with nvtx_range("dit.op"):
                    o = attention(q, k, v, k_img, v_img, schedule=schedule)
                x = x + gate_msa * self.proj(o.reshape(b, f, n, dim))
            with nvtx_range("dit.mlp"):
                return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


@dataclass(frozen=True)
class ModelCase:
    """One model-level row's shape: ``model`` is "attn1" or "dit"; C = H * D channels."""

    set: str  # "model" on a GPU, "smoke" for the CPU run
    name: str
    model: str
    b: int
    f: int
    n: int
    c: int
    h: int
    m: int
    schedule: str = "videobooth"

    @property
    def d(self) -> int:
        return self.c // self.h

    @property
    def id(self) -> str:
        return f"{self.set}.{self.model}.{self.name}.B{self.b}F{self.f}N{self.n}C{self.c}H{self.h}M{self.m}.{self.schedule}"

    def op_case(self) -> Case:
        """The attention call inside the block."""
        return Case(self.set, self.name, self.b, self.f, self.n, self.h, self.d, self.m, self.schedule)

    def shape(self) -> dict:
        return {"B": self.b, "F": self.f, "N": self.n, "H": self.h, "D": self.d, "M": self.m, "C": self.c}

    def linear_flops(self) -> int:
        """2 * rows * in * out over the block's projections (and MLP, adaLN for the DiT block)."""
        tokens, img, c = self.b * self.f * self.n, self.b * self.m, self.c
        if self.model == "attn1":  # q, k_new, v_new, to_out on frames; k/v exemplar on the image
            return 2 * c * c * (4 * tokens + 2 * img)
        # qkv (3C) + proj (C) + MLP (4C in, 4C out) on frames; exemplars on the image; adaLN (6C)
        return 2 * c * c * (12 * tokens + 2 * img + 6 * self.b)

    def flops(self) -> int:
        return self.op_case().flops() + self.linear_flops()

    def build(self, dtype: torch.dtype, device, generator: torch.Generator, requires_grad: bool):
        """(module, inputs) with seeded weights and inputs; inputs are the forward's positional
        arguments (attn1: x, x_img; dit: x, c, x_img)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            module = Attn1(self.c, self.h) if self.model == "attn1" else DiTBlock(self.c, self.h)
        module = module.to(device=device, dtype=dtype)

        def rnd(*shape):
            t = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
            return t.requires_grad_(requires_grad)

        x, x_img = rnd(self.b, self.f, self.n, self.c), rnd(self.b, self.m, self.c)
        inputs = (x, x_img) if self.model == "attn1" else (x, rnd(self.b, self.c), x_img)
        return module, inputs


def model_cases(smoke: bool) -> list[ModelCase]:
    """Smoke: tiny blocks for the CPU run. Otherwise the 256 px and 512 px top U-Net level
    (C 320, 8 heads of 40) and DiT blocks at D 72 (C 1152, N 1024) and D 128 (C 2048, N 4096)."""
    if smoke:
        return [ModelCase("smoke", "tiny", "attn1", 1, 3, 16, 32, 2, 16),
                ModelCase("smoke", "tiny", "dit", 1, 3, 17, 48, 2, 8)]
    return [ModelCase("model", "vb256-down0", "attn1", 1, 16, 1024, 320, 8, 1024),
            ModelCase("model", "vb512-down0", "attn1", 1, 16, 4096, 320, 8, 4096),
            ModelCase("model", "D72", "dit", 1, 16, 1024, 1152, 16, 1024),
            ModelCase("model", "D128", "dit", 1, 16, 4096, 2048, 16, 4096)]


def model_rows(full: bool = False) -> list[Row]:
    """Every row of bench_model.py: the smoke blocks in fp32 (any machine), the GPU blocks in
    bf16 (and fp16 with ``full``), each per model backend, forward and forward+backward."""
    rows = grid(model_cases(smoke=True), MODEL_BACKENDS, MODES, ("fp32",))
    return rows + grid(model_cases(smoke=False), MODEL_BACKENDS, MODES, ("bf16", "fp16") if full else ("bf16",))
