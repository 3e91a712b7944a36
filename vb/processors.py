"""Attention processors of the VideoBooth fine and coarse paths (DESIGN.md section 1).

* :class:`VideoBoothAttnProcessor` goes on every attn1 (self-attention of a spatial block). In a
  video pass it runs the cross-frame attention op ``vb_kernels.videobooth_attention`` with the
  frames' K/V from ``to_k_new``/``to_v_new`` and, when an image prompt is present, the image
  branch's hidden states of the same layer projected by ``to_k_exemplar``/``to_v_exemplar``.
  ``to_q`` and ``to_out`` are the layer's own (frozen) projections.
* :class:`VideoBoothTextAttnProcessor` goes on every attn2 (text cross-attention): new
  ``to_k_new``/``to_v_new`` for the prompt whose subject word was replaced by image tokens.

All new projections start as copies of the pretrained ``to_k``/``to_v``, so an installed model
computes what the pretrained (inflated) model computed until training moves them. Both are
``nn.Module``s installed with ``Attention.set_processor``, as diffusers' IP-Adapter processors
are, so their weights live in the backbone's ``state_dict`` under ``...attnX.processor.*``.
"""
from __future__ import annotations

import copy
import re
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from vb_kernels import BACKENDS, Schedule, videobooth_attention

from .context import VideoBoothContext, VideoBoothState, resolve_state, token_grid

ScheduleSpec = Union[str, Schedule, Callable[[int], Schedule]]
_NAMED = re.compile(r"^(videobooth|first|self|window|keyframes)(?::?(\d+))?(\+img)?$")


# ---- schedules -----------------------------------------------------------------------------
def check_schedule_spec(spec: ScheduleSpec) -> ScheduleSpec:
    """Validate a schedule spec early (at install time), before any forward needs it."""
    if isinstance(spec, Schedule) or (callable(spec) and not isinstance(spec, str)):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"schedule: expected a name, a vb_kernels.Schedule or a callable F -> Schedule, "
                        f"got {type(spec).__name__}")
    m = _NAMED.match(spec)
    if m is None or (m.group(1) in ("window", "keyframes")) != (m.group(2) is not None):
        raise ValueError(f"schedule: expected 'videobooth', 'first', 'self', 'window:<k>' or 'keyframes:<m>' "
                         f"(optionally with '+img'), got {spec!r}")
    return spec


def resolve_schedule(spec: ScheduleSpec, num_frames: int) -> Schedule:
    """The :class:`vb_kernels.Schedule` of ``num_frames`` frames that ``spec`` names.

    ``spec`` is a name (``"videobooth"``, ``"first"``, ``"self"``, ``"window:4"``,
    ``"keyframes:8"``, any of them with ``"+img"`` for image tokens in every frame's keys), a
    ``Schedule`` (its F must be ``num_frames``) or a callable ``F -> Schedule``.

    ``"self"`` is not one of the paper's: every frame reads only itself (keyframe 0 is still
    refreshed from the image prompt). Without an image prompt it is plain per-frame
    self-attention, so a freshly installed model computes exactly what the model it was
    installed on computes, for any number of frames.
    """
    if isinstance(spec, Schedule):
        if spec.num_frames != num_frames:
            raise ValueError(f"schedule: built for F={spec.num_frames} frames, but the video has "
                             f"num_frames={num_frames}; pass a name or a callable F -> Schedule")
        return spec
    if callable(spec) and not isinstance(spec, str):
        out = spec(num_frames)
        if not isinstance(out, Schedule) or out.num_frames != num_frames:
            raise ValueError(f"schedule: the callable must return a Schedule of F={num_frames} frames")
        return out
    check_schedule_spec(spec)
    kind, arg, img = _NAMED.match(spec).groups()
    if kind == "videobooth":
        out = Schedule.videobooth(num_frames)
    elif kind == "first":
        out = Schedule.first(num_frames)
    elif kind == "self":
        out = Schedule([[f] for f in range(num_frames)], keyframes=(0,), name="self")
    elif kind == "window":
        out = Schedule.window(num_frames, int(arg))
    else:
        out = Schedule.keyframes(num_frames, int(arg))
    return out.with_image_everywhere() if img else out


def without_image(schedule: Schedule) -> Schedule:
    """The same references with no keyframe refresh: plain sparse-causal (or windowed...)
    attention, what the pass without an image prompt computes (DESIGN.md section 2)."""
    return Schedule(schedule.refs, keyframes=(), image_everywhere=False, name=schedule.name + "-noimg")


# One frame reading itself, nothing refreshed: ordinary self-attention through the same op.
# (A module constant, not an lru_cache: torch.compile traces through cache wrappers.)
_SELF_ATTENTION = Schedule([[0]], keyframes=(), name="self")


