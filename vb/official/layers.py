"""Layers of the released VideoBooth model that this project's research preset does not use:
the clip-level GroupNorm of its ResnetBlock3D / ``conv_norm_out`` and its watermark sub-U-Net.
:class:`vb.VideoBoothUNet` adds them with ``preset="official"`` (or ``clip_groupnorm=`` /
``watermark=``)."""
from __future__ import annotations

import torch
from torch import nn

from ..unet_forward import down_block_forward, up_block_forward


class ClipGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover the whole clip, as ``nn.GroupNorm`` applied to a
    (B, C, F, H, W) tensor does in the official model's ResnetBlock3D and ``conv_norm_out``.

    Input is frame-major (B*F, C, H, W) as everywhere in the inflated U-Net; F is the call's
    ``num_frames`` (:func:`vb.unet_forward.unet_forward` passes the pass's; called as a plain
    GroupNorm it is per frame). Equal to ``group_norm`` of the clip viewed as (B, C, F*H, W).
    Same parameters (and state-dict keys) as the GroupNorm it replaces.
    """

    per_clip = True  # what the VideoBooth forward looks for

    def __init__(self, norm: nn.GroupNorm):
        super().__init__(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
        if norm.affine:
            self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        f = int(num_frames)
        if f == 1 or x.dim() != 4:
            return super().forward(x)
        bf, c, h, w = x.shape
        if bf % f:
            raise ValueError(f"num_frames: {f} does not divide the batch of {bf} frames")
        clip = x.view(bf // f, f, c, h, w).transpose(1, 2).reshape(bf // f, c, f * h, w)
        out = super().forward(clip)
        return out.view(bf // f, c, f, h, w).transpose(1, 2).reshape(bf, c, h, w)


def use_clip_groupnorm(unet: nn.Module, modules) -> int:
    """Replace the ResNet GroupNorms (norm1, norm2) of ``modules`` and ``unet.conv_norm_out`` by
    :class:`ClipGroupNorm`; the attention blocks' GroupNorm stays per frame (as in the official
    Transformer3DModel). Returns the number replaced."""
    from diffusers.models.resnet import ResnetBlock2D

    n = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, ResnetBlock2D):
                for attr in ("norm1", "norm2"):
                    norm = getattr(m, attr)
                    if type(norm) is nn.GroupNorm:
                        setattr(m, attr, ClipGroupNorm(norm))
                        n += 1
    if type(getattr(unet, "conv_norm_out", None)) is nn.GroupNorm:
        unet.conv_norm_out = ClipGroupNorm(unet.conv_norm_out)
        n += 1
    return n


class WatermarkModule(nn.Module):
    """The official model's watermark sub-U-Net: 3 down blocks and 3 up blocks of ResNets (no
    attention) on the main U-Net's last up-block output, ending in a zero-initialised 1x1 conv
    whose output is added to that output before ``conv_norm_out``.

    Args:
        in_channels: the U-Net's ``block_out_channels[0]``.
        channels: the three blocks' widths (the official code hard-codes (320, 640, 640); its
            first entry must equal ``in_channels``).
        temb_channels, layers_per_block, norm_num_groups, norm_eps, downsample_padding: those of
            the U-Net (its config).
    """

    def __init__(self, in_channels: int, channels=(320, 640, 640), *, temb_channels: int, layers_per_block: int,
                 norm_num_groups: int, norm_eps: float, downsample_padding: int = 1):
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D

        channels = tuple(channels)
        if channels[0] != in_channels:
            raise ValueError(f"watermark: the first width must equal block_out_channels[0]={in_channels}, "
                             f"got {channels}")
        common = dict(temb_channels=temb_channels, resnet_eps=norm_eps, resnet_act_fn="silu",
                      resnet_groups=norm_num_groups)
        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            self.down_blocks.append(DownBlock2D(in_channels=in_ch, out_channels=out_ch, num_layers=layers_per_block,
                                                add_downsample=i < len(channels) - 1,
                                                downsample_padding=downsample_padding, **common))
        rev = list(reversed(channels))
        self.up_blocks = nn.ModuleList()
        out_ch = rev[0]
        for i in range(len(rev)):
            prev, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(rev) - 1)]
            self.up_blocks.append(UpBlock2D(in_channels=in_ch, prev_output_channel=prev, out_channels=out_ch,
                                            num_layers=layers_per_block + 1, add_upsample=i < len(rev) - 1, **common))
        self.zero_out = nn.Conv2d(channels[0], channels[0], kernel_size=1)
        nn.init.zeros_(self.zero_out.weight)
        nn.init.zeros_(self.zero_out.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """x: (B*F, C0, H, W), temb: (B*F, T) -> the (B*F, C0, H, W) term added to x; its
        GroupNorms span ``num_frames``-frame clips where they are clip-level."""
        res = (x,)
        h = x
        for block in self.down_blocks:
            h, r = down_block_forward(block, h, temb, num_frames)
            res += r
        for i, block in enumerate(self.up_blocks):
            skips = res[-len(block.resnets):]
            res = res[:-len(block.resnets)]
            size = res[-1].shape[2:] if res else None  # the next skip's size (odd sizes round trip)
            h = up_block_forward(block, h, skips, temb, num_frames, upsample_size=size)
        return self.zero_out(h)
