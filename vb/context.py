"""Per-call state of the VideoBooth layers, and the per-backbone record of what was installed.

diffusers calls an attention processor with the layer's hidden states plus whatever is in
``cross_attention_kwargs``. The fine path needs more than hidden states: which pass this is
(image branch or video), how many frames the batch holds, and the image branch's hidden states
at the same layer. Each backbone forward builds one small :class:`VideoBoothState` per pass and
hands it to every processor as ``cross_attention_kwargs={"vb_state": state}`` (IP-Adapter's
route for its image tensors); the temporal layers read it from their transformer block's
arguments. Because the state travels with the call's arguments, a gradient checkpoint
(diffusers' ``enable_gradient_checkpointing``, ``torch.utils.checkpoint``) replays a block with
exactly the state it saw in the forward, long after the forward returned.

That is the only road: no layer reads a "current pass" from a shared object. The layers that
diffusers' forward calls without those arguments (the official preset's clip-level GroupNorms
inside the ResNets, the watermark before ``conv_norm_out``, a motion U-Net's image branch that
skips the motion modules) are run by :func:`vb.unet_forward.unet_forward`, which passes the
frame count and time embedding to them as arguments. A processor called without a state (a
user calling the U-Net directly) acts as the model it was installed on (mode ``off``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

MODES = ("off", "image", "video")
STATE_KWARG = "vb_state"


class VideoBoothState:
    """What the layers of one backbone need to know about one pass (image branch or video).

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
        record: in a video pass, attn1 layers record frame 0's input as ``image_states`` (the
            official code's image branch: the image latent as an F-frame clip, frame 0 read).
        image_states: attn1 name -> (B, M, C) hidden states recorded by the image branch. The
            image pass and the video pass of one forward share this dict (the image pass
            writes it, the video pass reads it); nothing else holds it, so it dies with the
            forward's autograd graph.
        image_scale: strength of the image prompt in the fine path (1 = the paper's; 0 = no
            injection), like IP-Adapter's ``scale``.
    """

    __slots__ = ("mode", "num_frames", "grid", "inject", "record", "image_states", "image_scale")

    def __init__(self, mode: str = "off", num_frames: int = 1, grid: Optional[Tuple[int, int]] = None,
                 inject: bool = False, image_states: Optional[Dict[str, torch.Tensor]] = None,
                 image_scale: float = 1.0, record: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if inject and record:
            raise ValueError("record: a video pass cannot both inject and record image states")
        self.mode = mode
        self.num_frames = int(num_frames)
        self.grid = None if grid is None else tuple(grid)
        self.inject = bool(inject)
        self.record = bool(record)
        self.image_states = {} if image_states is None else image_states
        self.image_scale = float(image_scale)

    @classmethod
    def image(cls, grid: Tuple[int, int], image_states: Dict[str, torch.Tensor]) -> "VideoBoothState":
        """The image branch: attn1 layers record their (B, M, C) input into ``image_states``."""
        return cls("image", 1, grid, False, image_states)

    @classmethod
    def video(cls, num_frames: int, grid: Tuple[int, int], image_states: Optional[Dict[str, torch.Tensor]] = None,
              image_scale: float = 1.0) -> "VideoBoothState":
        """A video pass over F frames; it injects the image prompt when ``image_states`` is given."""
        inject = image_states is not None
        if inject and not image_states:
            raise RuntimeError("image_states: the image branch recorded nothing; run it first")
        return cls("video", num_frames, grid, inject, image_states if inject else {}, image_scale)

    @classmethod
    def recording(cls, num_frames: int, grid: Tuple[int, int], image_states: Dict[str, torch.Tensor]):
        """The official structure's image branch: a video pass over the image clip whose attn1
        layers record frame 0's input into ``image_states``."""
        return cls("video", num_frames, grid, False, image_states, record=True)

    def __repr__(self):
        return (f"VideoBoothState(mode={self.mode!r}, num_frames={self.num_frames}, grid={self.grid}, "
                f"inject={self.inject}, record={self.record}, image_states={len(self.image_states)}, "
                f"image_scale={self.image_scale})")


def state_kwargs(state: VideoBoothState) -> Dict[str, VideoBoothState]:
    """The ``cross_attention_kwargs`` that carry ``state`` to every VideoBooth processor."""
    return {STATE_KWARG: state}


def resolve_state(vb_state: Optional[VideoBoothState]) -> VideoBoothState:
    """The state a layer acts on: the call's ``vb_state``; without one, the model it was
    installed on (mode ``off``)."""
    if vb_state is None:
        return VideoBoothState()
    if not isinstance(vb_state, VideoBoothState):
        raise TypeError(f"{STATE_KWARG}: expected a vb.VideoBoothState, got {type(vb_state).__name__}")
    return vb_state


class VideoBoothContext:
    """Per-backbone record of an install, shared by its processors: what
    :func:`vb.uninstall_videobooth` needs to give the model back (``hooks``, ``requires_grad``).
    It holds no per-call state (see the module docstring)."""

    def __init__(self):
        self.hooks = []
        self.requires_grad = {}

    def __repr__(self):
        return f"VideoBoothContext(hooks={len(self.hooks)}, parameters={len(self.requires_grad)})"


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
