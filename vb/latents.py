"""The VAE step shared by training and sampling: images -> scaled latents."""
from __future__ import annotations

from typing import Optional

import torch


def encode_latents(vae, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                   sample: bool = True) -> torch.Tensor:
    """Scaled VAE latents of images: ``(z - shift_factor) * scaling_factor``, z the posterior's
    sample (``sample=True``, drawn from ``generator``) or its mode.

    vae: a diffusers ``AutoencoderKL`` (``config.scaling_factor``, optional ``shift_factor``).
    images: (N, 3, H, W) in [-1, 1], any float dtype (cast to the VAE's). Returns (N, C, H/s, W/s)
    float32, s = 2 ** (len(vae.config.block_out_channels) - 1).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (N, 3, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()