def _self_attention_schedule() -> Schedule:
    return _SELF_ATTENTION


# ---- compact image-token banks ---------------------------------------------------------------
class PooledTokenBank(nn.Module):
    """Average-pools the image tokens on their 2D grid by ``factor`` (M -> ~M / factor^2)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = int(factor)

    def forward(self, x: torch.Tensor, grid) -> torch.Tensor:
        """x: (B, M, C) -> (B, ceil(h/f) * ceil(w/f), C)."""
        b, m, c = x.shape
        h, w = token_grid(m, grid)
        x2 = x.transpose(1, 2).reshape(b, c, h, w)
        x2 = F.avg_pool2d(x2, self.factor, self.factor, ceil_mode=True, count_include_pad=False)
        return x2.flatten(2).transpose(1, 2)


class LearnedTokenBank(nn.Module):
    """M learned query tokens that read the image tokens once (a one-layer resampler).

    Values start as the identity map, so the bank's output begins as convex mixtures of the
    image tokens themselves and stays in the input space of ``to_k_exemplar``/``to_v_exemplar``.
    """

    def __init__(self, dim: int, num_tokens: int, heads: int):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * dim ** -0.5)
        self.norm = nn.LayerNorm(dim)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.to_v.weight)

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        """x: (B, M, C) -> (B, num_tokens, C)."""
        b, m, c = x.shape
        h, d = self.heads, c // self.heads
        k = self.to_k(self.norm(x)).view(b, m, h, d).transpose(1, 2)
        v = self.to_v(x).view(b, m, h, d).transpose(1, 2)
        q = self.queries.to(x.dtype).view(1, -1, h, d).transpose(1, 2).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, -1, c)


def parse_image_bank(spec) -> Optional[str]:
    """Normalise an image-bank spec to a config string: None (all tokens), ``"pool:<factor>"``
    or ``"learned:<M>"``. Accepts those strings or tuples ``("pool", 2)``/``("learned", 16)``."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        spec = f"{spec[0]}:{spec[1]}"
    if isinstance(spec, str):
        m = re.match(r"^(pool|learned):(\d+)$", spec)
        if m and int(m.group(2)) >= 1:
            return spec
    raise ValueError(f"image_bank: expected None, 'pool:<factor>' or 'learned:<M>' (ints >= 1), got {spec!r}")


def build_image_bank(spec, dim: int, heads: int) -> Optional[nn.Module]:
    spec = parse_image_bank(spec)
    if spec is None:
        return None
    kind, n = spec.split(":")
    return PooledTokenBank(int(n)) if kind == "pool" else LearnedTokenBank(dim, int(n), heads)


# ---- shared pieces -------------------------------------------------------------------------------
def copy_linear(layer: nn.Linear) -> nn.Linear:
    """A trainable copy of a (possibly frozen) pretrained projection."""
    new = copy.deepcopy(layer)
    new.requires_grad_(True)
    return new


class _BaseProcessor(nn.Module):
    """Holds the install record and the processor that was installed before (used in ``off`` mode)."""

    def __init__(self, context: VideoBoothContext, name: str, base_processor):
        super().__init__()
        self.context = context
        self.name = name
        if base_processor is None:
            from diffusers.models.attention_processor import AttnProcessor2_0
            base_processor = AttnProcessor2_0()
        # Not registered as a submodule: its weights (if any) belong to the model it came from.
        self.__dict__["base_processor"] = base_processor

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    @staticmethod
    def _pre(attn, hidden_states, temb):
        """diffusers' input handling: spatial norm, (B, C, H, W) -> (B, HW, C), group norm."""
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            shape4 = hidden_states.shape
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape4

    @staticmethod
    def _post(attn, out, residual, shape4):
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)  # dropout
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _heads(attn, proj_out: torch.Tensor):
    h = attn.heads
    return h, proj_out.shape[-1] // h


