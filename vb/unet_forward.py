"""A U-Net forward that hands the pass's frame count to the layers diffusers calls without it.

diffusers' ``UNet2DConditionModel.forward`` gives every attention block the call's
``cross_attention_kwargs`` (where the VideoBooth state travels, vb/context.py), but calls a
ResNet as ``resnet(hidden_states, temb)``, a motion module as ``motion_module(hidden_states,
num_frames=...)`` and ``conv_norm_out(sample)``. Three things of VideoBooth need more than that:

- the official preset's clip-level GroupNorms (``vb.official.ClipGroupNorm``) inside every
  ResNet and at ``conv_norm_out`` need the pass's frame count;
- the official watermark module sits between the last up block and ``conv_norm_out`` and reads
  the time embedding;
- the image branch of an AnimateDiff ``UNetMotionModel`` is 2D only: its motion modules are
  not run.

:func:`unet_forward` walks the same modules in the same order as diffusers' forward (and gives
the same result, bit for bit, where none of the three applies: tested) and passes these by
argument, so no layer reads a shared, mutable "current pass". It covers the Stable Diffusion
1.x/2.x family that VideoBooth uses; :func:`check_walkable` names what it does not cover (class or
addition embeddings, ResNets with their own up/down sampling, other time-embedding norms), and
:class:`vb.VideoBoothUNet` runs it when it is built, so such a config is refused with the reason
rather than run differently (FreeU, which can be switched on later, is refused per call).
Passes that need none of the three take diffusers' own forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _norm(norm: nn.Module, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    # A norm whose statistics span the clip (``per_clip``: vb.official.ClipGroupNorm) takes F.
    return norm(x, num_frames) if getattr(norm, "per_clip", False) else norm(x)


def check_walkable(unet: nn.Module) -> None:
    """Raise ValueError naming what :func:`unet_forward` does not cover in ``unet`` (the backbone
    checks once, when it is built; FreeU, which can be switched on later, is checked per call)."""
    cfg = unet.config
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "num_class_embeds"):
        if cfg.get(key) is not None:
            raise ValueError(f"unet: the VideoBooth forward does not cover {key}={cfg.get(key)!r} "
                             "(clip-level norms, watermark and the motion image branch need it)")
    if cfg.get("center_input_sample"):
        raise ValueError("unet: the VideoBooth forward does not cover center_input_sample=True")
    from diffusers.models.resnet import ResnetBlock2D

    for name, m in unet.named_modules():
        if isinstance(m, ResnetBlock2D) and (m.upsample is not None or m.downsample is not None
                                             or m.time_embedding_norm != "default"):
            raise ValueError(f"unet.{name}: the VideoBooth forward covers ResNets without their own up/down "
                             f"sampling and with time_embedding_norm='default', got up={m.up}, down={m.down}, "
                             f"time_embedding_norm={m.time_embedding_norm!r}")


def resnet_forward(resnet: nn.Module, x: torch.Tensor, temb: Optional[torch.Tensor], num_frames: int) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D`` (default time-embedding norm, no own resampling) with its
    GroupNorms over ``num_frames``-frame clips where they are clip-level (``per_clip``)."""
    h = resnet.nonlinearity(_norm(resnet.norm1, x, num_frames))
    h = resnet.conv1(h)
    if resnet.time_emb_proj is not None and temb is not None:
        h = h + resnet.time_emb_proj(temb if resnet.skip_time_act else resnet.nonlinearity(temb))[:, :, None, None]
    h = resnet.conv2(resnet.dropout(resnet.nonlinearity(_norm(resnet.norm2, h, num_frames))))
    if resnet.conv_shortcut is not None:
        x = resnet.conv_shortcut(x.contiguous() if resnet.training else x)
    return (x + h) / resnet.output_scale_factor


def _resnet(block, resnet, h, temb, num_frames):
    if torch.is_grad_enabled() and getattr(block, "gradient_checkpointing", False):
        return torch.utils.checkpoint.checkpoint(resnet_forward, resnet, h, temb, num_frames, use_reentrant=False)
    return resnet_forward(resnet, h, temb, num_frames)


