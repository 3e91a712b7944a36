"""Per-call state of the VideoBooth processors, and the per-backbone context that holds them.

diffusers calls an attention processor with the layer's hidden states plus whatever is in
``cross_attention_kwargs``. The fine path needs more than hidden states: which pass this is
(image branch or video), how many frames the batch holds, and the image branch's hidden states
at the same layer. Each backbone forward builds one small :class:`VideoBoothState` per pass and
hands it to every processor as ``cross_attention_kwargs={"vb_state": state}`` (IP-Adapter's
route for its image tensors). Because the state travels with the call's arguments, a gradient
checkpoint (diffusers' ``enable_gradient_checkpointing``, ``torch.utils.checkpoint``) replays an
attention block with exactly the state it saw in the forward, long after the forward returned.
The older design kept the state only on a shared object that the forward reset, so the
recompute ran plain 2D attention and ``torch.utils.checkpoint`` failed with a ``CheckpointError``.

Layers that diffusers calls without ``cross_attention_kwargs`` (the official preset's clip-level
GroupNorms inside the ResNets, the watermark module) read the pass's state from the backbone's
:class:`VideoBoothContext`, where the backbone *activates* it for the duration of the pass
(:meth:`VideoBoothContext.activate`). A checkpoint's recompute runs after that, so the
backbones checkpoint with :meth:`VideoBoothContext.checkpoint`, which activates the same state
again around the recompute (``torch.utils.checkpoint``'s ``context_fn``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
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


def _proxy(name):
    return property(lambda self: getattr(self.active, name), doc=f"``active.{name}``: the active pass's {name} (read-only).")


class VideoBoothContext:
    """Per-backbone object shared by its processors and other VideoBooth layers.

    ``active`` is the state of the pass the backbone is running (``off`` outside a backbone
    forward). Processors prefer the state of their call (``vb_state``) and fall back to
    ``active``; layers that diffusers calls without ``cross_attention_kwargs`` read ``active``
    (``mode``, ``num_frames``, ``grid``, ``inject``, ``record``, ``image_states`` are shortcuts
    to it). Only :meth:`activate` sets it, for the scope of one pass (and :meth:`checkpoint`
    again around a recompute).
    """

    mode = _proxy("mode")
    num_frames = _proxy("num_frames")
    grid = _proxy("grid")
    inject = _proxy("inject")
    record = _proxy("record")
    image_states = _proxy("image_states")

    def __init__(self):
        self.active = VideoBoothState()
        self.in_image_branch = False

    def __repr__(self):
        return f"VideoBoothContext(active={self.active!r}, in_image_branch={self.in_image_branch})"

    def state(self, vb_state: Optional[VideoBoothState]) -> VideoBoothState:
        """The state a processor acts on: the call's ``vb_state``, else the active one."""
        if vb_state is None:
            return self.active
        if not isinstance(vb_state, VideoBoothState):
            raise TypeError(f"{STATE_KWARG}: expected a vb.VideoBoothState, got {type(vb_state).__name__}")
        return vb_state

    @contextmanager
    def activate(self, state: VideoBoothState, image_branch: bool = False):
        """Scope of one pass: ``state`` is active inside, the previous state after.
        ``image_branch`` also sets :attr:`in_image_branch` (motion modules skip)."""
        prev, prev_ib = self.active, self.in_image_branch
        self.active, self.in_image_branch = state, bool(image_branch)
        try:
            yield state
        finally:
            self.active, self.in_image_branch = prev, prev_ib

    def checkpoint(self, module, *args):
        """``torch.utils.checkpoint`` of ``module(*args)`` (non-reentrant) whose recompute runs
        with the state that was active in the forward: the ``gradient_checkpointing_func`` the
        backbones give diffusers' ``enable_gradient_checkpointing``."""
        saved, saved_ib = self.active, self.in_image_branch
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (nullcontext(), self.activate(saved, saved_ib)))


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
