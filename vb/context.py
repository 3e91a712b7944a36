"""Per-call state of the VideoBooth processors, and the per-backbone context that holds them.

diffusers calls an attention processor with the layer's hidden states plus whatever is in
``cross_attention_kwargs``. The fine path needs more than hidden states: which pass this is
(image branch or video), how many frames the batch holds, and the image branch's hidden states
at the same layer. Each backbone forward builds one small :class:`VideoBoothState` per pass and
hands it to every processor as ``cross_attention_kwargs={"vb_state": state}`` (IP-Adapter's
route for its image tensors). Because the state travels with the call's arguments, a gradient
checkpoint (diffusers' ``enable_gradient_checkpointing``, ``torch.utils.checkpoint``) replays a
block with exactly the state it saw in the forward, long after the forward returned; the older
design kept the state on a shared object that the forward reset, so the recompute ran plain 2D
attention and ``torch.utils.checkpoint`` failed with a ``CheckpointError``.

:class:`VideoBoothContext` remains as the per-backbone object (``backbone.context``): it is the
fallback state of a processor called without ``vb_state`` (``off`` unless a caller sets it
with :meth:`VideoBoothContext.start_video`, as unit tests of a single processor do), and it
holds the one switch that never reaches a recompute (:meth:`VideoBoothContext.image_branch`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

MODES = ("off", "image", "video")
STATE_KWARG = "vb_state"


class VideoBoothState:
    """What the processors of one backbone need to know about one pass (image branch or video).

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
        image_states: attn1 name -> (B, M, C) hidden states recorded by the image branch. The
            image pass and the video pass of one forward share this dict (the image pass
            writes it, the video pass reads it); nothing else holds it, so it dies with the
            forward's autograd graph.
        image_scale: weight of the image prompt's values in the keyframe refresh (1 = the
            paper's; 0 = no injection), like IP-Adapter's ``scale``.
    """

    __slots__ = ("mode", "num_frames", "grid", "inject", "image_states", "image_scale")

    def __init__(self, mode: str = "off", num_frames: int = 1, grid: Optional[Tuple[int, int]] = None,
                 inject: bool = False, image_states: Optional[Dict[str, torch.Tensor]] = None,
                 image_scale: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.num_frames = int(num_frames)
        self.grid = None if grid is None else tuple(grid)
        self.inject = bool(inject)
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

    def __repr__(self):
        return (f"VideoBoothState(mode={self.mode!r}, num_frames={self.num_frames}, grid={self.grid}, "
                f"inject={self.inject}, image_states={len(self.image_states)}, image_scale={self.image_scale})")


OFF = VideoBoothState()


def state_kwargs(state: VideoBoothState) -> Dict[str, VideoBoothState]:
    """The ``cross_attention_kwargs`` that carry ``state`` to every VideoBooth processor."""
    return {STATE_KWARG: state}


class VideoBoothContext:
    """Per-backbone object shared by its processors and temporal layers.

    Holds the fallback state of a processor called without ``vb_state`` (``off`` by default:
    the installed model is the model it was installed on) and the image-branch switch of a
    U-Net that brings its own temporal modules (AnimateDiff's motion modules are called without
    ``cross_attention_kwargs``, so they cannot see ``vb_state``).

    The old attribute interface (``mode``, ``num_frames``, ``grid``, ``inject``,
    ``image_states``, :meth:`start_image`, :meth:`start_video`) sets the fallback state; the
    backbones no longer use it.
    """

    def __init__(self):
        self.fallback = VideoBoothState()
        self.in_image_branch = False

    # -- the fallback state, attribute by attribute (kept for direct, single-processor use) --
    def _get(name):  # noqa: N805 (descriptor factory)
        return property(lambda self: getattr(self.fallback, name),
                        lambda self, v: setattr(self.fallback, name, v))

    mode = _get("mode")
    num_frames = _get("num_frames")
    grid = _get("grid")
    inject = _get("inject")
    image_states = _get("image_states")
    del _get

    def __repr__(self):
        return f"VideoBoothContext(fallback={self.fallback!r}, in_image_branch={self.in_image_branch})"

    def state(self, vb_state: Optional[VideoBoothState]) -> VideoBoothState:
        """The state a processor acts on: the call's ``vb_state``, else the fallback."""
        if vb_state is None:
            return self.fallback
        if not isinstance(vb_state, VideoBoothState):
            raise TypeError(f"{STATE_KWARG}: expected a vb.VideoBoothState, got {type(vb_state).__name__}")
        return vb_state

    @contextmanager
    def forward_pass(self):
        """Scope that resets the fallback state to ``off`` afterwards, whatever happens inside."""
        try:
            yield self
        finally:
            self.fallback = VideoBoothState()
            self.in_image_branch = False

    @contextmanager
    def image_branch(self):
        """Scope of an image-branch call of a U-Net with its own temporal modules: they return
        their input unchanged inside it (the image branch is 2D only). Only a module's forward
        reads it, never a recompute: a skipped module computed nothing that could be replayed."""
        prev = self.in_image_branch
        self.in_image_branch = True
        try:
            yield self
        finally:
            self.in_image_branch = prev

    def start_image(self, grid: Tuple[int, int]) -> None:
        """Fallback state: the image branch (attn1 layers record their input under their name)."""
        self.fallback = VideoBoothState.image(grid, {})

    def start_video(self, num_frames: int, grid: Tuple[int, int], inject: bool) -> None:
        """Fallback state: a video pass over F frames reading the fallback's image states."""
        states = self.fallback.image_states
        if inject and not states:
            raise RuntimeError("inject=True but the image branch recorded nothing; run it first")
        self.fallback = VideoBoothState("video", num_frames, grid, inject, states)


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