# ---- attn1: the fine path ----------------------------------------------------------------------
class VideoBoothAttnProcessor(_BaseProcessor):
    """Cross-frame attention with image-prompt injection for an attn1 ``Attention``.

    The pass comes from the call's ``vb_state`` (a :class:`vb.VideoBoothState`, passed through
    ``cross_attention_kwargs``), else from the context's active state.

    Video pass (state mode ``"video"``), hidden states (B*F, N, C):
        q = to_q(x) (or the learned ``to_q_new`` when the image is injected, the ablation),
        k = to_k_new(x), v = to_v_new(x), all viewed as (B, F, N, H, D) without a transpose;
        with an image prompt: k_img = to_k_exemplar(bank(x_img)), v_img = to_v_exemplar(...)
        of shape (B, M, H, D), where x_img (B, M0, C) is this layer's input in the image branch;
        out = videobooth_attention(q, k, v, k_img, v_img, schedule, backend) -> to_out.
        Without an image prompt the schedule loses its keyframes (:func:`without_image`), which
        is exactly plain sparse-causal attention over the ``to_k_new``/``to_v_new`` K/V.
    Image pass: records x (B, M0, C) for the video pass, then self-attention with to_q,
        to_k_new, to_v_new (the original runs the exemplar through the same attn1).
    Off: the processor that was installed before runs unchanged.

    Args:
        attn: the diffusers ``Attention`` this processor is installed on (its ``to_k``/``to_v``
            are copied).
        context: the backbone's shared :class:`VideoBoothContext`.
        name: unique key of this layer in the pass state's ``image_states``.
        schedule: schedule spec (see :func:`resolve_schedule`).
        backend: ``vb_kernels`` backend: ``"reference"``, ``"sdpa"``, ``"flex"``, ``"triton"``, ``"auto"``.
        image_bank: None (all image tokens), ``"pool:<f>"`` or ``"learned:<M>"``.
        learn_query: add a trainable ``to_q_new`` (copy of ``to_q``) used when the image is
            injected; the op shares q between phase 1 (reading the image) and phase 2.
    """

    def __init__(self, attn, context: VideoBoothContext, name: str = "", schedule: ScheduleSpec = "videobooth",
                 backend: str = "reference", image_bank=None, learn_query: bool = False, base_processor=None):
        super().__init__(context, name, base_processor)
        if getattr(attn, "to_k", None) is None or getattr(attn, "to_v", None) is None:
            raise ValueError(f"attn ({name}): expected an Attention with to_k/to_v projections")
        self.schedule = check_schedule_spec(schedule)
        self.backend = check_backend(backend)
        self.to_k_new = copy_linear(attn.to_k)
        self.to_v_new = copy_linear(attn.to_v)
        self.to_k_exemplar = copy_linear(attn.to_k)
        self.to_v_exemplar = copy_linear(attn.to_v)
        self.to_q_new = copy_linear(attn.to_q) if learn_query else None
        self.image_bank = build_image_bank(image_bank, attn.to_k.in_features, attn.heads)
        self._schedules = {}

    def set_schedule(self, schedule: ScheduleSpec) -> None:
        self.schedule = check_schedule_spec(schedule)
        self._schedules = {}

    def schedule_for(self, num_frames: int, has_image: bool) -> Schedule:
        """The schedule of an F-frame pass, with or without the image prompt (cached)."""
        key = (num_frames, has_image)
        if key not in self._schedules:
            s = resolve_schedule(self.schedule, num_frames)
            self._schedules[key] = s if has_image else without_image(s)
        return self._schedules[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 vb_state: Optional[VideoBoothState] = None, *args, **kwargs):
        """diffusers' processor call; ``vb_state`` (from ``cross_attention_kwargs``) says which
        pass this is. Without it the processor that was installed before runs (``off``)."""
        st = resolve_state(vb_state)
        if st.mode == "off":
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: the cross-frame processor takes neither encoder_hidden_states "
                             f"nor attention_mask (attn1 is self-attention)")
        residual = hidden_states
        x, shape4 = self._pre(attn, hidden_states, temb)

        if st.mode == "image":
            # setdefault: a gradient checkpoint's recompute of this block must not replace the
            # tensor the video pass already read (it holds the forward's autograd graph).
            st.image_states.setdefault(self.name, x)
            q, k, v = attn.to_q(x), self.to_k_new(x), self.to_v_new(x)
            h, d = _heads(attn, q)
            b, n = x.shape[:2]
            q, k, v = (t.view(b, 1, n, h, d) for t in (q, k, v))
            q, k = self._qk_norm(attn, q, k)
            out = videobooth_attention(q, k, v, schedule=_self_attention_schedule(), scale=attn.scale,
                                       backend=self.backend)
            return self._post(attn, out.reshape(b, n, h * d), residual, shape4)

        bf, n, _ = x.shape
        f = st.num_frames
        if bf % f != 0:
            raise ValueError(f"{self.name}: hidden_states batch {bf} is not a multiple of num_frames={f}")
        b = bf // f
        if st.record:  # (setdefault: a checkpoint's recompute keeps the forward's tensor)
            st.image_states.setdefault(self.name, x.reshape(b, f, n, -1)[:, 0])
        x_img = st.image_states.get(self.name) if st.inject else None
        if st.inject and x_img is None:
            raise RuntimeError(f"{self.name}: the image branch recorded no hidden states for this layer")
        scale = st.image_scale
        if x_img is not None and scale == 0.0:
            x_img = None  # strength 0: exactly the pass without an image prompt
        out, kv = self._video_attention(attn, x, x_img, b, f, st.grid)
        if x_img is not None and scale != 1.0:
            # Strength s blends the outputs with and without injection: s = 1 is the paper's.
            # The frames' K/V are the same in both passes (projected once).
            plain, _ = self._video_attention(attn, x, None, b, f, st.grid, kv)
            out = plain + scale * (out - plain)
        return self._post(attn, out, residual, shape4)

    def _video_attention(self, attn, x, x_img, b, f, grid, kv=None):
        """(B*F, N, C) frames [+ (B, M0, C) image states] -> ((B*F, N, C) attention output, the
        frames' (k, v)); ``kv``: those of an earlier pass over the same ``x``, reused."""
        bf, n, _ = x.shape
        to_q = self.to_q_new if (x_img is not None and self.to_q_new is not None) else attn.to_q
        # q before k and v: the order autograd sums x's gradient in (the demo's bits depend on it)
        q = to_q(x)
        h, d = _heads(attn, q)
        # BFNHD is a view of the projection output: the op reads it in place, no transpose.
        q = q.view(b, f, n, h, d)
        if kv is None:
            k, v = self.to_k_new(x).view(b, f, n, h, d), self.to_v_new(x).view(b, f, n, h, d)
            q, k = self._qk_norm(attn, q, k)
            kv = (k, v)
        else:
            q, _ = self._qk_norm(attn, q, None)
        k, v = kv
        k_img = v_img = None
        if x_img is not None:
            if x_img.shape[0] != b:
                raise ValueError(f"{self.name}: image branch batch {x_img.shape[0]} != video batch {b}")
            if self.image_bank is not None:
                x_img = self.image_bank(x_img, grid)
            m = x_img.shape[1]
            k_img = self.to_k_exemplar(x_img).view(b, m, h, d)
            v_img = self.to_v_exemplar(x_img).view(b, m, h, d)
            if getattr(attn, "norm_k", None) is not None:
                k_img = attn.norm_k(k_img)
        out = videobooth_attention(q, k, v, k_img, v_img, schedule=self.schedule_for(f, x_img is not None),
                                   scale=attn.scale, backend=self.backend)
        return out.reshape(bf, n, h * d), kv

    @staticmethod
    def _qk_norm(attn, q, k):
        # diffusers' q/k norms act on the head dim only, so they apply to BFNHD as to BHND.
        if getattr(attn, "norm_q", None) is not None:  # (absent in older diffusers)
            q = attn.norm_q(q)
        if k is not None and getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        return q, k


