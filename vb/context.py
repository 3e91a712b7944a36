"""Per-forward state shared by every VideoBooth processor of one backbone.

diffusers calls an attention processor with the layer's hidden states only. The fine path needs
more: how many frames the batch holds, and the image branch's hidden states at the same layer.
IP-Adapter passes such tensors through ``cross_attention_kwargs``; here the backbone sets one
small object for the duration of its forward instead, because the image states are produced by
the backbone itself (the image branch runs first) and must reach every attn1 of every block,
including the ones diffusers versions call without forwarding ``cross_attention_kwargs``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

MODES = ("off", "image", "video")


class VideoBoothContext:
    """What the processors of one backbone need to know about the current forward.

    Attributes:
        mode: ``"off"`` (the installed model behaves as the model it was installed on: plain
            2D attention with the pretrained projections, temporal layers skipped), ``"image"``
            (the image branch: attn1 records its input and self-attends, temporal layers are
            skipped), ``"video"`` (cross-frame attention over ``num_frames`` frames with the
            recorded image states injected when ``inject`` is set).
        num_frames: F; the processors see (B*F, N, C) and view it as (B, F, N, C).
        grid: (h, w) token grid of the backbone's first attention level, to recover 2D token
            layout at every level (pooled image-token bank).
        inject: whether the video pass reads ``image_states`` (the fine path is on).
        image_states: attn1 name -> (B, M, C) hidden states recorded by the image branch.
        record: in a video pass, attn1 layers record frame 0's input as ``image_states`` (the
            official code's image branch: the image latent as an F-frame clip, frame 0 read).
    """

    def __init__(self):
        self.mode = "off"
        self.num_frames = 1
        self.grid: Optional[Tuple[int, int]] = None
        self.inject = False
        self.image_states: Dict[str, torch.Tensor] = {}
        self.record = False

    def __repr__(self):
        return (f"VideoBoothContext(mode={self.mode!r}, num_frames={self.num_frames}, grid={self.grid}, "
                f"inject={self.inject}, image_states={len(self.image_states)})")

    @contextmanager
    def forward_pass(self):
        """Scope of one backbone forward: whatever happens inside, the context is back to
        ``off`` with no image states afterwards (they hold activations of the whole U-Net)."""
        try:
            yield self
        finally:
            self.mode, self.num_frames, self.inject, self.grid = "off", 1, False, None
            self.image_states = {}
            self.record = False

    def start_image(self, grid: Tuple[int, int]) -> None:
        """Image branch: attn1 layers record their (B, M, C) input under their name."""
        self.mode, self.num_frames, self.grid, self.inject = "image", 1, tuple(grid), False
        self.image_states = {}
        self.record = False

    def start_video(self, num_frames: int, grid: Tuple[int, int], inject: bool, record: bool = False) -> None:
        """Video pass over F frames; ``inject`` says whether attn1 reads the recorded states;
        ``record`` makes attn1 record frame 0's input instead (an image branch run as a clip)."""
        if inject and record:
            raise ValueError("record: a video pass cannot both inject and record image states")
        if inject and not self.image_states:
            raise RuntimeError("inject=True but the image branch recorded nothing; run it first")
        if record:
            self.image_states = {}
        self.mode, self.num_frames, self.grid, self.inject = "video", int(num_frames), tuple(grid), bool(inject)
        self.record = bool(record)


def token_grid(num_tokens: int, grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(h, w) with h * w == num_tokens at some level of a backbone whose first level is ``grid``.

    SD's downsamplers are stride-2 convs with padding 1, so level k has ceil(h0 / 2^k) rows.
    Falls back to a square grid when ``grid`` is unknown.
    """
    if grid is not None:
        h, w = grid
        for _ in range(12):
            if h * w == num_tokens:
                return h, w
            h, w = -(-h // 2), -(-w // 2)
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    raise ValueError(f"cannot recover a 2D token grid for {num_tokens} tokens (first level grid {grid})")
