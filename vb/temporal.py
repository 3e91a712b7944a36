"""Temporal attention of the inflated U-Net (Tune-A-Video's ``attn_temp``).

Each spatial position attends over the frames of its clip. The output projection starts at
zero, so a freshly inflated U-Net computes exactly what the 2D model computed frame by frame;
training on video moves it. By default a sinusoidal frame-position code is added to the
normalised input (as AnimateDiff's motion modules do) so the layer can tell frame order apart; the
released VideoBooth model has none (``positions=False``, the ``"official"`` preset).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_positions(num: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(num, dim) sin/cos position code of positions 0..num-1 (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    ang = torch.arange(num, device=device, dtype=torch.float32)[:, None] * freqs[None]
    pe = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    if pe.shape[-1] < dim:  # odd dim
        pe = torch.cat([pe, pe.new_zeros(num, dim - pe.shape[-1])], dim=-1)
    return pe.to(dtype)


class TemporalAttention(nn.Module):
    """Zero-initialised temporal self-attention, residual.

    Args:
        dim: channels C of the block it follows.
        heads, dim_head: attention shape (those of the block's attn1).
        positions: add the sinusoidal frame-position code (the research preset); the official
            VideoBooth ``attn_temp`` has none.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, positions: bool = True):
        super().__init__()
        self.positions = bool(positions)
        from diffusers.models.attention_processor import Attention

        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim_head, bias=False)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: (B*F, N, C) frame-major tokens -> (B*F, N, C)."""
        bf, n, c = x.shape
        if bf % num_frames != 0:
            raise ValueError(f"x: batch {bf} is not a multiple of num_frames={num_frames}")
        b = bf // num_frames
        seq = x.view(b, num_frames, n, c).transpose(1, 2).reshape(b * n, num_frames, c)
        h = self.norm(seq)
        if self.positions:
            h = h + sinusoidal_positions(num_frames, c, seq.device, seq.dtype)
        seq = seq + self.attn(h)
        return seq.view(b, n, num_frames, c).transpose(1, 2).reshape(bf, n, c)