# ---- attn2: the coarse path's text K/V -----------------------------------------------------------
class VideoBoothTextAttnProcessor(_BaseProcessor):
    """Text cross-attention with new K/V projections for the subject-injected prompt.

    Image and video passes: q = to_q(x) (B', N, C), k = to_k_new(text), v = to_v_new(text)
    with text (B', L, C_text), SDPA, to_out. The original replaces attn2's K/V by its
    ``to_k_global``/``to_v_global`` for every prompt, null prompt included; so does this.
    Off: the processor that was installed before.
    """

    def __init__(self, attn, context: VideoBoothContext, name: str = "", base_processor=None):
        super().__init__(context, name, base_processor)
        self.to_k_new = copy_linear(attn.to_k)
        self.to_v_new = copy_linear(attn.to_v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 vb_state: Optional[VideoBoothState] = None, *args, **kwargs):
        if resolve_state(vb_state).mode == "off":
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: encoder_hidden_states is required for text cross-attention")
        residual = hidden_states
        x, shape4 = self._pre(attn, hidden_states, temb)
        b, n, _ = x.shape
        text = encoder_hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        if text.shape[0] != b:
            raise ValueError(f"{self.name}: encoder_hidden_states batch {text.shape[0]} != hidden_states batch {b}")
        q, k, v = attn.to_q(x), self.to_k_new(text), self.to_v_new(text)
        h, d = _heads(attn, q)
        q = q.view(b, n, h, d).transpose(1, 2)
        k = k.view(b, -1, h, d).transpose(1, 2)
        v = v.view(b, -1, h, d).transpose(1, 2)
        q, k = VideoBoothAttnProcessor._qk_norm(attn, q, k)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, h, -1, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, h * d).to(q.dtype)
        return self._post(attn, out, residual, shape4)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend: expected one of {BACKENDS}, got {backend!r}")
    return backend