def _attention(attn, h, encoder_hidden_states, cross_attention_kwargs):
    return attn(h, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False)[0]


def down_block_forward(block, h, temb, num_frames=1, encoder_hidden_states=None, cross_attention_kwargs=None):
    """A diffusers down block (2D or motion; its motion modules are not run): (output, skips)."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    skips = ()
    for resnet, attn in zip(block.resnets, attentions):
        h = _resnet(block, resnet, h, temb, num_frames)
        if attn is not None:
            h = _attention(attn, h, encoder_hidden_states, cross_attention_kwargs)
        skips += (h,)
    for down in getattr(block, "downsamplers", None) or []:
        h = down(h)
        skips += (h,)
    return h, skips


def mid_block_forward(block, h, temb, num_frames=1, encoder_hidden_states=None, cross_attention_kwargs=None):
    """A diffusers cross-attention mid block (2D or motion; its motion modules are not run)."""
    h = _resnet(block, block.resnets[0], h, temb, num_frames)
    for attn, resnet in zip(block.attentions, block.resnets[1:]):
        h = _attention(attn, h, encoder_hidden_states, cross_attention_kwargs)
        h = _resnet(block, resnet, h, temb, num_frames)
    return h


def up_block_forward(block, h, skips, temb, num_frames=1, encoder_hidden_states=None, cross_attention_kwargs=None,
                     upsample_size=None):
    """A diffusers up block (2D or motion; its motion modules are not run)."""
    if all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2")):
        raise ValueError("unet: FreeU is enabled; the VideoBooth forward does not cover it (disable_freeu())")
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions):
        h = torch.cat([h, skips[-1]], dim=1)
        skips = skips[:-1]
        h = _resnet(block, resnet, h, temb, num_frames)
        if attn is not None:
            h = _attention(attn, h, encoder_hidden_states, cross_attention_kwargs)
    for up in getattr(block, "upsamplers", None) or []:
        h = up(h, upsample_size)
    return h


def unet_forward(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 cross_attention_kwargs: Optional[dict] = None, *, num_frames: int = 1,
                 watermark: Optional[nn.Module] = None) -> torch.Tensor:
    """The output of a diffusers ``UNet2DConditionModel`` (or the 2D part of a ``UNetMotionModel``,
    its motion modules not run) on frame-major ``sample`` (B*F, C, H, W).

    Args:
        timestep: (B*F,) timesteps, one per row of ``sample``.
        encoder_hidden_states: (B*F, L, D) text states, one per row.
        cross_attention_kwargs: what every attention block receives (the VideoBooth state).
        num_frames: F, over which clip-level GroupNorms take their statistics (1: per frame).
        watermark: the official watermark module; its term is added to the last up block's
            output before ``conv_norm_out``.
    """
    n_up = sum(1 for b in unet.up_blocks if getattr(b, "upsamplers", None))
    forward_size = any(d % (2 ** n_up) for d in sample.shape[-2:])
    t_emb = unet.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
    temb = unet.time_embedding(t_emb, None)
    if getattr(unet, "time_embed_act", None) is not None:
        temb = unet.time_embed_act(temb)
    kw = dict(num_frames=num_frames, encoder_hidden_states=encoder_hidden_states,
              cross_attention_kwargs=cross_attention_kwargs)
    h = unet.conv_in(sample)
    skips = (h,)
    for block in unet.down_blocks:
        h, s = down_block_forward(block, h, temb, **kw)
        skips += s
    if unet.mid_block is not None:
        h = mid_block_forward(unet.mid_block, h, temb, **kw)
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        block_skips, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
        h = up_block_forward(block, h, block_skips, temb, upsample_size=size, **kw)
    if watermark is not None:
        h = h + watermark(h, temb, num_frames)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(_norm(unet.conv_norm_out, h, num_frames))
    return unet.conv_out(h)
